//! The group-commit audit writer.
//!
//! One [`AuditLog`] (its own connection, for SQLite) takes every append of the service, one
//! transaction at a time: whoever commits holds the commit lock. Requests hand a dedicated
//! thread their record and wait on a channel; the thread takes every record that is waiting,
//! commits them as one transaction (one fsync), then answers each. A busy service therefore
//! commits whatever arrived during the previous fsync together: the cost of durability is one
//! fsync per batch, not per request.
//!
//! A lone call needs no batching: when it is the only audited call in flight, nothing is
//! queued for the thread and nobody holds the commit lock, a caller commits its own record on
//! its own thread and saves the two thread hand-offs (each a futex wake of a parked thread),
//! where the log's [`AppendCost`] allows it. "The only call in flight" is counted, not
//! guessed: a service call holds a [`CallInFlight`] from its admission to the end of its
//! record's append ([`AuditWriter::begin_call`]), and appends through it. With another call
//! in flight, a free lock and an empty queue are a moment between batches, not idleness: a
//! caller that committed a batch of one then (the dearest transaction per record, with the
//! calls behind it on its worker waiting) would keep the batches from forming, so it queues.
//! Who commits in place, by the log's cost:
//!
//! - [`AppendCost::PageCache`] (SQLite in `process` durability): any caller, an RPC on its
//!   tokio worker too ([`AuditWriter::append`]). A batch of one is then a few writes into the
//!   page cache, tens of microseconds, less than the hand-off. It runs directly on the worker,
//!   not in `block_in_place` (which hands the worker's tasks to another thread on every call,
//!   a hand-off as dear as the one saved, and spread freed memory over ever more threads'
//!   heaps: `abuse::responses_nobody_reads_are_dropped_after_the_send_timeout` failed about
//!   one run in two with it). Nothing on that path waits: the log's
//!   [`AuditAppend::append_without_waiting`] gives the record back, having written nothing,
//!   when another process holds the write lock or the commit would sync (the first after a
//!   checkpoint), and the WAL checkpoints run on the writer thread, not inside a commit
//!   ([`AuditAppend::wal_checkpoint`]); the record then goes to the thread.
//! - [`AppendCost::Fsync`] (SQLite in `fsync` durability): blocking callers
//!   ([`AuditWriter::append_blocking`]: commands), and the lone RPC ([`CallInFlight`]) when
//!   the log syncs apart from its commits: it commits without waiting, exactly as above,
//!   releases the commit lock, then `fdatasync`s the WAL on its own worker before it returns.
//!   That worker waits for the disk (≈ 0.2–0.5 ms here), which no other call on it does: the
//!   call is alone. A call that arrives meanwhile runs on another worker and queues for the
//!   thread (the lone call is still in flight), whose commit the released lock does not hold
//!   up. The two hand-offs saved cost, on this kind of machine, about as much as the fsync
//!   (docs/PERFORMANCE.md). Other RPCs and service tasks queue for the thread.
//! - [`AppendCost::RoundTrips`] (PostgreSQL): nobody; every record goes to the thread.
//!
//! The promise is the same either way: the call returns after its record's transaction
//! committed (with its fsync in `fsync` durability), records are chained in commit order, and
//! a failed commit fails its calls closed in the same way. Under load other calls are in
//! flight, so calls queue for the thread and batches form as before.
//!
//! Requests the transport has received and not yet answered count as well
//! ([`AuditWriter::arrivals`], fed by the guard): a call commits in place only when no other
//! request is pending either, and under load the thread waits a bounded while for their
//! records before it commits, so that one commit carries them ([`super::arrivals`]).
//!
//! In pipelined `fsync` durability (see [`run`]) the writer thread hands each committed batch
//! to the sync thread, which syncs and answers, while the writer commits the next one. A
//! batch with nobody behind it (nothing queued, no other call in flight, the sync thread
//! idle) is synced and answered by the writer thread itself: a record that reaches the thread
//! alone (a service task's, or an RPC's whose commit in place was given back, e.g. the first
//! after a checkpoint) then pays two hand-offs (to the writer and back) instead of three, and
//! nothing is there to overlap with the sync. The lone RPC itself syncs on its worker (above).
//! Either way a batch is answered only after a sync that began after its commit.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::arrivals::{Arrivals, Gathering};
use super::chain::ChainKeys;
use super::log::{AppendCost, AuditLog};
use super::record::AuditRecord;
use crate::error::{Error, Result};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4096;

struct Job {
    record: AuditRecord,
    done: Reply,
    /// Its caller is counted in [`Shared::calls`] (it appends through a [`CallInFlight`]).
    counted: bool,
}

/// What the writer thread receives.
// Not boxed: every record passes through here, a wake-up is rare, and a box would be one more
// allocation per record.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// A record to commit and whom to answer.
    Job(Job),
    /// A commit in place failed: records of failed calls now wait, so the thread retries
    /// them on its timer even if no other record arrives.
    Wake,
    /// Commits in place grew the log's WAL past its bound: the thread checkpoints it (off
    /// the callers' commit path).
    Checkpoint,
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

/// What the writer thread and the callers that commit in place share.
struct Shared {
    log: Box<dyn AuditLog>,
    /// Held by whoever commits (the thread for a batch, a caller for its own record), so one
    /// transaction runs at a time and each chains after the one before. It holds the records
    /// of calls failed closed, which the next commit that succeeds writes first.
    committing: Mutex<Deferred>,
    /// Records handed to the thread and not yet taken into a batch: while any wait, a caller
    /// queues behind them instead of committing in place (they came first, and a batch
    /// forming is a sign of load).
    queued: AtomicUsize,
    /// What an append costs: who may commit in place (see the module docs).
    cost: AppendCost,
    /// Audited calls in flight: the live [`CallInFlight`]s, each from its call's admission to
    /// the end of its record's append. A caller commits in place only when no other is.
    calls: AtomicUsize,
    /// Batches handed to the sync thread and not yet answered: while any are, the writer
    /// thread leaves the sync of the next batch to that thread (pipelining).
    syncing: AtomicUsize,
    /// A [`Message::Checkpoint`] is on its way: commits in place do not send another.
    checkpoint_asked: AtomicBool,
    commits: AtomicU64,
    in_place_commits: AtomicU64,
    wal_checkpoints: AtomicU64,
    busy_nanos: AtomicU64,
    /// Syncs made apart from the commits (pipelined `fsync` durability), and their time; of
    /// them, those the writer thread made itself for a batch with nobody behind it.
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    writer_syncs: AtomicU64,
    /// Sends only on a change, so watchers wake once per transition, not per commit.
    writable: tokio::sync::watch::Sender<bool>,
    /// The thread's wait for the records of requests received and not yet queued.
    gathering: Gathering,
    /// Test builds: the sync thread is refused, as an OS out of threads would.
    #[cfg(test)]
    refuse_sync_thread: bool,
}

/// Handle to the writer. Cloning shares it; the thread stops when every handle is dropped,
/// after committing what it was given.
#[derive(Clone)]
pub struct AuditWriter {
    jobs: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    keys: Arc<ChainKeys>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    writable: tokio::sync::watch::Receiver<bool>,
}

impl AuditWriter {
    /// Checks the end of `log` (logging what is wrong and recording the evidence of a cut
    /// tail) and starts the writer thread; `log` takes every append from then on. `keys` must
    /// be the chain keys `log` was opened with (they are handed out for fingerprints).
    /// The thread waits for the records of pending requests as [`Gathering::from_env`] says.
    pub fn start(log: Box<dyn AuditLog>, keys: Arc<ChainKeys>) -> Result<Self> {
        Self::start_gathering(log, keys, Gathering::from_env(Arrivals::default())?)
    }

