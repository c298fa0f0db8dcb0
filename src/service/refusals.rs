//! Refusals of requests that proved no identity, audited in aggregate (issue 13: a flood with
//! a garbage token wrote 55 MB of audit records in 10 s).
//!
//! A request refused before it names anyone (no credential, an unknown or malformed token, an
//! unmapped client certificate; or a body over the message limit, refused before
//! authentication) is not audited one record per call. Its refusal is counted under a key
//! (kind, peer address, caller name): the first of a window is recorded at once (naming the
//! call's RPC and request id); further ones in the window are counted, and when the window
//! ends one record carries their number as its item count. So the audit grows by at most two
//! records per key and window, whatever the attacker's rate, and no attempt goes uncounted:
//! the sum of the item counts of the aggregated records equals the number of refusals.
//! Counts still in memory are written when their window ends (a background task) and when
//! the server stops ([`Refusals::drain`]); a `kill -9` loses at most one window's counts (the
//! first refusal of each window is already durable).
//!
//! **Bounded memory.** At most [`MAX_TRACKED`] keys are tracked; refusals from further peers
//! are counted under one overflow key (peer [`OVERFLOW_PEER`]), so an attacker with many
//! addresses gets one more record per window, not one per address.
//!
//! **Bounded cost.** Every refusal of a credential also charges a per-peer token bucket
//! ([`Refusals::charge`]); a peer over it gets RESOURCE_EXHAUSTED with retry info instead of
//! UNAUTHENTICATED (still counted). That bucket is separate from the per-caller rate limit,
//! so an attacker sharing an address with a real caller cannot spend that caller's budget.
//!
//! **Known tokens.** A revoked or expired token names a real credential, so its refusals keep
//! one record per call (who kept using it, for which tenant and RPC) while its own bucket
//! (keyed by the token) has tokens; beyond that they are refused RESOURCE_EXHAUSTED and
//! aggregated under the token's name like anonymous refusals. The bucket bounds the audit
//! growth a stolen dead token can cause.
//!
//! Windows are measured on the injected [`crate::clock::Clock`], so tests step over them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::operation::Task;
use crate::audit::{AuditRecord, AuditWriter, Outcome};
use crate::auth::rate::{RateLimit, RateLimiter};
use crate::clock::SharedClock;

/// Most keys tracked at once; further peers share the overflow key.
pub const MAX_TRACKED: usize = 10_000;

/// The peer named by the overflow key's records.
pub const OVERFLOW_PEER: &str = "(other peers)";

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The request proved no identity (UNAUTHENTICATED, or RESOURCE_EXHAUSTED past the
    /// refusal budget).
    Unauthenticated,
    /// The request body was larger than the message limit (RESOURCE_EXHAUSTED).
    Oversize,
}

impl RefusalKind {
    fn task(self) -> Task {
        match self {
            RefusalKind::Unauthenticated => Task::UnauthenticatedRefusals,
            RefusalKind::Oversize => Task::OversizeRequestRefusals,
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            RefusalKind::Unauthenticated => Outcome::Unauthenticated,
            RefusalKind::Oversize => Outcome::Exhausted,
        }
    }

    fn what(self) -> &'static str {
        match self {
            RefusalKind::Unauthenticated => "unauthenticated requests",
            RefusalKind::Oversize => "requests over the message size limit",
        }
    }
}

/// Settings of the refusal audit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefusalPolicy {
    /// How long one aggregation window lasts.
    pub window: Duration,
    /// The per-peer (or per dead token) refusal budget.
    pub budget: RateLimit,
}

