//! A stream's persisted cursor: the sequence number of the last record its sink
//! acknowledged, in `<data-dir>/audit-stream-<sink>.cursor` (0600). Replaced atomically
//! (write a new file, fsync, rename over, fsync the directory), so a crash leaves either the
//! old cursor or the new one, never a torn one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One sink's cursor file.
#[derive(Debug, Clone)]
pub struct Cursor {
    path: PathBuf,
}

impl Cursor {
    /// The cursor of `sink` in `data_dir`.
    pub fn new(data_dir: &Path, sink: &str) -> Self {
        Self {
            path: data_dir.join(format!("audit-stream-{sink}.cursor")),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last acknowledged sequence number; 0 (stream from the first record) when the file
    /// does not exist. A file that does not hold a number is an error, not a 0.
    pub fn load(&self) -> Result<u64> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().map_err(|_| {
                Error::FailedPrecondition(format!(
                    "{} does not hold a sequence number",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::Internal(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Persists `seq` durably (see the module docs).
    pub fn store(&self, seq: u64) -> Result<()> {
        let fail = |what: &str, e: std::io::Error| {
            Error::Internal(format!("cannot {what} {}: {e}", self.path.display()))
        };
        let temp = self.path.with_extension("cursor.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| fail("write", e))?;
        file.write_all(format!("{seq}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| fail("write", e))?;
        std::fs::rename(&temp, &self.path).map_err(|e| fail("replace", e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail("sync the directory of", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_cursor_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cursor = Cursor::new(dir.path(), "file");
        assert_eq!(cursor.load().unwrap(), 0);
        cursor.store(41).unwrap();
        cursor.store(42).unwrap();
        assert_eq!(cursor.load().unwrap(), 42);
        let mode = std::fs::metadata(cursor.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(cursor.path(), "garbage").unwrap();
        assert!(cursor.load().is_err());
    }
}