    /// [`AuditWriter::start`] with the given wait for the records of pending requests.
    pub fn start_gathering(
        log: Box<dyn AuditLog>,
        keys: Arc<ChainKeys>,
        gathering: Gathering,
    ) -> Result<Self> {
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
        let (jobs, queue) = mpsc::channel::<Message>();
        // Starts true: the tail check above has just read and, if needed, written the log.
        let (writable_tx, writable) = tokio::sync::watch::channel(true);
        let shared = Arc::new(Shared {
            cost: log.append_cost(),
            checkpoint_asked: AtomicBool::new(false),
            log,
            committing: Mutex::new(Deferred::default()),
            queued: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            syncing: AtomicUsize::new(0),
            commits: AtomicU64::new(0),
            in_place_commits: AtomicU64::new(0),
            wal_checkpoints: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            sync_nanos: AtomicU64::new(0),
            writer_syncs: AtomicU64::new(0),
            writable: writable_tx,
            gathering,
            #[cfg(test)]
            refuse_sync_thread: tests::REFUSE_SYNC_THREAD.with(std::cell::Cell::get),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                thread_shared.gathering.set_waiter();
                run(&thread_shared, &queue);
            })
            .map_err(|e| Error::Internal(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            jobs,
            shared,
            keys,
            thread: Arc::new(Mutex::new(Some(thread))),
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
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// How many of [`AuditWriter::commits`] a caller made in place, for its own record,
    /// instead of the writer thread.
    pub fn in_place_commits(&self) -> u64 {
        self.shared.in_place_commits.load(Ordering::Relaxed)
    }

    /// How many WAL checkpoints the writer thread ran (off the commit path; see
    /// [`AuditAppend::wal_checkpoint`](super::log::AuditAppend::wal_checkpoint)).
    pub fn wal_checkpoints(&self) -> u64 {
        self.shared.wal_checkpoints.load(Ordering::Relaxed)
    }

    /// Total time spent in transactions (appending, committing, and the fsync unless it is
    /// pipelined), in nanoseconds: against wall time, how busy the one log is.
    pub fn busy_nanos(&self) -> u64 {
        self.shared.busy_nanos.load(Ordering::Relaxed)
    }

    /// How many syncs the writer made apart from its commits (pipelined `fsync` durability;
    /// 0 otherwise), on the sync thread or, for a batch with nobody behind it, on the writer
    /// thread: with [`AuditWriter::commits`], how many batches each sync covered.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// How many of [`AuditWriter::syncs`] the writer thread made itself, for a batch with
    /// nobody behind it (see the module docs), instead of handing it to the sync thread.
    pub fn writer_syncs(&self) -> u64 {
        self.shared.writer_syncs.load(Ordering::Relaxed)
    }

    /// Total time spent in the syncs of [`AuditWriter::syncs`], in nanoseconds.
    pub fn sync_nanos(&self) -> u64 {
        self.shared.sync_nanos.load(Ordering::Relaxed)
    }

    /// The count of requests received and not yet answered, for the transport's guard to
    /// feed: the writer thread waits for their records under load ([`super::arrivals`]).
    pub fn arrivals(&self) -> &Arrivals {
        self.shared.gathering.arrivals()
    }

    /// How many batches the writer thread held back for the records of pending requests.
    pub fn gathers(&self) -> u64 {
        self.shared.gathering.waits()
    }

    /// Audited calls in flight now: the live [`CallInFlight`]s.
    pub fn calls_in_flight(&self) -> usize {
        self.shared.calls.load(Ordering::Acquire)
    }

    /// Counts an audited call in flight until the returned value, through which the call
    /// appends its record, is dropped. A service call takes it when it is admitted to the
    /// audit path (before its work, not at its append), so that other callers know it will
    /// append soon: no caller commits in place while another call is in flight (see the
    /// module docs).
    pub fn begin_call(&self) -> CallInFlight {
        self.shared.calls.fetch_add(1, Ordering::AcqRel);
        CallInFlight {
            writer: self.clone(),
        }
    }

    /// The chain keys (for fingerprints and verification).
    pub fn keys(&self) -> &ChainKeys {
        &self.keys
    }

    /// Appends a record and waits until it is committed; returns its sequence number.
    ///
    /// Commits it on this task's thread when the writer is idle, no audited call is in flight
    /// ([`AuditWriter::calls_in_flight`]) and the log's [`AppendCost::PageCache`] allows it
    /// (without waiting for anything; see the module docs), else hands it to the writer
    /// thread. A service call appends through its [`CallInFlight`] instead.
    pub async fn append(&self, record: AuditRecord) -> Result<u64> {
        self.append_async(record, false).await
    }

    /// [`AuditWriter::append`] by a caller that is (`counted`) or is not one of the calls in
    /// flight.
    async fn append_async(&self, record: AuditRecord, counted: bool) -> Result<u64> {
        let record = match self.commit_in_place(record, Caller::Async, counted) {
            InPlace::Done(committed) => return committed,
            InPlace::Busy(record) => record,
        };
        let (tx, rx) = oneshot::channel();
        self.queue(Job {
            record,
            done: Reply::Async(tx),
            counted,
        })?;
        rx.await
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?
    }

    /// Appends a record from a non-async context and waits until it is committed: on this
    /// thread when the writer is idle and no audited call is in flight, else on the writer
    /// thread.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<u64> {
        let record = match self.commit_in_place(record, Caller::Blocking, false) {
            InPlace::Done(committed) => return committed,
            InPlace::Busy(record) => record,
        };
        let (tx, rx) = mpsc::sync_channel(1);
        self.queue(Job {
            record,
            done: Reply::Blocking(tx),
            counted: false,
        })?;
        rx.recv()
            .map_err(|_| Error::Unavailable("audit writer stopped".into()))?
    }

    /// Hands a job to the writer thread.
    fn queue(&self, job: Job) -> Result<()> {
        // Counted before it is sent, so a caller that looks after this one sees it waiting.
        let queued = self.shared.queued.fetch_add(1, Ordering::AcqRel) + 1;
        self.jobs.send(Message::Job(job)).map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            Error::Unavailable("audit writer stopped".into())
        })?;
        // After the send: a thread woken now finds the record in the channel.
        self.shared.gathering.queued(queued, MAX_BATCH);
        Ok(())
    }