impl Default for RefusalPolicy {
    /// One-minute windows; 20 refusals per second with bursts of 100 per peer: far above what
    /// a misconfigured honest client produces before its operator notices, far below what
    /// fills a disk.
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            budget: RateLimit {
                per_second: 20.0,
                burst: 100,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: RefusalKind,
    peer: String,
    caller: String,
}

struct Window {
    /// When the window began (µs on the injected clock).
    started: i64,
    /// Refusals counted since the last record of this key.
    pending: u64,
    /// The RPC (path) of the window's first refusal, for the record's detail.
    first: String,
}

/// The refusal counters of one server.
pub struct Refusals {
    policy: RefusalPolicy,
    clock: SharedClock,
    audit: AuditWriter,
    budget: RateLimiter,
    tracked: Mutex<HashMap<Key, Window>>,
}

/// The [`Refusals`] of the server, put into every guarded request's extensions.
#[derive(Clone)]
pub struct RefusalsHandle(pub Arc<Refusals>);

impl Refusals {
    /// Counters writing to `audit`, with windows measured on `clock`.
    pub fn new(policy: RefusalPolicy, clock: SharedClock, audit: AuditWriter) -> Arc<Self> {
        Arc::new(Self {
            budget: RateLimiter::new(policy.budget),
            policy,
            clock,
            audit,
            tracked: Mutex::new(HashMap::new()),
        })
    }

    /// Takes one token from `key`'s refusal budget: `Err(wait)` when it is spent.
    pub fn charge(&self, key: &str) -> Result<(), Duration> {
        self.budget.check(key)
    }

    /// The refusal budget's settings (for messages).
    pub fn budget(&self) -> RateLimit {
        self.policy.budget
    }

    /// Counts one refusal of `kind` from `peer` (an address without port) by `caller` (an
    /// audit caller name) calling `rpc`, and writes the records due now: the first refusal of
    /// a window (with `request_id`), and the count of a window that has ended but not yet been
    /// flushed. Waits until they are durable; an audit failure is returned (fail closed).
    pub async fn record(
        &self,
        kind: RefusalKind,
        peer: &str,
        caller: &str,
        rpc: &str,
        request_id: &str,
    ) -> crate::error::Result<()> {
        let records = self.note(kind, peer, caller, rpc, request_id);
        self.append(records).await
    }

    fn note(
        &self,
        kind: RefusalKind,
        peer: &str,
        caller: &str,
        rpc: &str,
        request_id: &str,
    ) -> Vec<AuditRecord> {
        let now = self.clock.now_micros();
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = Key {
            kind,
            peer: peer.to_owned(),
            caller: caller.to_owned(),
        };
        if !tracked.contains_key(&key) && tracked.len() >= MAX_TRACKED {
            key = Key {
                kind,
                peer: OVERFLOW_PEER.to_owned(),
                caller: "(any)".to_owned(),
            };
        }
        let mut records = Vec::new();
        if let Some(window) = tracked.get_mut(&key) {
            if now < window.started.saturating_add(self.window_micros()) {
                window.pending = window.pending.saturating_add(1);
                return records;
            }
            // The window ended before the flusher came by: its count goes out now.
            if let Some(record) = self.window_record(&key, window) {
                records.push(record);
            }
            tracked.remove(&key);
        }
        records.push(
            AuditRecord::new(
                kind.task(),
                key.caller.clone(),
                key.peer.clone(),
                kind.outcome(),
            )
            .request_id(request_id)
            .items(1)
            .detail(format!(
                "first of the {} refused from this peer in a {}s window (this one: {rpc}); \
                     further ones in the window are counted in one record when it ends",
                kind.what(),
                self.policy.window.as_secs()
            )),
        );
        tracked.insert(
            key,
            Window {
                started: now,
                pending: 0,
                first: rpc.to_owned(),
            },
        );
        records
    }

    fn window_micros(&self) -> i64 {
        i64::try_from(self.policy.window.as_micros()).unwrap_or(i64::MAX)
    }

    /// The record of a window's count (taking at most `u32::MAX` of it; the rest stays
    /// pending), or `None` if nothing is pending.
    fn window_record(&self, key: &Key, window: &mut Window) -> Option<AuditRecord> {
        if window.pending == 0 {
            return None;
        }
        let count = u32::try_from(window.pending).unwrap_or(u32::MAX);
        window.pending -= u64::from(count);
        Some(
            AuditRecord::new(
                key.kind.task(),
                key.caller.clone(),
                key.peer.clone(),
                key.kind.outcome(),
            )
            .items(count)
            .detail(format!(
                "{count} more {} refused from this peer in the {}s window that began with {}",
                key.kind.what(),
                self.policy.window.as_secs(),
                window.first
            )),
        )
    }

