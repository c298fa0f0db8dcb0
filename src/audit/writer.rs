//! The group-commit audit writer.
//!
//! A dedicated thread owns an [`AuditLog`] (its own connection, for SQLite) and is the only
//! one appending through it. Requests hand it their record and wait on a
//! oneshot channel; the thread takes every record that is waiting, commits them as one
//! transaction (one fsync), then answers each. An idle service therefore commits a record at
//! once, and a busy one commits whatever arrived during the previous fsync together: the cost
//! of durability is one fsync per batch, not per request.
//!
//! A failed commit fails every request in its batch (fail closed: UNAVAILABLE, no result) and
//! the connection is reopened for the next batch, so the service recovers by itself once the
//! fault is cleared (the log reconnects on the next append). The failed calls' records are kept in memory (bounded) and written, as
//! `unavailable` with what the call did in their detail, by the first commit that succeeds:
//! a control-plane call that changed state before the audit failed stays on the trail.
//!
//! Before it accepts anything, the writer checks the end of the log
//! ([`AuditMaintenance::check_tail`](super::log::AuditMaintenance::check_tail)).
//! It flags, and does not refuse: a problem is logged, and a tail that is not the one the
//! signed head names gets an `AuditTailMismatch` evidence record at once (every append checks
//! the head again, in its own transaction, so a cut made while the service runs is recorded
//! the same way). The evidence stays in the chain, reported by `audit verify`, until an
//! operator acknowledges it with `audit recover`; nothing is ever deleted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::chain::ChainKeys;
use super::log::AuditLog;
use super::record::AuditRecord;
use crate::error::{Error, Result};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4096;

struct Job {
    record: AuditRecord,
    done: Reply,
}

enum Reply {
    Async(oneshot::Sender<Result<u64>>),
    Blocking(mpsc::SyncSender<Result<u64>>),
}

impl Reply {
    fn send(self, result: Result<u64>) {
        // A requester that gave up (cancelled call) no longer listens; nothing to do then.
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

/// Handle to the writer thread. Cloning shares the thread; it stops when every handle is
/// dropped, after committing what it was given.
#[derive(Clone)]
pub struct AuditWriter {
    jobs: mpsc::Sender<Job>,
    keys: Arc<ChainKeys>,
    commits: Arc<AtomicU64>,
    busy_nanos: Arc<AtomicU64>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    writable: tokio::sync::watch::Receiver<bool>,
}

impl AuditWriter {
    /// Checks the end of `log` (logging what is wrong and recording the evidence of a cut
    /// tail) and starts the writer thread, which owns `log` from then on. `keys` must be the
    /// chain keys `log` was opened with (they are handed out for fingerprints).
    pub fn start(log: Box<dyn AuditLog>, keys: Arc<ChainKeys>) -> Result<Self> {
        let report = log.check_tail()?;
        if !report.ok {
            tracing::error!(
                first_bad_seq = report.first_bad_seq,
                reason = %report.reason,
                "the end of the audit log does not verify; the breaks stay on record until \
                 `tenant-kms audit recover` acknowledges them (see `tenant-kms audit verify`)"
            );
            if report.breaks.iter().any(|b| b.at_head()) {
                // Record the cut now, with the time it was found, not at the first call.
                log.append(&[])?;
            }
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let commits = Arc::new(AtomicU64::new(0));
        let busy_nanos = Arc::new(AtomicU64::new(0));
        // Starts true: the tail check above has just read and, if needed, written the log.
        let (writable_tx, writable) = tokio::sync::watch::channel(true);
        let counters = Counters {
            commits: Arc::clone(&commits),
            busy_nanos: Arc::clone(&busy_nanos),
            writable: writable_tx,
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(log.as_ref(), &counters, &queue))
            .map_err(|e| Error::Internal(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            jobs,
            keys,
            commits,
            busy_nanos,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            writable,
        })
    }

    /// Whether the last commit succeeded: false from a failed commit (calls are being failed
    /// closed with UNAVAILABLE) until the next one that succeeds, which the writer retries by
    /// itself at least every second while records of failed calls wait. The health service
    /// follows it (NOT_SERVING while false).
    pub fn writable(&self) -> tokio::sync::watch::Receiver<bool> {
        self.writable.clone()
    }

    /// How many transactions (batches) this writer has committed: with the records appended,
    /// the mean group-commit batch size.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Total time the writer has spent in transactions (appending, committing, fsync), in
    /// nanoseconds: against wall time, how busy the one writer is.
    pub fn busy_nanos(&self) -> u64 {
        self.busy_nanos.load(Ordering::Relaxed)
    }

    /// The chain keys (for fingerprints and verification).
    pub fn keys(&self) -> &ChainKeys {
        &self.keys
    }

    /// Appends a record and waits until it is committed; returns its sequence number.
    pub async fn append(&self, record: AuditRecord) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                record,
                done: Reply::Async(tx),
            })
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?
    }

