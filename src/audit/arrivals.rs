//! Requests the transport has received and not yet answered, and the audit writer's wait for
//! their records ([`Gathering`]).
//!
//! Under load the writer thread commits whatever has queued since its last commit. At 64
//! calls in flight on two cores that was two to four records a commit, each commit paying the
//! transaction's fixed cost (its locks, the signed head and its MAC, the WAL frames of the
//! head's page, the wake-ups). The records that could join a batch belong to requests the
//! server has already received but not yet admitted: the transport decodes them, they wait
//! for a worker, they authenticate. The audit writer cannot see those, so the guard (the
//! outermost layer of every `tenantkms.v1` request) counts them here ([`Arrivals::arrive`]),
//! from the moment a request's body is whole until its answer is made. When many such
//! requests are pending beyond the records already queued, the writer thread waits a bounded
//! while for their records before it commits ([`Gathering::wait`]), so that the next commit
//! carries them too (docs/PERFORMANCE.md, "A batch that waits for requests received"). It
//! does so only for a log that commits into the page cache (SQLite in `process` durability):
//! an fsync or a database round trip already gathers what arrives meanwhile.
//!
//! The count includes requests that will append no record (echo, a refused caller, a read of
//! the log) and requests already answered by a commit but not yet finished, so it is a sign
//! of load, not a promise of records: the wait is bounded, taken only when at least
//! [`Gathering::siblings`] requests are pending beyond the queue (a lone call and light load
//! never wait), and ends early when every pending request has queued its record or a full
//! batch has. A request counts only once its body is whole, so a client that trickles its
//! body in holds no batch.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The longest the writer thread waits for the records of pending requests before it commits
/// a batch, unless [`GATHER_MICROS_ENV`] says otherwise: at 64 calls in flight on two cores a
/// call takes 2–3 ms end to end, and in 300 µs about ten more records arrive
/// (docs/PERFORMANCE.md).
pub const DEFAULT_GATHER_BOUND: Duration = Duration::from_micros(300);

/// Requests pending beyond the queued records from which the writer waits, unless
/// [`GATHER_SIBLINGS_ENV`] says otherwise. Below it a wait would hold the few calls in flight
/// for records that may never come, and the commit it saves is cheap next to their latency.
pub const DEFAULT_GATHER_SIBLINGS: usize = 8;

/// Overrides [`DEFAULT_GATHER_BOUND`], in microseconds (0: never wait).
pub const GATHER_MICROS_ENV: &str = "TENANT_KMS_AUDIT_GATHER_MICROS";

/// Overrides [`DEFAULT_GATHER_SIBLINGS`] (at least 1).
pub const GATHER_SIBLINGS_ENV: &str = "TENANT_KMS_AUDIT_GATHER_SIBLINGS";

/// The count of requests received whole and not yet answered. Cloning shares it.
#[derive(Clone, Default)]
pub struct Arrivals(Arc<AtomicUsize>);

impl Arrivals {
    /// Counts one request until the returned value is dropped.
    pub fn arrive(&self) -> Arrival {
        self.0.fetch_add(1, Ordering::AcqRel);
        Arrival(Arc::clone(&self.0))
    }