    /// Commits `record` on this thread when the writer is idle and no other audited call is
    /// in flight (`counted`: the caller is one of [`Shared::calls`]; see the module docs): the
    /// outcome, as the writer thread would have answered it; or the record back when the
    /// writer is busy or another call in flight (or this thread must not block, or the log
    /// would make it wait), for the caller to queue.
    fn commit_in_place(&self, record: AuditRecord, caller: Caller, counted: bool) -> InPlace {
        let shared = &*self.shared;
        // `waits`: the caller may wait for the disk or another process's lock during the
        // commit; `syncs_after`: it commits without waiting, then syncs on its own thread
        // (the lone RPC in `fsync` durability, see the module docs).
        let (waits, syncs_after) = match (caller, shared.cost) {
            (Caller::Async, AppendCost::Fsync) if counted && shared.log.syncs_apart() => {
                (false, true)
            }
            (_, AppendCost::RoundTrips) | (Caller::Async, AppendCost::Fsync) => {
                return InPlace::Busy(record);
            }
            (Caller::Async, AppendCost::PageCache) => (false, false),
            (Caller::Blocking, AppendCost::Fsync | AppendCost::PageCache) => (true, false),
        };
        // Records waiting for the thread came first; another call in flight is about to
        // append, or another request received may be: either way a batch is forming, and
        // this record joins it.
        if shared.queued.load(Ordering::Acquire) > 0
            || shared.calls.load(Ordering::Acquire) > usize::from(counted)
            || shared.gathering.arrivals().pending() > usize::from(counted)
        {
            return InPlace::Busy(record);
        }
        // A blocking caller may wait: outside a runtime, and through `block_in_place` on the
        // multi-threaded runtime; a current-thread runtime has no other thread for its tasks.
        let runtime = if waits {
            tokio::runtime::Handle::try_current().ok()
        } else {
            None
        };
        if runtime
            .as_ref()
            .is_some_and(|h| h.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread)
        {
            return InPlace::Busy(record);
        }
        let mut deferred = match shared.committing.try_lock() {
            Ok(guard) => guard,
            // A panic elsewhere while committing leaves the queue of late records whole.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return InPlace::Busy(record),
        };
        if !waits && !deferred.records.is_empty() {
            // Records of calls failed closed wait (up to `MAX_DEFERRED`): writing them is the
            // thread's work, not a detour of one call on an async worker.
            return InPlace::Busy(record);
        }
        let committed = if waits {
            let mut commit = || shared.commit_batch(&mut deferred, &[&record]).map(Some);
            if runtime.is_some() {
                tokio::task::block_in_place(commit)
            } else {
                commit()
            }
        } else {
            // On an async worker: nothing here waits (the log gives up instead; in a log that
            // syncs apart the records are not yet durable).
            // No late records ride along (see above), so none waits for the sync after.
            shared
                .commit_with(&mut deferred, &[&record], |all| {
                    shared.log.append_without_waiting(all)
                })
                .map(|committed| committed.map(|c| c.first_seq))
        };
        match committed {
            Ok(Some(seq)) => {
                drop(deferred);
                shared.in_place_commits.fetch_add(1, Ordering::Relaxed);
                if shared.log.wal_checkpoint_due()
                    && !shared.checkpoint_asked.swap(true, Ordering::AcqRel)
                {
                    // Not answered: the caller does not wait for the checkpoint.
                    let _ = self.jobs.send(Message::Checkpoint);
                }
                if syncs_after {
                    return InPlace::Done(sync_alone(shared, record, seq));
                }
                InPlace::Done(Ok(seq))
            }
            // The log would have waited: nothing was written, the thread commits it.
            Ok(None) => InPlace::Busy(record),
            Err(e) => {
                deferred.keep(late(record));
                drop(deferred);
                // The thread retries the late records on its timer from now on.
                let _ = self.jobs.send(Message::Wake);
                InPlace::Done(Err(e))
            }
        }
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

/// One audited call in flight ([`AuditWriter::begin_call`]): counted from its admission until
/// this is dropped, which [`CallInFlight::append`] does once the call's record is committed (or
/// failed closed). A call dropped before it appends stops counting then.
pub struct CallInFlight {
    writer: AuditWriter,
}

impl CallInFlight {
    /// The call's record: [`AuditWriter::append`], except that the call itself does not count
    /// as another call in flight. The call stops counting when this returns.
    pub async fn append(self, record: AuditRecord) -> Result<u64> {
        self.writer.append_async(record, true).await
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.writer.shared.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Who asks to commit in place.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// A task on an async worker thread: must not wait.
    Async,
    /// A blocking thread (or a task that blocks through `block_in_place`): may wait.
    Blocking,
}

/// What [`AuditWriter::commit_in_place`] did with a record.
// Not boxed: it lives on the stack for one call, and a box would be an allocation per record.
#[allow(clippy::large_enum_variant)]
enum InPlace {
    /// Committed it, or failed it closed: the caller's answer.
    Done(Result<u64>),
    /// Left it: the writer is busy (or this thread must not block, or the log would have
    /// made it wait); queue it.
    Busy(AuditRecord),
}

/// Most records kept in memory for a late write while the store cannot write. Past it the
/// oldest are dropped, with an error in the log.
const MAX_DEFERRED: usize = 65_536;
/// How often deferred records are retried when no new record arrives.
const RETRY_DEFERRED: Duration = Duration::from_secs(1);

/// Records of calls that were failed closed, written first by the next commit that succeeds.
#[derive(Default)]
struct Deferred {
    records: VecDeque<AuditRecord>,
    dropped: u64,
}

impl Deferred {
    /// Keeps a late record, dropping the oldest past [`MAX_DEFERRED`].
    fn keep(&mut self, record: AuditRecord) {
        if self.records.len() >= MAX_DEFERRED {
            self.records.pop_front();
            self.dropped += 1;
            tracing::error!(
                dropped = self.dropped,
                "audit store unwritable for long: dropped the oldest late record"
            );
        }
        self.records.push_back(record);
    }

    /// Keeps again what a batch that is not known durable wrote: first the late records its
    /// commit carried, as they are, then each call's record as late. Returns the replies of
    /// its calls, to be failed closed.
    fn keep_unsynced(&mut self, batch: Unsynced) -> Vec<Reply> {
        for record in batch.late {
            self.keep(record);
        }
        batch
            .jobs
            .into_iter()
            .map(|job| {
                self.keep(late(job.record));
                job.done
            })
            .collect()
    }
}

/// The error each call of a failed commit gets: UNAVAILABLE, and no result.
fn unrecorded() -> Error {
    Error::Unavailable("the audit store cannot record this call; no result was returned".into())
}

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

impl Shared {
    /// Checkpoints the log's WAL if it has grown past its bound, holding the commit lock
    /// meanwhile, so that a caller looking to commit in place finds it busy and queues instead
    /// of waiting for the checkpoint on the log's connection.
    fn checkpoint_if_due(&self) {
        // Cleared first: a commit in place from now on may ask again.
        self.checkpoint_asked.store(false, Ordering::Release);
        if !self.log.wal_checkpoint_due() {
            return;
        }
        let _committing = self.lock();
        match self.log.wal_checkpoint() {
            Ok(()) => {
                self.wal_checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing is lost: the WAL stays as it is and the next batch tries again.
            Err(e) => tracing::warn!(error = %e, "audit log checkpoint failed"),
        }
    }

    /// Whether nobody is behind a batch whose callers are `jobs`, just committed unsynced:
    /// nothing queued, no audited call in flight but its own, and the sync thread idle. Its
    /// sync then overlaps with nothing, and the writer thread makes it itself (one hand-off
    /// less for a record that reached the thread alone) instead of handing the batch to the
    /// sync thread.
    fn nobody_behind(&self, jobs: &[Job]) -> bool {
        let own = jobs.iter().filter(|job| job.counted).count();
        self.queued.load(Ordering::Acquire) == 0
            && self.syncing.load(Ordering::Acquire) == 0
            && self.calls.load(Ordering::Acquire) <= own
    }

    /// The commit lock, waiting for a commit in progress to end.
    fn lock(&self) -> MutexGuard<'_, Deferred> {
        self.committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One transaction: the late records of `deferred` (the commit lock's content), then
    /// `records`. Returns the sequence number of the first of `records`; the late ones are
    /// then written and forgotten. On failure nothing is written and the error is the one each
    /// caller of `records` gets; keeping their records as late is the caller's part.
    fn commit_batch(&self, deferred: &mut Deferred, records: &[&AuditRecord]) -> Result<u64> {
        // `append` is durable when it returns: the late records written are done with.
        self.commit_with(deferred, records, |all| self.log.append(all).map(Some))?
            .map(|committed| committed.first_seq)
            .ok_or_else(|| Error::internal("an audit append that waits gave up"))
    }

    /// [`Shared::commit_batch`] through `append`, which may give up (`Ok(None)`) having
    /// written nothing: then nothing is counted or changed, and `None` is returned. On
    /// success the late records written leave `deferred` and come back in [`Committed`]: an
    /// `append` not yet durable hands them to its sync, which keeps them again if it fails.
    fn commit_with(
        &self,
        deferred: &mut Deferred,
        records: &[&AuditRecord],
        append: impl FnOnce(&[&AuditRecord]) -> Result<Option<u64>>,
    ) -> Result<Option<Committed>> {
        let late_count = deferred.records.len();
        let all: Vec<&AuditRecord> = deferred
            .records
            .iter()
            .chain(records.iter().copied())
            .collect();
        let started = std::time::Instant::now();
        let result = match append(&all) {
            Ok(None) => return Ok(None),
            Ok(Some(first)) => Ok(first),
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        crate::metrics::global().audit_commit(all.len(), elapsed, result.is_ok());
        self.busy_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let ok = result.is_ok();
        self.writable.send_if_modified(|writable| {
            let changed = *writable != ok;
            *writable = ok;
            changed
        });
        match result {
            Ok(first) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                if late_count > 0 {
                    tracing::warn!(
                        records = late_count,
                        "audit store writable again: recorded the calls failed closed meanwhile"
                    );
                }
                Ok(Some(Committed {
                    first_seq: first + late_count as u64,
                    late: std::mem::take(&mut deferred.records),
                }))
            }
            Err(e) => {
                // The log reconnects on the next append.
                tracing::error!(error = %e, records = records.len(), "audit commit failed; failing the calls closed");
                Err(unrecorded())
            }
        }
    }
}

/// What a successful commit wrote besides its own records.
struct Committed {
    /// The sequence number of the first of the commit's own records.
    first_seq: u64,
    /// The late records written before them, in order (see [`Deferred`]).
    late: VecDeque<AuditRecord>,
}

/// A batch committed but not yet known durable, with the sequence number of its first record:
/// its callers are answered by the sync thread.
struct Unsynced {
    jobs: Vec<Job>,
    first_seq: u64,
    /// Late records written by the same commit: their calls were answered long ago, but the
    /// records are durable only with this batch's sync, and a failed one keeps them again.
    late: VecDeque<AuditRecord>,
}

fn run(shared: &Shared, queue: &mpsc::Receiver<Message>) {
    if shared.log.syncs_apart() {
        // Pipelined fsync: this thread commits batch N+1 while the sync thread makes batch N
        // durable, and the callers of a batch are answered only after a sync that began after
        // their commit returned.
        std::thread::scope(|scope| {
            let (to_sync, unsynced) = mpsc::channel::<Unsynced>();
            #[cfg(test)]
            let refused = shared.refuse_sync_thread;
            #[cfg(not(test))]
            let refused = false;
            let syncer = if refused {
                Err(std::io::Error::other("refused by the test"))
            } else {
                std::thread::Builder::new()
                    .name("audit-sync".into())
                    .spawn_scoped(scope, move || sync_loop(shared, &unsynced))
            };
            match syncer {
                Ok(_) => run_batches(shared, queue, Some(&to_sync)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the audit sync thread; syncing each commit in turn");
                    run_batches(shared, queue, None);
                }
            }
            // `to_sync` is dropped here: the sync thread answers what is left and ends, and
            // the scope waits for it.
        });
    } else {
        run_batches(shared, queue, None);
    }
    let mut deferred = shared.lock();
    if !deferred.records.is_empty() {
        // Shutting down: one last try, so a fault cleared just before the end loses nothing.
        let records = deferred.records.len();
        if shared.commit_batch(&mut deferred, &[]).is_err() {
            tracing::error!(
                records,
                "records of calls failed closed could not be written before shutdown"
            );
        }
    }
}

/// The batching loop, until every handle is dropped. With `to_sync`, batches commit unsynced
/// and go to the sync thread to be made durable and answered; otherwise each commit is
/// durable when it returns and this thread answers.
fn run_batches(
    shared: &Shared,
    queue: &mpsc::Receiver<Message>,
    to_sync: Option<&mpsc::Sender<Unsynced>>,
) {
    // Group commit: block for the first job, then take whatever else is already waiting. An
    // idle service thus commits a lone record at once (when its caller did not commit it in
    // place); under load, the jobs that queued while the previous transaction ran form the
    // next batch, so the batch size follows the load.
    let mut batch: Vec<Job> = Vec::new();
    // Records of failed calls wait: retry them on a timer even if nothing arrives. A failed
    // sync leaves them from the sync thread or from a lone call's worker (`sync_alone`),
    // neither of which wakes this thread: in a log that syncs apart, with a sync thread or
    // without one, the timer always runs.
    let mut retrying = false;
    let syncs_apart = shared.log.syncs_apart();
    loop {
        let first = if retrying || syncs_apart {
            match queue.recv_timeout(RETRY_DEFERRED) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match queue.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            }
        };
        match first {
            Some(Message::Wake) => {
                retrying = true;
                continue;
            }
            Some(Message::Checkpoint) => {
                shared.checkpoint_if_due();
                continue;
            }
            // Before the lock, the record still counted queued (no caller commits in place
            // meanwhile): under load, the records of requests received join this batch. Only
            // where a commit is a few writes into the page cache: an fsync or a database round
            // trip already gathers the records that arrive meanwhile, and at 64 in flight a
            // wait on top bought `fsync` nothing (docs/PERFORMANCE.md).
            Some(Message::Job(_)) if shared.cost == AppendCost::PageCache => {
                shared.gathering.wait(&shared.queued, MAX_BATCH);
            }
            Some(Message::Job(_)) | None => {}
        }
        // Waits for a commit in place to end: its record chains before this batch.
        let mut deferred = shared.lock();
        let take = |message: Message, batch: &mut Vec<Job>| {
            if let Message::Job(job) = message {
                shared.queued.fetch_sub(1, Ordering::AcqRel);
                batch.push(job);
            }
        };
        if let Some(message) = first {
            take(message, &mut batch);
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(message) => take(message, &mut batch),
                Err(_) => break,
            }
        }
        if batch.is_empty() && deferred.records.is_empty() {
            // A wake-up whose late records a commit in place has written since.
            retrying = false;
            continue;
        }
        let records: Vec<&AuditRecord> = batch.iter().map(|j| &j.record).collect();
        let committed = shared
            .commit_with(&mut deferred, &records, |all| {
                // With a sync thread, durability comes from its sync, not from this commit.
                if to_sync.is_some() {
                    shared.log.append_unsynced(all)
                } else {
                    shared.log.append(all)
                }
                .map(Some)
            })
            .and_then(|first| {
                first.ok_or_else(|| Error::internal("an audit append that waits gave up"))
            });
        drop(records);
        // A batch with nobody behind it, synced and answered by this thread below.
        let mut lone = None;
        let replies: Vec<(Reply, Result<u64>)> = match (committed, to_sync) {
            (Ok(committed), Some(to_sync)) => {
                let unsynced = Unsynced {
                    jobs: std::mem::take(&mut batch),
                    first_seq: committed.first_seq,
                    late: committed.late,
                };
                if shared.nobody_behind(&unsynced.jobs) {
                    lone = Some(unsynced);
                    Vec::new()
                } else {
                    // Counted before it is sent: the sync thread counts it down once answered.
                    shared.syncing.fetch_add(1, Ordering::AcqRel);
                    match to_sync.send(unsynced) {
                        Ok(()) => Vec::new(),
                        // The sync thread is gone (it panicked): nobody can say these are
                        // durable.
                        Err(mpsc::SendError(lost)) => {
                            shared.syncing.fetch_sub(1, Ordering::AcqRel);
                            deferred
                                .keep_unsynced(lost)
                                .into_iter()
                                .map(|reply| (reply, Err(unrecorded())))
                                .collect()
                        }
                    }
                }
            }
            (Ok(committed), None) => batch
                .drain(..)
                .zip(committed.first_seq..)
                .map(|(job, seq)| (job.done, Ok(seq)))
                .collect(),
            (Err(_), _) => batch
                .drain(..)
                .map(|job| {
                    deferred.keep(late(job.record));
                    (job.done, Err(unrecorded()))
                })
                .collect(),
        };
        retrying = !deferred.records.is_empty();
        // Answered after the lock is let go: a caller may commit in place meanwhile.
        drop(deferred);
        for (reply, result) in replies {
            reply.send(result);
        }
        if let Some(lone) = lone {
            // The sync began after the commit returned, as on the sync thread; a record
            // queued meanwhile waits for it, and goes through the sync thread if another
            // follows.
            shared.writer_syncs.fetch_add(1, Ordering::Relaxed);
            sync_and_answer(shared, &mut vec![lone]);
        }
        // After the answers: no caller waits for it.
        shared.checkpoint_if_due();
    }
}

/// The sync thread of pipelined `fsync` durability: takes every batch committed since its last
/// sync, syncs once (a sync begun after their commits returned covers them all), then answers
/// their callers. A failed sync fails every call of the batches it covered closed, as a failed
/// commit does (UNAVAILABLE, no result), and their records are written again as late by the
/// next commit that succeeds: the first copy is in the file but not known durable
/// (docs/AUDIT.md, "Pipelined fsync").
fn sync_loop(shared: &Shared, unsynced: &mpsc::Receiver<Unsynced>) {
    let mut pending: Vec<Unsynced> = Vec::new();
    while let Ok(first) = unsynced.recv() {
        pending.push(first);
        while let Ok(more) = unsynced.try_recv() {
            pending.push(more);
        }
        let batches = pending.len();
        sync_and_answer(shared, &mut pending);
        // Idle again once every batch it took is answered: the writer thread may then sync a
        // batch with nobody behind it itself.
        shared.syncing.fetch_sub(batches, Ordering::AcqRel);
    }
}

/// Syncs the lone RPC's record, committed in place at `seq` without its sync, on the calling
/// worker (the commit lock released: a batch that comes meanwhile commits and goes to the sync
/// thread): the answer [`sync_and_answer`] gives, by the same rules.
fn sync_alone(shared: &Shared, record: AuditRecord, seq: u64) -> Result<u64> {
    let (tx, mut rx) = oneshot::channel();
    let job = Job {
        record,
        done: Reply::Async(tx),
        counted: true,
    };
    sync_and_answer(
        shared,
        &mut vec![Unsynced {
            jobs: vec![job],
            first_seq: seq,
            late: VecDeque::new(),
        }],
    );
    rx.try_recv()
        .unwrap_or_else(|_| Err(Error::internal("an audit sync answered nothing")))
}

/// Syncs once (a sync begun after the commits of `pending` returned covers them all), then
/// answers their callers; a failed sync fails them closed and keeps their records as late
/// (see [`sync_loop`]). `pending` is left empty.
fn sync_and_answer(shared: &Shared, pending: &mut Vec<Unsynced>) {
    let started = std::time::Instant::now();
    let synced = shared.log.sync_committed();
    shared.sync_nanos.fetch_add(
        u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    match synced {
        Ok(()) => {
            shared.syncs.fetch_add(1, Ordering::Relaxed);
            for batch in pending.drain(..) {
                for (job, seq) in batch.jobs.into_iter().zip(batch.first_seq..) {
                    job.done.send(Ok(seq));
                }
            }
        }
        Err(e) => {
            let calls: usize = pending.iter().map(|b| b.jobs.len()).sum();
            tracing::error!(error = %e, calls, "audit sync failed; failing the calls it covered closed");
            shared.writable.send_if_modified(|writable| {
                let changed = *writable;
                *writable = false;
                changed
            });
            let mut deferred = shared.lock();
            let replies: Vec<Reply> = pending
                .drain(..)
                .flat_map(|batch| deferred.keep_unsynced(batch))
                .collect();
            drop(deferred);
            for reply in replies {
                reply.send(Err(unrecorded()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::{Path, PathBuf};

    use super::*;
    use crate::audit::Outcome;
    use crate::audit::log::{AuditMaintenance, AuditQuery, Durability, ListFilter};
    use crate::audit::sqlite::{DEFAULT_BUSY_TIMEOUT, SqliteAuditLog, SyncFault};
    use crate::audit::verify::tests::record;
    use crate::crypto::secret::SecretKey;

    thread_local! {
        /// Set while a test starts a writer whose sync thread must be refused.
        pub(super) static REFUSE_SYNC_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        keys: Arc<ChainKeys>,
        writer: AuditWriter,
        sync_fault: Arc<SyncFault>,
    }

    /// A writer over a fresh SQLite log in `process` durability whose appends wait at most
    /// `busy_timeout` for another connection's lock.
    fn fixture(busy_timeout: Duration) -> Fixture {
        fixture_with(Durability::Process, busy_timeout)
    }

    /// [`fixture`] with the given durability.
    fn fixture_with(durability: Durability, busy_timeout: Duration) -> Fixture {
        fixture_gathering(
            durability,
            busy_timeout,
            // The defaults, whatever the test's environment says.
            Gathering::new(
                Arrivals::default(),
                crate::audit::arrivals::DEFAULT_GATHER_BOUND,
                crate::audit::arrivals::DEFAULT_GATHER_SIBLINGS,
            ),
        )
    }

    /// [`fixture_with`] whose thread waits for pending requests as `gathering` says.
    fn fixture_gathering(
        durability: Durability,
        busy_timeout: Duration,
        gathering: Gathering,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
        let log = SqliteAuditLog::open(&path, durability, busy_timeout, Arc::clone(&keys)).unwrap();
        let sync_fault = log.sync_fault();
        let writer =
            AuditWriter::start_gathering(Box::new(log), Arc::clone(&keys), gathering).unwrap();
        Fixture {
            _dir: dir,
            path,
            keys,
            writer,
            sync_fault,
        }
    }

    /// The first ten records `reader` lists, in order.
    fn first_records(reader: &SqliteAuditLog) -> Vec<(u64, AuditRecord)> {
        reader
            .list(&ListFilter {
                limit: 10,
                ..ListFilter::default()
            })
            .unwrap()
    }

    /// Each listed record's sequence number, request id and outcome.
    fn seq_ids_outcomes(rows: &[(u64, AuditRecord)]) -> Vec<(u64, &str, Outcome)> {
        rows.iter()
            .map(|(seq, r)| (*seq, r.request_id.as_str(), r.outcome))
            .collect()
    }

    /// Another connection to the log, as a reader of committed records.
    fn reader(path: &Path, keys: &Arc<ChainKeys>) -> SqliteAuditLog {
        SqliteAuditLog::open(
            path,
            Durability::Process,
            DEFAULT_BUSY_TIMEOUT,
            Arc::clone(keys),
        )
        .unwrap()
    }

    /// The record committed at `seq`, as another connection sees it.
    fn committed_at(reader: &SqliteAuditLog, seq: u64) -> Option<AuditRecord> {
        reader
            .list(&ListFilter {
                after_seq: seq - 1,
                limit: 1,
                ..ListFilter::default()
            })
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, r)| r)
    }

    /// Appends `record` from a thread and checks, as soon as the answer comes, that the
    /// record is committed at the sequence number answered.
    fn append_and_check(
        writer: &AuditWriter,
        reader: &SqliteAuditLog,
        record: AuditRecord,
    ) -> Result<u64> {
        let id = record.request_id.clone();
        let seq = writer.append_blocking(record)?;
        let found = committed_at(reader, seq).expect("answered before its commit");
        assert_eq!(found.request_id, id, "answered with another record's seq");
        Ok(seq)
    }

    /// Waits until `n` records are queued for the thread (they found the commit lock held).
    fn wait_queued(writer: &AuditWriter, n: usize) {
        while writer.shared.queued.load(Ordering::Acquire) < n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_lone_record_commits_in_place_and_records_behind_a_commit_go_to_the_thread() {
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        assert_eq!(append_and_check(&f.writer, &reader, record(1)).unwrap(), 1);
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (1, 1));

        // A commit in progress (the lock held): callers queue for the thread instead.
        let held = f.writer.shared.lock();
        let seqs = std::thread::scope(|scope| {
            let callers: Vec<_> = (2..=6)
                .map(|i| {
                    let (writer, reader) = (&f.writer, &reader);
                    scope.spawn(move || append_and_check(writer, reader, record(i)).unwrap())
                })
                .collect();
            wait_queued(&f.writer, 5);
            assert_eq!(
                f.writer.commits(),
                1,
                "nothing commits while the lock is held"
            );
            drop(held);
            let mut seqs: Vec<u64> = callers.into_iter().map(|c| c.join().unwrap()).collect();
            seqs.sort_unstable();
            seqs
        });
        assert_eq!(seqs, [2, 3, 4, 5, 6]);
        assert_eq!(
            f.writer.in_place_commits(),
            1,
            "the queued records went to the thread"
        );
        assert!(f.writer.commits() <= 6);
        assert_eq!(f.writer.shared.queued.load(Ordering::Acquire), 0);

        // Idle again: the next lone record commits in place, after the batch.
        assert_eq!(append_and_check(&f.writer, &reader, record(7)).unwrap(), 7);
        assert_eq!(f.writer.in_place_commits(), 2);
        let report = reader.verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records_checked, 7);
    }

    #[test]
    fn commits_in_place_and_batches_interleave_on_a_runtime_and_the_chain_stays_whole() {
        const TASKS: u32 = 12;
        const EACH: u32 = 20;
        const THREADS: u32 = 2;
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = Arc::new(reader(&f.path, &f.keys));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let mut seqs: Vec<u64> = std::thread::scope(|scope| {
            // Callers outside the runtime too, as the commands are.
            let blocking: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (writer, reader) = (&f.writer, &reader);
                    scope.spawn(move || {
                        (0..EACH)
                            .map(|i| {
                                let n = 10_000 * (TASKS + t + 1) + i;
                                append_and_check(writer, reader, record(n)).unwrap()
                            })
                            .collect::<Vec<u64>>()
                    })
                })
                .collect();
            let mut seqs = runtime.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                for t in 0..TASKS {
                    let writer = f.writer.clone();
                    let reader = Arc::clone(&reader);
                    tasks.spawn(async move {
                        let mut seqs = Vec::new();
                        for i in 0..EACH {
                            let record = record(10_000 * (t + 1) + i);
                            let id = record.request_id.clone();
                            let seq = writer.append(record).await.unwrap();
                            let found = committed_at(&reader, seq).expect("answered early");
                            assert_eq!(found.request_id, id);
                            seqs.push(seq);
                            tokio::task::yield_now().await;
                        }
                        seqs
                    });
                }
                let mut seqs = Vec::new();
                while let Some(done) = tasks.join_next().await {
                    seqs.extend(done.unwrap());
                }
                seqs
            });
            for caller in blocking {
                seqs.extend(caller.join().unwrap());
            }
            seqs
        });
        seqs.sort_unstable();
        let total = u64::from((TASKS + THREADS) * EACH);
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<u64>>(),
            "each seq answered once"
        );
        assert!(
            f.writer.in_place_commits() >= 1,
            "the first caller found the writer idle"
        );
        assert!(f.writer.commits() <= total);
        let report = reader.verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records_checked, total);
    }