    /// The records of every window that has ended; keys with nothing pending are forgotten,
    /// keys with a count begin a new window (so a steady flood costs one record per window).
    fn due(&self) -> Vec<AuditRecord> {
        let now = self.clock.now_micros();
        let length = self.window_micros();
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = Vec::new();
        tracked.retain(|key, window| {
            if now < window.started.saturating_add(length) {
                return true;
            }
            match self.window_record(key, window) {
                Some(record) => {
                    records.push(record);
                    window.started = now;
                    true
                }
                None => false,
            }
        });
        records
    }

    /// Takes every pending count as records (at shutdown).
    fn take_all(&self) -> Vec<AuditRecord> {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = Vec::new();
        for (key, window) in tracked.iter_mut() {
            while let Some(record) = self.window_record(key, window) {
                records.push(record);
            }
        }
        tracked.clear();
        records
    }

    /// Refusals counted but not yet written (for tests and metrics).
    pub fn pending(&self) -> u64 {
        let tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked.values().map(|w| w.pending).sum()
    }

    /// Writes the counts of the windows that have ended.
    pub async fn flush_due(&self) -> crate::error::Result<()> {
        let records = self.due();
        self.append(records).await
    }

    /// Writes every pending count, whether its window has ended or not (at shutdown).
    pub async fn drain(&self) -> crate::error::Result<()> {
        let records = self.take_all();
        self.append(records).await
    }

    /// Appends `records` in order; if one cannot be written, its count and the later
    /// records' counts go back to pending under their own keys (so a later flush or the
    /// shutdown drain writes them: no attempt goes uncounted because the audit failed once)
    /// and the error is returned.
    async fn append(&self, records: Vec<AuditRecord>) -> crate::error::Result<()> {
        let mut records = records.into_iter();
        while let Some(record) = records.next() {
            let key = key_of(&record);
            let count = u64::from(record.item_count);
            if let Err(e) = self.audit.append(record).await {
                let unwritten = std::iter::once((key, count))
                    .chain(records.map(|r| (key_of(&r), u64::from(r.item_count))));
                let now = self.clock.now_micros();
                let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                for (key, count) in unwritten {
                    let window = tracked.entry(key).or_insert_with(|| Window {
                        started: now,
                        pending: 0,
                        first: "(an unwritten record)".to_owned(),
                    });
                    window.pending = window.pending.saturating_add(count);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Flushes ended windows until the task is aborted: every second, or every window if
    /// shorter, on the tokio timer (the window itself is judged on the injected clock, so a
    /// test moving that clock sees its records within a second).
    pub async fn flush_periodically(self: Arc<Self>) {
        let tick = self.policy.window.min(Duration::from_secs(1));
        let mut interval = tokio::time::interval(tick.max(Duration::from_millis(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(e) = self.flush_due().await {
                // The counts went back to pending (see `append`): retried next tick.
                tracing::error!(error = %e, "could not audit aggregated refusals; will retry");
            }
        }
    }
}

/// The key a record of ours was made for.
fn key_of(record: &AuditRecord) -> Key {
    Key {
        kind: if record.operation == RefusalKind::Oversize.task().stored_name() {
            RefusalKind::Oversize
        } else {
            RefusalKind::Unauthenticated
        },
        peer: record.peer.clone(),
        caller: record.caller.clone(),
    }
}

/// The address part of a peer written `ip:port` (or `[v6]:port`), the unit refusals are
/// counted by (a client's ports change with every connection).
pub fn peer_ip(peer: &str) -> &str {
    peer.rsplit_once(':').map_or(peer, |(ip, _)| ip)
}
