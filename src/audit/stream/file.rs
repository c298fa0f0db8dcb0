//! The file sink: one JSON object per line ([`AuditRecord::export_json`]), appended to a file
//! (created 0600) and fsynced before the batch counts as acknowledged. When the file would
//! pass `max_bytes`, it is rotated first: `FILE` becomes `FILE.1`, `FILE.1` becomes `FILE.2`,
//! and so on, keeping `keep` rotated files (the oldest is removed).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::Sink;
use crate::audit::record::AuditRecord;
use crate::error::{Error, Result};

/// Where and how big (config keys `audit_stream_file`, `audit_stream_file_max_bytes`,
/// `audit_stream_file_keep`).
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// The file.
    pub path: PathBuf,
    /// Size past which it is rotated before the next batch.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

impl FileSinkConfig {
    /// Default of `audit_stream_file_max_bytes`: 100 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 100 << 20;
    /// Default of `audit_stream_file_keep`.
    pub const DEFAULT_KEEP: usize = 5;
}

/// The file sink.
pub struct FileSink {
    config: FileSinkConfig,
    /// The file's end was checked for a torn line (once, before the first write).
    checked: bool,
}

/// How far back from the end a torn line is looked for (a record's line is far shorter).
const TORN_TAIL_SCAN: u64 = 1 << 20;

impl FileSink {
    /// A sink writing to `config.path`.
    pub fn new(config: FileSinkConfig) -> Self {
        Self {
            config,
            checked: false,
        }
    }

    /// Cuts a torn last line (no final newline) off the file, if there is one.
    fn cut_torn_tail(&self) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.config.path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let start = len.saturating_sub(TORN_TAIL_SCAN);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        if tail.last().is_none_or(|&b| b == b'\n') {
            return Ok(());
        }
        let keep = tail
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(start, |i| start + i as u64 + 1);
        tracing::warn!(
            path = %self.config.path.display(),
            bytes = len - keep,
            "audit stream file ended in a torn line (a crash mid-write); cut, its batch is sent again"
        );
        file.set_len(keep)?;
        file.sync_all()
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.config.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&self) -> std::io::Result<()> {
        let keep = self.config.keep;
        if keep == 0 {
            return std::fs::remove_file(&self.config.path);
        }
        match std::fs::remove_file(self.rotated(keep)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for n in (1..keep).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::rename(&self.config.path, self.rotated(1))
    }
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    fn deliver(&mut self, records: &[(u64, AuditRecord)]) -> Result<()> {
        let path = &self.config.path;
        let fail = |e: std::io::Error| {
            Error::Unavailable(format!("audit stream file {}: {e}", path.display()))
        };
        let mut lines = Vec::with_capacity(records.len() * 256);
        for (seq, record) in records {
            serde_json::to_writer(&mut lines, &record.export_json(*seq))
                .map_err(|e| Error::Internal(format!("audit stream encoding: {e}")))?;
            lines.push(b'\n');
        }
        if !self.checked {
            self.cut_torn_tail().map_err(fail)?;
            self.checked = true;
        }
        let size = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(fail(e)),
        };
        if size > 0 && size + lines.len() as u64 > self.config.max_bytes {
            self.rotate().map_err(fail)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(fail)?;
        file.write_all(&lines).map_err(fail)?;
        file.sync_data().map_err(fail)?;
        // A failed sync is as transient as a failed write: delivery is retried.
        crate::fsutil::sync_parent(path)
            .map_err(|e| Error::Unavailable(format!("audit stream file: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;
    use std::path::Path;

    fn records(from: u64, n: u64) -> Vec<(u64, AuditRecord)> {
        (from..from + n)
            .map(|seq| {
                let record = AuditRecord::local(
                    crate::audit::operation::Task::Backup,
                    "cli:test",
                    Outcome::Ok,
                );
                (seq, record)
            })
            .collect()
    }

    #[test]
    fn a_torn_last_line_is_cut_before_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = FileSinkConfig {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 1,
        };
        FileSink::new(config.clone())
            .deliver(&records(1, 2))
            .unwrap();
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"seq\":3,\"ti");
        std::fs::write(&path, &torn).unwrap();
        FileSink::new(config).deliver(&records(3, 1)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // One batch's size, measured, so that two batches fit in a file and three do not.
        let probe = dir.path().join("probe.jsonl");
        let config = |path: &Path, max_bytes| FileSinkConfig {
            path: path.to_owned(),
            max_bytes,
            keep: 2,
        };
        FileSink::new(config(&probe, u64::MAX))
            .deliver(&records(1, 3))
            .unwrap();
        let batch = std::fs::metadata(&probe).unwrap().len();
        let max_bytes = batch * 5 / 2;
        let mut sink = FileSink::new(config(&path, max_bytes));
        for batch in 0..10 {
            sink.deliver(&records(batch * 3 + 1, 3)).unwrap();
        }
        let mut seqs = Vec::new();
        for name in ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
        }
        assert!(!dir.path().join("audit.jsonl.3").exists());
        // The kept files hold the newest records, in order, ending with the last one.
        assert_eq!(seqs.last(), Some(&30));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert!(seqs.len() < 30);
        for name in ["audit.jsonl.1", "audit.jsonl"] {
            let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
            assert!(len <= max_bytes && len > batch, "{name}: {len}");
        }
    }
}