    #[test]
    fn an_async_caller_commits_in_place_only_when_the_log_commits_into_the_page_cache() {
        // A current-thread runtime: its one thread runs every task, so a commit in place there
        // ran on the async thread itself (`block_in_place` would panic on this runtime).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        for n in 1..=3 {
            let seq = runtime.block_on(f.writer.append(record(n))).unwrap();
            assert_eq!(seq, u64::from(n));
            assert!(
                committed_at(&reader, seq).is_some(),
                "answered before its commit"
            );
        }
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (3, 3));

        // `fsync`: a worker must not wait for the disk; the record goes to the thread. A
        // blocking caller still commits its own.
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        assert_eq!(runtime.block_on(f.writer.append(record(1))).unwrap(), 1);
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (1, 0));
        assert_eq!(f.writer.append_blocking(record(2)).unwrap(), 2);
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (2, 1));
    }

    #[test]
    fn an_async_caller_does_not_wait_for_another_writers_lock_but_queues() {
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        // Another process's write transaction (as `rotate` appending): an async caller gives
        // up at once, writing nothing, and hands its record back to be queued (waiting, it
        // would fail after the busy timeout instead).
        let other = rusqlite::Connection::open(&f.path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        match f.writer.commit_in_place(record(1), Caller::Async, false) {
            InPlace::Busy(record) => assert_eq!(record.request_id, "r1"),
            InPlace::Done(done) => panic!("committed or failed in place: {:?}", done.err()),
        }
        assert!(*f.writer.writable().borrow(), "nothing failed");
        // The thread waits for the lock (its busy timeout) and commits the queued record.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        std::thread::scope(|scope| {
            let caller = scope.spawn(|| f.writer.append_blocking(record(2)));
            other.execute_batch("COMMIT").unwrap();
            assert_eq!(caller.join().unwrap().unwrap(), 1);
        });
        // Free again: the next one commits in place.
        assert_eq!(runtime.block_on(f.writer.append(record(3))).unwrap(), 2);
        assert_eq!(f.writer.in_place_commits(), 2);
        assert!(committed_at(&reader, 2).is_some());
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn a_failed_async_commit_in_place_fails_closed_and_is_recorded_late() {
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(f.writer.append(record(1))).unwrap(), 1);
        // An insert that fails (as on a full disk or an I/O error), not a lock held: the
        // commit in place itself fails.
        let intruder = rusqlite::Connection::open(&f.path).unwrap();
        intruder
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON audit_events \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .unwrap();
        let in_place = runtime.block_on(f.writer.append(record(2))).err().unwrap();
        assert!(matches!(in_place, Error::Unavailable(_)), "{in_place}");
        assert!(in_place.to_string().contains("no result was returned"));
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (1, 1));
        assert!(!*f.writer.writable().borrow());

        // A failed batch on the thread fails its call the same way.
        let held = f.writer.shared.lock();
        let grouped = std::thread::scope(|scope| {
            let caller = scope.spawn(|| f.writer.append_blocking(record(3)));
            wait_queued(&f.writer, 1);
            drop(held);
            caller.join().unwrap().err().unwrap()
        });
        assert_eq!(grouped.to_string(), in_place.to_string());
        assert_eq!(reader.count().unwrap(), 1, "nothing more was written");

        // The fault clears: the thread writes both late records by itself, in order.
        intruder.execute_batch("DROP TRIGGER refuse").unwrap();
        let mut writable = f.writer.writable();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), writable.wait_for(|w| *w))
                .await
                .expect("the late records are retried on the writer's timer")
                .unwrap();
        });
        let late: Vec<(u64, String, Outcome)> = reader
            .list(&ListFilter {
                after_seq: 1,
                limit: 10,
                ..ListFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|(seq, r)| (seq, r.request_id, r.outcome))
            .collect();
        assert_eq!(
            late,
            [
                (2, "r2".to_owned(), Outcome::Unavailable),
                (3, "r3".to_owned(), Outcome::Unavailable)
            ]
        );
        assert_eq!(runtime.block_on(f.writer.append(record(4))).unwrap(), 4);
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn commits_in_place_leave_checkpoints_to_the_thread_and_the_wal_stays_bounded() {
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let wal = {
            let mut wal = f.path.as_os_str().to_owned();
            wal.push("-wal");
            PathBuf::from(wal)
        };
        // 1 KiB pages, each WAL frame with its 24-byte header.
        let frame = 1024 + 24;
        let mut largest = 0;
        // Every commit writes at least two frames (the table's last leaf, the signed head;
        // about 2.4 on average, with the leaves' splits), so with no checkpoint the WAL would
        // reach at least 20,000 frames, past the hard bound of 16,384 asserted below.
        const CALLS: u32 = 10_000;
        for n in 1..=CALLS {
            runtime.block_on(f.writer.append(record(n))).unwrap();
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        // The WAL never grew past the hard bound (where an append checkpoints by itself),
        // and the thread checkpointed on its own.
        assert!(
            largest <= (4 * 4096 + 64) * frame,
            "WAL grew to {largest} bytes"
        );
        assert!(f.writer.wal_checkpoints() >= 1);
        assert!(f.writer.in_place_commits() > u64::from(CALLS) / 2);
        let report = reader(&f.path, &f.keys).verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records_checked, u64::from(CALLS));
    }

    #[test]
    fn a_failed_commit_in_place_fails_closed_like_a_failed_batch() {
        let f = fixture(Duration::from_millis(50));
        let reader = reader(&f.path, &f.keys);
        // Another connection holds the write lock past the writer's busy timeout: no commit
        // can happen (as with a full disk or an I/O error).
        let blocker = rusqlite::Connection::open(&f.path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

        let in_place = f.writer.append_blocking(record(1)).err().unwrap();
        assert!(matches!(in_place, Error::Unavailable(_)), "{in_place}");
        assert!(
            !*f.writer.writable().borrow(),
            "the writer says it cannot write"
        );
        assert_eq!(f.writer.in_place_commits(), 0);

        let held = f.writer.shared.lock();
        let grouped = std::thread::scope(|scope| {
            let caller = scope.spawn(|| f.writer.append_blocking(record(2)));
            wait_queued(&f.writer, 1);
            drop(held);
            caller.join().unwrap().err().unwrap()
        });
        assert_eq!(
            grouped.to_string(),
            in_place.to_string(),
            "both paths fail a call the same way"
        );
        assert!(in_place.to_string().contains("no result was returned"));
        assert_eq!(reader.count().unwrap(), 0, "nothing was written");

        // The fault clears: the thread writes both calls' records, as late, by itself.
        blocker.execute_batch("ROLLBACK").unwrap();
        let mut writable = f.writer.writable();
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(60), writable.wait_for(|w| *w))
                    .await
                    .expect("the late records are retried on the writer's timer")
                    .unwrap();
            });
        let rows = first_records(&reader);
        let late = seq_ids_outcomes(&rows);
        assert_eq!(
            late,
            [
                (1, "r1", Outcome::Unavailable),
                (2, "r2", Outcome::Unavailable)
            ],
            "in the order the calls failed"
        );
        assert!(
            rows.iter()
                .all(|(_, r)| r.detail.starts_with("recorded late"))
        );
        assert_eq!(append_and_check(&f.writer, &reader, record(3)).unwrap(), 3);
        assert!(reader.verify().unwrap().ok);
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn pipelined_fsync_answers_a_batch_only_after_a_sync_that_began_after_its_commit() {
        const CALLS: u32 = 24;
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        // Another audited call in flight throughout, as under load: a batch with nobody behind
        // it is synced by the writer thread itself (see the next test), which would then wait
        // for the gate with the next records queued behind it, uncommitted.
        let behind = f.writer.begin_call();
        // The disk does not finish syncing until the gate opens.
        let gate = f.sync_fault.gate.lock().unwrap();
        let calls: Vec<_> = (1..=CALLS)
            .map(|i| {
                let writer = f.writer.clone();
                runtime.spawn(async move { writer.append(record(i)).await })
            })
            .collect();
        // Every record commits (the next batches do not wait for the sync)...
        while reader.count().unwrap() < u64::from(CALLS) {
            std::thread::yield_now();
        }
        // ...and no caller is answered before a sync covering its commit returned.
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            calls.iter().all(|c| !c.is_finished()),
            "a call was answered before its record was synced"
        );
        assert_eq!(f.sync_fault.synced.load(Ordering::Acquire), 0);
        drop(gate);
        let mut seqs: Vec<u64> = runtime.block_on(async {
            let mut seqs = Vec::new();
            for call in calls {
                seqs.push(call.await.unwrap().unwrap());
            }
            seqs
        });
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=u64::from(CALLS)).collect::<Vec<u64>>());
        let syncs = f.writer.syncs();
        assert!(
            (1..=f.writer.commits()).contains(&syncs),
            "{syncs} syncs for {} commits",
            f.writer.commits()
        );
        assert_eq!(f.sync_fault.synced.load(Ordering::Acquire), syncs);
        assert_eq!(
            f.writer.writer_syncs(),
            0,
            "every batch went to the sync thread"
        );
        drop(behind);
        let report = reader.verify().unwrap();
        assert!(report.ok, "{report:?}");
    }

    #[test]
    fn a_batch_with_nobody_behind_it_is_synced_by_the_writer_thread_and_others_pipeline() {
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        let syncing = || f.writer.shared.syncing.load(Ordering::Acquire);
        // A lone record of a service task (no call in flight; an RPC alone commits and syncs
        // on its worker, see the next test): the writer thread commits, syncs and answers (no
        // sync thread).
        assert_eq!(runtime.block_on(f.writer.append(record(1))).unwrap(), 1);
        assert!(committed_at(&reader, 1).is_some());
        assert_eq!((f.writer.syncs(), f.writer.writer_syncs()), (1, 1));
        assert_eq!(f.sync_fault.synced.load(Ordering::Acquire), 1);
        assert_eq!(
            f.writer.in_place_commits(),
            0,
            "an async caller outside a call waits for no disk on its worker"
        );

        // Another call in flight: the batch goes to the sync thread.
        let other = f.writer.begin_call();
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(2))).unwrap(), 2);
        assert_eq!((f.writer.syncs(), f.writer.writer_syncs()), (2, 1));
        // The sync thread counts its batch down just after answering it.
        while syncing() > 0 {
            std::thread::yield_now();
        }

        // The sync thread busy (its sync held at the gate): the next batch goes to it too,
        // even with nobody else in flight, and is answered only after a sync that began after
        // its commit.
        let gate = f.sync_fault.gate.lock().unwrap();
        let first = {
            let writer = f.writer.clone();
            runtime.spawn(async move { writer.append(record(3)).await })
        };
        while syncing() < 1 {
            std::thread::yield_now();
        }
        drop(other);
        assert_eq!(f.writer.calls_in_flight(), 0);
        let second = {
            let writer = f.writer.clone();
            runtime.spawn(async move { writer.append(record(4)).await })
        };
        while syncing() < 2 {
            std::thread::yield_now();
        }
        assert_eq!(
            reader.count().unwrap(),
            4,
            "both committed while the sync waits"
        );
        assert!(!first.is_finished() && !second.is_finished());
        drop(gate);
        let seqs = runtime.block_on(async { (first.await.unwrap(), second.await.unwrap()) });
        assert_eq!((seqs.0.unwrap(), seqs.1.unwrap()), (3, 4));
        assert_eq!(f.writer.writer_syncs(), 1);
        while syncing() > 0 {
            std::thread::yield_now();
        }

        // A failed sync on the sync thread fails its call closed like one on the writer
        // thread, and leaves the sync thread idle: the next lone batch is the writer's again.
        let other = f.writer.begin_call();
        f.sync_fault.fail.store(1, Ordering::Release);
        let failed = runtime.block_on(f.writer.append(record(5))).err().unwrap();
        assert!(failed.to_string().contains("no result was returned"));
        drop(other);
        while syncing() > 0 {
            std::thread::yield_now();
        }
        let writer_syncs = f.writer.writer_syncs();
        let call = f.writer.begin_call();
        // Seq 5 holds the failed call's first copy, 6 its late record.
        assert_eq!(runtime.block_on(call.append(record(6))).unwrap(), 7);
        // (The failed call's late record may have had a lone batch, synced here, of its own.)
        assert!(f.writer.writer_syncs() > writer_syncs);
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn a_call_commits_in_place_only_when_no_other_call_is_in_flight() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        // Alone: the call counts itself and commits in place.
        let call = f.writer.begin_call();
        assert_eq!(f.writer.calls_in_flight(), 1);
        assert_eq!(runtime.block_on(call.append(record(1))).unwrap(), 1);
        assert_eq!(
            f.writer.calls_in_flight(),
            0,
            "counted until its append ended"
        );
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (1, 1));

        // Another call in flight (admitted, not yet appending): the lock is free and nothing
        // is queued, yet every caller queues for the thread, where batches form.
        let other = f.writer.begin_call();
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(2))).unwrap(), 2);
        assert_eq!(runtime.block_on(f.writer.append(record(3))).unwrap(), 3);
        assert_eq!(append_and_check(&f.writer, &reader, record(4)).unwrap(), 4);
        assert_eq!((f.writer.commits(), f.writer.in_place_commits()), (4, 1));
        assert!(committed_at(&reader, 3).is_some());

        // A call that ends without appending stops counting too.
        drop(other);
        drop(f.writer.begin_call());
        assert_eq!(f.writer.calls_in_flight(), 0);
        assert_eq!(runtime.block_on(f.writer.append(record(5))).unwrap(), 5);
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(6))).unwrap(), 6);
        assert_eq!(f.writer.in_place_commits(), 3);
        assert!(reader.verify().unwrap().ok);
    }

    /// A writer in `fsync` durability whose next `fails` syncs fail, its reader and runtime,
    /// after a first call (record 1) was failed closed by the first of them.
    fn first_call_unsynced(fails: u32) -> (Fixture, SqliteAuditLog, tokio::runtime::Runtime) {
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        f.sync_fault.fail.store(fails, Ordering::Release);
        let failed = runtime.block_on(f.writer.append(record(1))).err().unwrap();
        assert!(matches!(failed, Error::Unavailable(_)), "{failed}");
        assert!(failed.to_string().contains("no result was returned"));
        (f, reader, runtime)
    }

    #[test]
    fn a_failed_sync_fails_its_calls_closed_and_records_them_again_as_late() {
        let (f, reader, runtime) = first_call_unsynced(1);
        // Committed, but not known durable: the call got no result.
        assert_eq!(reader.count().unwrap(), 1);
        let mut writable = f.writer.writable();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), writable.wait_for(|w| *w))
                .await
                .expect("the late record is written on the writer's timer")
                .unwrap();
        });
        // The late record is synced before the next call's reply, which follows it.
        assert_eq!(runtime.block_on(f.writer.append(record(2))).unwrap(), 3);
        let rows = first_records(&reader);
        let seen = seq_ids_outcomes(&rows);
        assert_eq!(
            seen,
            [
                (1, "r1", record(1).outcome),
                (2, "r1", Outcome::Unavailable),
                (3, "r2", record(2).outcome)
            ]
        );
        assert!(rows[1].1.detail.starts_with("recorded late"));
        let report = reader.verify().unwrap();
        assert!(report.ok, "{report:?}");
    }

    /// Waits (at most a minute) until the log holds `count` records; fails saying `missing`.
    fn wait_for_records(reader: &SqliteAuditLog, count: u64, missing: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while reader.count().unwrap() < count {
            assert!(std::time::Instant::now() < deadline, "{missing}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// With no sync thread (the OS refused it) a lone call still syncs its in-place commit on
    /// its worker; when that sync fails, the writer's timer writes the late record without
    /// waiting for another call to arrive.
    #[test]
    fn without_a_sync_thread_a_failed_lone_sync_is_written_late_on_the_timer() {
        REFUSE_SYNC_THREAD.with(|refuse| refuse.set(true));
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        REFUSE_SYNC_THREAD.with(|refuse| refuse.set(false));
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        f.sync_fault.fail.store(1, Ordering::Release);
        let call = f.writer.begin_call();
        let failed = runtime.block_on(call.append(record(1))).err().unwrap();
        assert!(matches!(failed, Error::Unavailable(_)), "{failed}");
        assert_eq!(
            f.writer.in_place_commits(),
            1,
            "committed on the caller's worker"
        );

        wait_for_records(&reader, 2, "the late record waited for a next call");
        let rows = first_records(&reader);
        assert_eq!(
            seq_ids_outcomes(&rows),
            [
                (1, "r1", record(1).outcome),
                (2, "r1", Outcome::Unavailable)
            ]
        );
        assert!(rows[1].1.detail.starts_with("recorded late"));
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn late_records_whose_second_write_is_not_synced_are_kept_and_written_again() {
        // Two syncs fail: the call's own batch's, then that of the timer's first retry, which
        // wrote the call's late record.
        let (f, reader, runtime) = first_call_unsynced(2);
        // The late record is written a second time by a later retry, whose sync succeeds.
        wait_for_records(
            &reader,
            3,
            "the late record whose sync failed was not written again",
        );
        assert_eq!(f.sync_fault.fail.load(Ordering::Acquire), 0);
        assert_eq!(runtime.block_on(f.writer.append(record(2))).unwrap(), 4);
        let rows = first_records(&reader);
        let seen = seq_ids_outcomes(&rows);
        assert_eq!(
            seen,
            [
                (1, "r1", record(1).outcome),
                (2, "r1", Outcome::Unavailable),
                (3, "r1", Outcome::Unavailable),
                (4, "r2", record(2).outcome)
            ]
        );
        // Kept as it was written, not marked late a second time.
        assert!(rows[1].1.detail.starts_with("recorded late"));
        assert_eq!(rows[2].1.detail, rows[1].1.detail);
        let report = reader.verify().unwrap();
        assert!(report.ok, "{report:?}");
    }

    #[test]
    fn the_lone_rpc_in_fsync_durability_commits_and_syncs_on_its_worker_and_fails_closed() {
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(1))).unwrap(), 1);
        assert!(committed_at(&reader, 1).is_some());
        assert_eq!(
            f.writer.in_place_commits(),
            1,
            "committed by the call itself"
        );
        assert_eq!(
            (f.writer.syncs(), f.writer.writer_syncs()),
            (1, 0),
            "and synced by it: neither the writer thread nor the sync thread"
        );
        assert_eq!(f.sync_fault.synced.load(Ordering::Acquire), 1);

        // The sync is held at the gate: the call has not returned, though its record is
        // committed, and the commit lock is free for a batch behind it, which the writer
        // thread commits (and hands to the sync thread) meanwhile.
        let gate = f.sync_fault.gate.lock().unwrap();
        let lone = {
            let call = f.writer.begin_call();
            runtime.spawn(async move { call.append(record(2)).await })
        };
        while reader.count().unwrap() < 2 {
            std::thread::yield_now();
        }
        assert!(!lone.is_finished(), "answered before its sync");
        let behind = {
            let writer = f.writer.clone();
            runtime.spawn(async move { writer.append(record(3)).await })
        };
        while reader.count().unwrap() < 3 {
            std::thread::yield_now();
        }
        assert!(!lone.is_finished() && !behind.is_finished());
        drop(gate);
        let seqs = runtime.block_on(async { (lone.await.unwrap(), behind.await.unwrap()) });
        assert_eq!((seqs.0.unwrap(), seqs.1.unwrap()), (2, 3));
        assert_eq!(f.writer.in_place_commits(), 2);

        // A failed sync fails the lone call closed, and its record comes again as late.
        f.sync_fault.fail.store(1, Ordering::Release);
        let call = f.writer.begin_call();
        let failed = runtime.block_on(call.append(record(4))).err().unwrap();
        assert!(
            failed.to_string().contains("no result was returned"),
            "{failed}"
        );
        assert!(!*f.writer.writable().borrow());
        assert_eq!(f.writer.calls_in_flight(), 0);
        let call = f.writer.begin_call();
        // Seq 4 holds the failed call's first copy, 5 its late record (written by the writer
        // thread: a late record waits for the thread's commit, not a call's in place).
        assert_eq!(runtime.block_on(call.append(record(5))).unwrap(), 6);
        let late = committed_at(&reader, 5).unwrap();
        assert_eq!(
            (late.request_id.as_str(), late.outcome),
            ("r4", Outcome::Unavailable)
        );
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn fsync_durability_syncs_a_commit_in_place_before_it_returns() {
        let f = fixture_with(Durability::Fsync, DEFAULT_BUSY_TIMEOUT);
        let reader = reader(&f.path, &f.keys);
        assert_eq!(append_and_check(&f.writer, &reader, record(1)).unwrap(), 1);
        assert_eq!(f.writer.in_place_commits(), 1);
        assert_eq!(f.sync_fault.synced.load(Ordering::Acquire), 1);
        // A failed sync fails the call in place too, and its record comes again as late.
        f.sync_fault.fail.store(1, Ordering::Release);
        assert!(f.writer.append_blocking(record(2)).is_err());
        assert!(!*f.writer.writable().borrow());
        assert_eq!(append_and_check(&f.writer, &reader, record(3)).unwrap(), 4);
        let late = committed_at(&reader, 3).unwrap();
        assert_eq!(
            (late.request_id.as_str(), late.outcome),
            ("r2", Outcome::Unavailable)
        );
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn the_thread_waits_for_the_records_of_requests_received_and_commits_them_together() {
        // A bound no test machine reaches: only the second record can end the wait.
        let f = fixture_gathering(
            Durability::Process,
            DEFAULT_BUSY_TIMEOUT,
            Gathering::new(Arrivals::default(), Duration::from_secs(600), 1),
        );
        let reader = reader(&f.path, &f.keys);
        let runtime = runtime();
        // Two requests received (the guard counts them) and admitted.
        let arrivals = [f.writer.arrivals().arrive(), f.writer.arrivals().arrive()];
        let (first, second) = (f.writer.begin_call(), f.writer.begin_call());
        // The first appends while the second still works: another request is pending, so it
        // queues, and the thread waits for the second record.
        let first = runtime.spawn(async move { first.append(record(1)).await });
        while f.writer.gathers() < 1 {
            std::thread::yield_now();
        }
        assert_eq!(f.writer.commits(), 0, "held back for the pending request");
        // The second queues too (not in place: a record is queued): every pending request
        // has queued, the wait ends, and one commit carries both.
        let second = runtime.block_on(second.append(record(2))).unwrap();
        let first = runtime.block_on(first).unwrap().unwrap();
        let mut seqs = [first, second];
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(
            (
                f.writer.commits(),
                f.writer.gathers(),
                f.writer.in_place_commits()
            ),
            (1, 1, 0)
        );
        drop(arrivals);
        assert_eq!(f.writer.arrivals().pending(), 0);
        assert!(reader.verify().unwrap().ok);
    }

    #[test]
    fn a_request_received_keeps_a_call_from_committing_in_place() {
        let f = fixture(DEFAULT_BUSY_TIMEOUT);
        let runtime = runtime();
        let call = f.writer.begin_call();
        let own = f.writer.arrivals().arrive();
        // Its own request only: alone, in place.
        assert_eq!(runtime.block_on(call.append(record(1))).unwrap(), 1);
        // Another request received, not yet admitted: its record is coming, so this one
        // queues for the thread (no wait: one pending is below the default siblings).
        let other = f.writer.arrivals().arrive();
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(2))).unwrap(), 2);
        assert_eq!(
            (
                f.writer.commits(),
                f.writer.in_place_commits(),
                f.writer.gathers()
            ),
            (2, 1, 0)
        );
        drop((own, other));
        let call = f.writer.begin_call();
        assert_eq!(runtime.block_on(call.append(record(3))).unwrap(), 3);
        assert_eq!(f.writer.in_place_commits(), 2);
    }
}