    /// Requests counted now.
    pub fn pending(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// One request counted by [`Arrivals::arrive`]; dropping it (the answer made, or the request
/// dropped) stops counting it.
pub struct Arrival(Arc<AtomicUsize>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The writer thread's wait for the records of pending requests (see the module docs).
pub struct Gathering {
    arrivals: Arrivals,
    bound: Duration,
    siblings: usize,
    /// The writer thread, parked while it waits; callers that queue the last expected record
    /// unpark it.
    thread: OnceLock<Thread>,
    waiting: AtomicBool,
    waits: AtomicU64,
}

impl Gathering {
    /// Waits of at most `bound` (zero: never), from `siblings` (at least 1) pending requests
    /// beyond the queued records.
    pub fn new(arrivals: Arrivals, bound: Duration, siblings: usize) -> Self {
        Self {
            arrivals,
            bound,
            siblings: siblings.max(1),
            thread: OnceLock::new(),
            waiting: AtomicBool::new(false),
            waits: AtomicU64::new(0),
        }
    }

    /// [`Gathering::new`] with the defaults, or what [`GATHER_MICROS_ENV`] and
    /// [`GATHER_SIBLINGS_ENV`] say; an unreadable value is an error, not ignored.
    pub fn from_env(arrivals: Arrivals) -> Result<Self> {
        let bound = match env_number(GATHER_MICROS_ENV)? {
            Some(micros) => Duration::from_micros(micros),
            None => DEFAULT_GATHER_BOUND,
        };
        let siblings = match env_number(GATHER_SIBLINGS_ENV)? {
            Some(0) => {
                return Err(Error::InvalidArgument(format!(
                    "{GATHER_SIBLINGS_ENV} must be at least 1"
                )));
            }
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => DEFAULT_GATHER_SIBLINGS,
        };
        Ok(Self::new(arrivals, bound, siblings))
    }

    /// The counter the guard feeds.
    pub fn arrivals(&self) -> &Arrivals {
        &self.arrivals
    }

    /// Pending requests beyond the queue from which the writer waits.
    pub fn siblings(&self) -> usize {
        self.siblings
    }

    /// How many batches the writer thread held back for pending requests.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Names the thread that waits: the writer thread calls this before its first wait.
    pub fn set_waiter(&self) {
        let _ = self.thread.set(std::thread::current());
    }

    /// On the writer thread, holding a record taken from the queue and still counted in
    /// `queued` (so no caller commits in place meanwhile), before it takes the commit lock:
    /// waits while at least [`Gathering::siblings`] requests are pending beyond the queued
    /// records, until every pending request has queued, `max_batch` records have, or the
    /// bound has passed. Parked, not sleeping in steps: one wake-up per wait, and the caller
    /// that queues the last expected record ends it early ([`Gathering::queued`]).
    pub fn wait(&self, queued: &AtomicUsize, max_batch: usize) {
        let coming = || {
            let queued = queued.load(Ordering::Acquire);
            queued < max_batch && self.arrivals.pending() > queued
        };
        let now_queued = queued.load(Ordering::Acquire);
        if self.bound.is_zero()
            || now_queued >= max_batch
            || self.arrivals.pending() < now_queued + self.siblings
        {
            return;
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.bound;
        // Set before the last look: a caller queueing from now on sees it and unparks, and
        // an unpark before the park makes the park return at once.
        self.waiting.store(true, Ordering::SeqCst);
        while coming() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::park_timeout(deadline - now);
        }
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// After a caller queued a record (`queued` now counted): ends the writer thread's wait
    /// if every pending request has queued or a full batch has.
    pub fn queued(&self, queued: usize, max_batch: usize) {
        if self.waiting.load(Ordering::SeqCst)
            && (queued >= max_batch || queued >= self.arrivals.pending())
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }
}

/// A whole number from the environment variable `name`, if it is set.
fn env_number(name: &str) -> Result<Option<u64>> {
    number_setting(name, std::env::var(name).ok().as_deref())
}

/// `value` of the setting `name` as a whole number, if given.
fn number_setting(name: &str, value: Option<&str>) -> Result<Option<u64>> {
    value
        .map(|value| {
            value.trim().parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!("{name} must be a whole number, not {value:?}"))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrival_counts_until_it_is_dropped() {
        let arrivals = Arrivals::default();
        let first = arrivals.arrive();
        let second = arrivals.clone().arrive();
        assert_eq!(arrivals.pending(), 2);
        drop(first);
        assert_eq!(arrivals.pending(), 1);
        drop(second);
        assert_eq!(arrivals.pending(), 0);
    }

    #[test]
    fn no_wait_below_the_siblings_or_with_a_zero_bound() {
        let arrivals = Arrivals::default();
        let queued = AtomicUsize::new(1);
        let _pending: Vec<Arrival> = (0..4).map(|_| arrivals.arrive()).collect();
        // Three pending beyond the one queued record: below four siblings.
        let gathering = Gathering::new(arrivals.clone(), Duration::from_secs(600), 4);
        gathering.wait(&queued, 4096);
        let never = Gathering::new(arrivals, Duration::ZERO, 1);
        never.wait(&queued, 4096);
        assert_eq!((gathering.waits(), never.waits()), (0, 0));
    }

    #[test]
    fn a_wait_ends_when_every_pending_request_has_queued() {
        let arrivals = Arrivals::default();
        let gathering = Arc::new(Gathering::new(
            arrivals.clone(),
            // A bound no test machine reaches: only the last record can end the wait.
            Duration::from_secs(600),
            1,
        ));
        let queued = Arc::new(AtomicUsize::new(1));
        let _pending = [arrivals.arrive(), arrivals.arrive()];
        let waiter = {
            let (gathering, queued) = (Arc::clone(&gathering), Arc::clone(&queued));
            std::thread::spawn(move || {
                gathering.set_waiter();
                gathering.wait(&queued, 4096);
            })
        };
        while gathering.waits() == 0 {
            std::thread::yield_now();
        }
        let now = queued.fetch_add(1, Ordering::AcqRel) + 1;
        gathering.queued(now, 4096);
        waiter.join().unwrap();
        assert_eq!(gathering.waits(), 1);
    }

    #[test]
    fn a_wait_for_requests_that_never_queue_ends_at_its_bound() {
        let arrivals = Arrivals::default();
        let gathering = Gathering::new(arrivals.clone(), Duration::from_millis(5), 1);
        gathering.set_waiter();
        let _stuck: Vec<Arrival> = (0..3).map(|_| arrivals.arrive()).collect();
        let started = Instant::now();
        gathering.wait(&AtomicUsize::new(1), 4096);
        assert!(started.elapsed() >= Duration::from_millis(5));
        assert_eq!(gathering.waits(), 1);
    }

    #[test]
    fn a_full_batch_does_not_wait() {
        let arrivals = Arrivals::default();
        let gathering = Gathering::new(arrivals.clone(), Duration::from_secs(600), 1);
        gathering.set_waiter();
        let _pending: Vec<Arrival> = (0..10).map(|_| arrivals.arrive()).collect();
        // Two queued of a batch of two: nothing more can join, so nothing waits (a wait
        // would run its 600 s bound).
        gathering.wait(&AtomicUsize::new(2), 2);
        assert_eq!(gathering.waits(), 0);
    }

    #[test]
    fn an_unreadable_setting_is_refused() {
        // Read through the same parser the environment goes through.
        assert!(matches!(
            number_setting("TENANT_KMS_AUDIT_GATHER_MICROS", Some("soon")),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            number_setting("TENANT_KMS_AUDIT_GATHER_MICROS", Some(" 250 ")).unwrap(),
            Some(250)
        );
        assert_eq!(number_setting("X", None).unwrap(), None);
    }
}