    /// Appends a record from a non-async context and waits until it is committed.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<u64> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Job {
                record,
                done: Reply::Blocking(tx),
            })
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?;
        rx.recv()
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?
    }

    /// Stops accepting records, commits what is queued and waits for the thread to end.
    /// Other clones of the handle must be dropped first for the thread to see the end.
    pub fn shutdown(self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        drop(self.jobs);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The writer's counters, shared with its handles.
struct Counters {
    commits: Arc<AtomicU64>,
    busy_nanos: Arc<AtomicU64>,
    /// Sends only on a change, so watchers wake once per transition, not per commit.
    writable: tokio::sync::watch::Sender<bool>,
}

/// Most records kept in memory for a late write while the store cannot write. Past it the
/// oldest are dropped, with an error in the log.
const MAX_DEFERRED: usize = 65_536;
/// How often deferred records are retried when no new record arrives.
const RETRY_DEFERRED: Duration = Duration::from_secs(1);

/// The record of a call whose own record could not be written in time: the caller got
/// UNAVAILABLE and no result, and that is what is recorded, with what the call itself did.
/// (A control-plane call may have changed state before the audit failed: it must not vanish
/// from the trail.)
fn late(mut record: AuditRecord) -> AuditRecord {
    let ended = record.outcome.as_str();
    record.detail = if record.detail.is_empty() {
        format!(
            "recorded late: the audit store could not write when the call ended ({ended}), so \
             the caller got UNAVAILABLE and no result"
        )
    } else {
        format!(
            "recorded late: the audit store could not write when the call ended ({ended}: {}), \
             so the caller got UNAVAILABLE and no result",
            record.detail
        )
    };
    record.outcome = super::Outcome::Unavailable;
    record
}

fn run(log: &dyn AuditLog, counters: &Counters, queue: &mpsc::Receiver<Job>) {
    // Records of calls that were failed closed, written with the next commit that succeeds.
    let mut deferred: VecDeque<AuditRecord> = VecDeque::new();
    let mut dropped: u64 = 0;
    // Group commit: block for the first job, then take whatever else is already waiting. An
    // idle service thus commits a lone record at once; under load, the jobs that queued while
    // the previous fsync ran form the next batch, so the batch size follows the load.
    let mut batch: Vec<Job> = Vec::new();
    loop {
        let first = if deferred.is_empty() {
            match queue.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        } else {
            match queue.recv_timeout(RETRY_DEFERRED) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        batch.extend(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let records = deferred.iter().chain(batch.iter().map(|j| &j.record));
        let started = std::time::Instant::now();
        let committed = commit(log, counters, records);
        crate::metrics::global().audit_commit(
            deferred.len() + batch.len(),
            started.elapsed(),
            committed.is_ok(),
        );
        match committed {
            Ok(first_seq) => {
                let late = deferred.len() as u64;
                if late > 0 {
                    tracing::warn!(
                        records = late,
                        "audit store writable again: recorded the calls failed closed meanwhile"
                    );
                    deferred.clear();
                }
                for (job, seq) in batch.drain(..).zip(first_seq + late..) {
                    job.done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "audit commit failed; failing the calls closed");
                for job in batch.drain(..) {
                    if deferred.len() >= MAX_DEFERRED {
                        deferred.pop_front();
                        dropped += 1;
                        tracing::error!(
                            dropped,
                            "audit store unwritable for long: dropped the oldest late record"
                        );
                    }
                    deferred.push_back(late(job.record));
                    job.done.send(Err(Error::Unavailable(
                        "the audit store cannot record this call; no result was returned".into(),
                    )));
                }
            }
        }
    }
    if !deferred.is_empty() {
        // Shutting down: one last try, so a fault cleared just before the end loses nothing.
        if let Err(e) = commit(log, counters, deferred.iter()) {
            tracing::error!(error = %e, records = deferred.len(), "records of calls failed closed could not be written before shutdown");
        }
    }
}

/// One append transaction, timed and counted. A failed one leaves the log to reconnect on
/// the next.
fn commit<'a>(
    log: &dyn AuditLog,
    counters: &Counters,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64> {
    let started = std::time::Instant::now();
    let records: Vec<&AuditRecord> = records.into_iter().collect();
    let result = log.append(&records);
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counters.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    if result.is_ok() {
        counters.commits.fetch_add(1, Ordering::Relaxed);
    }
    let ok = result.is_ok();
    counters.writable.send_if_modified(|writable| {
        let changed = *writable != ok;
        *writable = ok;
        changed
    });
    result
}
