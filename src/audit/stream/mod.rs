//! Audit streaming to a SIEM (issue 16, item 5): committed audit records, of any operation,
//! delivered at least once to each configured sink, in sequence order.
//!
//! Each sink has its own thread, apart from the data plane: it reads the next batch of
//! committed records after its cursor from the audit store (the server's reader connection,
//! never the writer's), hands the batch to the sink, and only once the sink has acknowledged
//! it (see each sink) moves its cursor, persisted in `<data-dir>/audit-stream-<sink>.cursor`
//! (0600, replaced atomically). So:
//!
//! - a restart, or a `kill -9`, resumes after the last acknowledged batch: nothing is lost,
//!   and what repeats is at most the batch that was in flight (the unacknowledged tail);
//! - a slow or dead sink only makes its own thread wait and retry (backing off up to
//!   [`MAX_BACKOFF`]); calls are never held back, because records are read from the store
//!   after they are committed, and memory is bounded by one batch ([`BATCH`] records);
//! - how far a sink is behind is `tenant_kms_audit_stream_lag_records{sink}` (head sequence
//!   minus cursor), with delivered records and failed attempts beside it.
//!
//! Sinks: [`file`] (JSON lines, rotated by size) and [`syslog`] (RFC 5424 over TCP with
//! octet-counting framing, or over a Unix stream socket).

pub mod cursor;
pub mod file;
pub mod syslog;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::log::{AuditLog, ListFilter};
use super::record::AuditRecord;
use crate::error::Result;

/// Most records read and delivered at once.
pub const BATCH: usize = 512;
/// How often an idle stream looks for new records.
pub const POLL: Duration = Duration::from_millis(200);
/// Longest wait between two attempts at a failing sink.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A destination for committed records.
pub trait Sink: Send {
    /// The sink's name: its metric label and its cursor file's name.
    fn name(&self) -> &'static str;

    /// Delivers `records` (in sequence order) and returns once the sink has acknowledged
    /// them; an error means they may or may not have arrived, and they will be sent again.
    fn deliver(&mut self, records: &[(u64, AuditRecord)]) -> Result<()>;
}

/// Which sinks to stream to (config keys `audit_stream_*`); none by default.
#[derive(Debug, Clone, Default)]
pub struct StreamConfig {
    /// JSON lines to a file, rotated by size.
    pub file: Option<file::FileSinkConfig>,
    /// RFC 5424 syslog.
    pub syslog: Option<syslog::SyslogTarget>,
}

impl StreamConfig {
    /// The configured sinks.
    pub fn sinks(&self) -> Vec<Box<dyn Sink>> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(config) = &self.file {
            sinks.push(Box::new(file::FileSink::new(config.clone())));
        }
        if let Some(target) = &self.syslog {
            sinks.push(Box::new(syslog::SyslogSink::new(target.clone())));
        }
        sinks
    }
}

/// The running streams; [`Streams::stop`] (or dropping it) ends their threads.
pub struct Streams {
    stop: Vec<mpsc::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Streams {
    /// Starts one thread per configured sink, reading from `reader`, with cursors in
    /// `data_dir`.
    pub fn start(config: &StreamConfig, reader: Arc<dyn AuditLog>, data_dir: PathBuf) -> Self {
        let mut streams = Self {
            stop: Vec::new(),
            threads: Vec::new(),
        };
        for sink in config.sinks() {
            let (stop, stopped) = mpsc::channel();
            let reader = Arc::clone(&reader);
            let cursor = cursor::Cursor::new(&data_dir, sink.name());
            crate::metrics::global().stream_configured(sink.name());
            let spawned = std::thread::Builder::new()
                .name(format!("audit-stream-{}", sink.name()))
                .spawn(move || run(sink, reader.as_ref(), cursor, &stopped));
            match spawned {
                Ok(thread) => {
                    streams.stop.push(stop);
                    streams.threads.push(thread);
                }
                Err(e) => tracing::error!(error = %e, "could not start an audit stream thread"),
            }
        }
        streams
    }

    /// Stops every stream and waits for its thread (a delivery in progress finishes or fails
    /// first; its cursor is already persisted up to the last acknowledged batch).
    pub fn stop(mut self) {
        self.stop.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Waits `delay`, or less if asked to stop; true when asked to stop.
fn wait(stopped: &mpsc::Receiver<()>, delay: Duration) -> bool {
    !matches!(
        stopped.recv_timeout(delay),
        Err(mpsc::RecvTimeoutError::Timeout)
    )
}

/// One stream's loop: read after the cursor, deliver, persist the cursor; until stopped.
fn run(
    mut sink: Box<dyn Sink>,
    reader: &dyn AuditLog,
    cursor: cursor::Cursor,
    stopped: &mpsc::Receiver<()>,
) {
    let name = sink.name();
    let metrics = crate::metrics::global();
    let mut after = match cursor.load() {
        Ok(seq) => seq,
        Err(e) => {
            // A cursor that cannot be read is not guessed at: the stream stays off and says so.
            tracing::error!(sink = name, error = %e, "audit stream cursor unreadable; stream off");
            return;
        }
    };
    let mut backoff = POLL;
    loop {
        let filter = ListFilter {
            after_seq: after,
            limit: BATCH,
            ..Default::default()
        };
        let batch = reader.list(&filter);
        if let Ok(head) = reader.head() {
            metrics.stream_lag(name, head.seq.saturating_sub(after));
        }
        let delay = match batch {
            Ok(records) if records.is_empty() => POLL,
            Ok(records) => match sink.deliver(&records) {
                Ok(()) => {
                    let last = records.last().map_or(after, |(seq, _)| *seq);
                    metrics.stream_delivered(name, records.len() as u64);
                    match cursor.store(last) {
                        Ok(()) => {
                            after = last;
                            backoff = POLL;
                            Duration::ZERO
                        }
                        Err(e) => {
                            // Delivered but not recorded: it will be sent again (at least once).
                            tracing::warn!(sink = name, error = %e, "cannot persist the stream cursor");
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            backoff
                        }
                    }
                }
                Err(e) => {
                    metrics.stream_failed(name);
                    tracing::warn!(sink = name, error = %e, records = records.len(),
                        "audit stream delivery failed; will retry");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    backoff
                }
            },
            Err(e) => {
                tracing::warn!(sink = name, error = %e, "audit stream cannot read the log");
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
        };
        if delay.is_zero() {
            if let Ok(()) | Err(mpsc::TryRecvError::Disconnected) = stopped.try_recv() {
                return;
            }
        } else if wait(stopped, delay) {
            return;
        }
    }
}
