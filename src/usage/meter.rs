//! The in-memory side of usage accounting: per-minute cells waiting for the next flush, and
//! cumulative counters with bounded labels for `/metrics`.

use std::collections::BTreeMap;
use std::hash::RandomState;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::{Equivalent, HashMap, HashSet};
use prometheus::proto::{MetricFamily, MetricType};

use super::{UsageCounts, UsageRow, UsageStore, UsageSum, minute_of};
use crate::clock::SharedClock;
use crate::error::Result;
use crate::metrics::{family, sample};

/// Label value of the series that sums every tenant (or caller) past the first
/// [`UsagePolicy::metrics_top`].
pub const OTHER: &str = "other";

/// Most distinct (minute, tenant, caller, operation, outcome) cells held between two flushes.
/// Past it a new cell is not kept (counted in `tenant_kms_usage_dropped_total`) and a flush is
/// asked for at once, so a caller spraying tenant ids cannot grow the server's memory.
const MAX_PENDING_CELLS: usize = 100_000;

/// How usage is accounted (config keys `usage_metrics_top`, `usage_flush_interval`).
#[derive(Debug, Clone, Copy)]
pub struct UsagePolicy {
    /// Tenants, and separately callers, that get their own label in `/metrics`: the first
    /// this many seen since the server started; the rest are summed under `other`, so a
    /// series never moves between labels and every counter stays monotonic.
    pub metrics_top: usize,
    /// How often counted usage is written to the usage store.
    pub flush_interval: Duration,
}

impl Default for UsagePolicy {
    fn default() -> Self {
        Self {
            metrics_top: 20,
            flush_interval: Duration::from_secs(10),
        }
    }
}

/// The key of one cell: whose usage (tenant, caller), of what, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CellKey {
    tenant: String,
    caller: String,
    operation: &'static str,
    outcome: &'static str,
}

/// A [`CellKey`] borrowed from a finished call, to find its cell without allocating. It must
/// hash exactly as the owned key: the derived `Hash` of both writes the same fields in the
/// same order, and a `String` hashes as its `str`.
#[derive(Hash)]
struct CellRef<'a> {
    tenant: &'a str,
    caller: &'a str,
    operation: &'static str,
    outcome: &'static str,
}

impl CellRef<'_> {
    fn to_key(&self) -> CellKey {
        CellKey {
            tenant: self.tenant.to_owned(),
            caller: self.caller.to_owned(),
            operation: self.operation,
            outcome: self.outcome,
        }
    }
}

impl Equivalent<CellKey> for CellRef<'_> {
    fn equivalent(&self, key: &CellKey) -> bool {
        self.tenant == key.tenant
            && self.caller == key.caller
            && self.operation == key.operation
            && self.outcome == key.outcome
    }
}

/// One minute's cells waiting for a flush. They are keyed by whatever tenant ids callers name
/// (bounded by [`MAX_PENDING_CELLS`]), so they keep std's keyed SipHash; one flat map hashes a
/// call's key once instead of once per tenant, caller and operation level.
type PendingCells = HashMap<CellKey, UsageCounts, RandomState>;

/// Cumulative cells and label sets: keyed only by labels, of which there are at most
/// `metrics_top` + 1 per dimension, so a fast (still per-process seeded) hash is enough.
type LabelHasher = foldhash::fast::RandomState;

#[derive(Default)]
struct Inner {
    /// Minute start → cells not yet flushed (a call almost always finds its minute last).
    pending: BTreeMap<i64, PendingCells>,
    pending_cells: usize,
    /// Cumulative counts by bounded label (tenant or `other`, caller or `other`).
    totals: HashMap<CellKey, UsageCounts, LabelHasher>,
    labelled_tenants: HashSet<String, LabelHasher>,
    labelled_callers: HashSet<String, LabelHasher>,
    dropped: u64,
}

impl Inner {
    fn label<'a>(set: &mut HashSet<String, LabelHasher>, top: usize, name: &'a str) -> &'a str {
        if set.contains(name) {
            name
        } else if set.len() < top {
            set.insert(name.to_owned());
            name
        } else {
            OTHER
        }
    }

    fn merge(&mut self, pending: BTreeMap<i64, PendingCells>) {
        for (minute, cells) in pending {
            let slot = self.pending.entry(minute).or_default();
            for (key, counts) in cells {
                slot.entry(key).or_default().add(&counts);
                self.pending_cells += 1;
            }
        }
    }
}

/// Counts usage in memory and flushes it to a [`UsageStore`]. One per server; shared by its
/// handlers through `AppState`.
pub struct UsageMeter {
    policy: UsagePolicy,
    clock: SharedClock,
    store: Arc<dyn UsageStore>,
    inner: Mutex<Inner>,
    /// Held by a flush for its whole write, and by a query while it reads the store and the
    /// memory: a query never sees a cell both flushed and pending, nor neither.
    flushing: Mutex<()>,
    /// Woken when the pending cells reach their bound.
    flush_now: tokio::sync::Notify,
}

impl UsageMeter {
    /// A meter over `store`, bucketing by `clock`.
    pub fn new(policy: UsagePolicy, clock: SharedClock, store: Arc<dyn UsageStore>) -> Self {
        Self {
            policy,
            clock,
            store,
            inner: Mutex::new(Inner::default()),
            flushing: Mutex::new(()),
            flush_now: tokio::sync::Notify::new(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one finished call. Cheap enough for every call (measured by `benches/usage.rs`):
    /// one uncontended mutex; for a key seen before, no allocation and four hashes (the
    /// cell's whole key once, keyed, for the pending cells; the two label sets and the totals
    /// with a fast hash).
    pub fn record(
        &self,
        tenant: &str,
        caller: &str,
        operation: &'static str,
        outcome: &'static str,
        counts: &UsageCounts,
    ) {
        let minute = minute_of(self.clock.now_micros());
        let key = CellRef {
            tenant,
            caller,
            operation,
            outcome,
        };
        let mut inner = self.inner();
        let inner = &mut *inner;
        let full = inner.pending_cells >= MAX_PENDING_CELLS;
        let cells = inner.pending.entry(minute).or_default();
        if let Some(c) = cells.get_mut(&key) {
            c.add(counts);
        } else if full {
            inner.dropped = inner.dropped.saturating_add(counts.calls);
            self.flush_now.notify_one();
        } else {
            cells.insert(key.to_key(), *counts);
            inner.pending_cells += 1;
        }
        let top = self.policy.metrics_top;
        let labelled = CellRef {
            tenant: Inner::label(&mut inner.labelled_tenants, top, tenant),
            caller: Inner::label(&mut inner.labelled_callers, top, caller),
            operation,
            outcome,
        };
        if let Some(c) = inner.totals.get_mut(&labelled) {
            c.add(counts);
        } else {
            inner.totals.insert(labelled.to_key(), *counts);
        }
    }

    /// Writes every pending cell to the store (adding to what it holds). On failure the cells
    /// go back to memory for the next flush, and the error is returned. Blocking: call it from
    /// the blocking pool.
    pub fn flush(&self) -> Result<usize> {
        let _flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let pending = {
            let mut inner = self.inner();
            inner.pending_cells = 0;
            std::mem::take(&mut inner.pending)
        };
        let rows = rows_of(&pending);
        if rows.is_empty() {
            return Ok(0);
        }
        match self.store.add(&rows) {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                self.inner().merge(pending);
                Err(e)
            }
        }
    }

    /// Flushes every `flush_interval` (or at once when the pending cells reach their bound)
    /// until the task is aborted; a failed flush is logged and retried at the next tick.
    pub async fn flush_periodically(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.policy.flush_interval) => {}
                () = self.flush_now.notified() => {}
            }
            let meter = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || meter.flush()).await {
                Ok(Ok(n)) => tracing::trace!(cells = n, "usage flushed"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "usage flush failed; kept for the next one");
                }
                Err(e) => tracing::warn!(error = %e, "usage flush task failed"),
            }
        }
    }

    /// `tenant`'s usage in the minutes that start in `[since, until)` (Unix seconds), from
    /// the store plus what is not flushed yet, summed per caller, operation and outcome and
    /// sorted by them. Blocking: call it from the blocking pool.
    pub fn query(&self, tenant: &str, since: i64, until: i64) -> Result<Vec<UsageSum>> {
        let _flushing = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let mut sums: std::collections::BTreeMap<(String, String, String), UsageCounts> =
            std::collections::BTreeMap::new();
        for row in self.store.query(tenant, since, until)? {
            sums.entry((row.caller, row.operation, row.outcome))
                .or_default()
                .add(&row.counts);
        }
        // A scan of the pending minutes' cells (at most `MAX_PENDING_CELLS`, usually one
        // flush interval's worth) under the lock: queries are rare, and the flat cells keep
        // the per-call path to one lookup.
        let inner = self.inner();
        for cells in inner.pending.range(since..until).map(|(_, cells)| cells) {
            for (key, counts) in cells.iter().filter(|(key, _)| key.tenant == tenant) {
                sums.entry((
                    key.caller.clone(),
                    key.operation.to_owned(),
                    key.outcome.to_owned(),
                ))
                .or_default()
                .add(counts);
            }
        }
        Ok(sums
            .into_iter()
            .map(|((caller, operation, outcome), counts)| UsageSum {
                caller,
                operation,
                outcome,
                counts,
            })
            .collect())
    }

    /// The usage families for `/metrics`: `tenant_kms_usage_calls_total`, `…_items_total`,
    /// `…_failed_items_total`, `…_request_bytes_total`, `…_response_bytes_total` (labels
    /// `tenant`, `caller`, `operation`, and `outcome` on calls), and
    /// `tenant_kms_usage_dropped_total`. The counts are copied under the meter's lock (which
    /// the hot path holds only briefly); the crate's encoder renders and escapes them.
    pub fn families(&self) -> Vec<MetricFamily> {
        let (series, dropped) = {
            let inner = self.inner();
            let mut series: Vec<(String, String, &'static str, &'static str, UsageCounts)> =
                Vec::new();
            for (key, counts) in &inner.totals {
                series.push((
                    key.tenant.clone(),
                    key.caller.clone(),
                    key.operation,
                    key.outcome,
                    *counts,
                ));
            }
            (series, inner.dropped)
        };
        let mut series = series;
        series.sort_by(|a, b| (&a.0, &a.1, a.2, a.3).cmp(&(&b.0, &b.1, b.2, b.3)));
        let counter =
            |labels: &[(&str, &str)], value: u64| sample(MetricType::COUNTER, labels, value as f64);
        let mut families = vec![family(
            "tenant_kms_usage_calls_total",
            "Calls per tenant, caller, operation and outcome (tenants and callers past the \
             first usage_metrics_top are summed as \"other\").",
            MetricType::COUNTER,
            series
                .iter()
                .map(|(tenant, caller, operation, outcome, counts)| {
                    counter(
                        &[
                            ("tenant", tenant),
                            ("caller", caller),
                            ("operation", operation),
                            ("outcome", outcome),
                        ],
                        counts.calls,
                    )
                })
                .collect(),
        )];
        type Field = fn(&UsageCounts) -> u64;
        let fields: [(&str, &str, Field); 4] = [
            ("items", "Items carried by calls", |c| c.items),
            ("failed_items", "Failed items of partial batches", |c| {
                c.failed_items
            }),
            ("request_bytes", "Encoded request bytes", |c| {
                c.request_bytes
            }),
            ("response_bytes", "Encoded response bytes", |c| {
                c.response_bytes
            }),
        ];
        for (name, help, field) in fields {
            let mut summed: std::collections::BTreeMap<(&str, &str, &str), u64> =
                std::collections::BTreeMap::new();
            for (tenant, caller, operation, _, counts) in &series {
                let slot = summed.entry((tenant, caller, operation)).or_default();
                *slot = slot.saturating_add(field(counts));
            }
            families.push(family(
                &format!("tenant_kms_usage_{name}_total"),
                &format!("{help}, per tenant, caller and operation."),
                MetricType::COUNTER,
                summed
                    .into_iter()
                    .map(|((tenant, caller, operation), value)| {
                        counter(
                            &[
                                ("tenant", tenant),
                                ("caller", caller),
                                ("operation", operation),
                            ],
                            value,
                        )
                    })
                    .collect(),
            ));
        }
        families.push(family(
            "tenant_kms_usage_dropped_total",
            "Calls not counted per minute because too many distinct cells waited for a flush.",
            MetricType::COUNTER,
            vec![counter(&[], dropped)],
        ));
        families
    }
}

fn rows_of(pending: &BTreeMap<i64, PendingCells>) -> Vec<UsageRow> {
    let mut rows = Vec::new();
    for (minute, cells) in pending {
        for (key, counts) in cells {
            rows.push(UsageRow {
                minute: *minute,
                tenant: key.tenant.clone(),
                caller: key.caller.clone(),
                operation: key.operation.to_owned(),
                outcome: key.outcome.to_owned(),
                counts: *counts,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::usage::SqliteUsageStore;

    fn one(calls: u64) -> UsageCounts {
        UsageCounts {
            calls,
            items: calls,
            ..Default::default()
        }
    }

    fn meter(top: usize) -> (Arc<UsageMeter>, Arc<ManualClock>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteUsageStore::open(&dir.path().join("usage.db")).unwrap());
        let clock = ManualClock::at_micros(1_800_000_000_000_000);
        let policy = UsagePolicy {
            metrics_top: top,
            ..Default::default()
        };
        let meter = Arc::new(UsageMeter::new(policy, clock.clone(), store));
        (meter, clock, dir)
    }

    #[test]
    fn query_sums_flushed_and_pending_minutes_in_range() {
        let (meter, clock, _dir) = meter(10);
        let start = minute_of(clock.now_micros());
        meter.record("t1", "token:a", "Decrypt", "ok", &one(2));
        meter.flush().unwrap();
        meter.record("t1", "token:a", "Decrypt", "ok", &one(3));
        clock.advance(Duration::from_secs(60));
        meter.record("t1", "token:a", "Decrypt", "ok", &one(5));
        meter.record("t2", "token:a", "Decrypt", "ok", &one(7));
        let all = meter.query("t1", start, start + 120).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].counts.calls, 10);
        let first = meter.query("t1", start, start + 60).unwrap();
        assert_eq!(first[0].counts.calls, 5);
        meter.flush().unwrap();
        let flushed = meter.query("t1", start + 60, start + 120).unwrap();
        assert_eq!(flushed[0].counts.calls, 5);
        assert!(
            meter
                .query("t1", start + 120, start + 180)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn labels_past_the_top_are_other() {
        let (meter, _clock, _dir) = meter(1);
        meter.record("t1", "token:a", "Encrypt", "ok", &one(1));
        meter.record("t2", "token:b", "Encrypt", "denied", &one(1));
        let out = crate::metrics::encode(meter.families());
        assert!(out.contains(
            "tenant_kms_usage_calls_total{tenant=\"t1\",caller=\"token:a\",operation=\"Encrypt\",outcome=\"ok\"} 1"
        ), "{out}");
        assert!(out.contains(
            "tenant_kms_usage_calls_total{tenant=\"other\",caller=\"other\",operation=\"Encrypt\",outcome=\"denied\"} 1"
        ), "{out}");
        assert!(!out.contains("t2"), "{out}");
    }

    /// A store whose writes fail until told otherwise.
    struct FlakyStore {
        failing: std::sync::atomic::AtomicBool,
        inner: SqliteUsageStore,
    }

    impl UsageStore for FlakyStore {
        fn add(&self, rows: &[UsageRow]) -> Result<()> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::error::Error::Internal("store down".into()));
            }
            self.inner.add(rows)
        }

        fn query(&self, tenant: &str, since: i64, until: i64) -> Result<Vec<UsageRow>> {
            self.inner.query(tenant, since, until)
        }
    }

    #[test]
    fn a_failed_flush_keeps_every_cell_apart_and_adds_later_counts_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlakyStore {
            failing: std::sync::atomic::AtomicBool::new(true),
            inner: SqliteUsageStore::open(&dir.path().join("usage.db")).unwrap(),
        });
        let clock = ManualClock::at_micros(1_800_000_000_000_000);
        let start = minute_of(clock.now_micros());
        let meter = UsageMeter::new(UsagePolicy::default(), clock.clone(), store.clone());
        meter.record("t1", "token:a", "Encrypt", "ok", &one(1));
        meter.record("t1", "token:b", "Encrypt", "ok", &one(2));
        meter.record("t1", "token:a", "Decrypt", "ok", &one(4));
        meter.record("t1", "token:a", "Decrypt", "denied", &one(8));
        meter.record("t2", "token:a", "Encrypt", "ok", &one(16));
        assert!(meter.flush().is_err());
        meter.record("t1", "token:a", "Encrypt", "ok", &one(32));
        clock.advance(Duration::from_secs(60));
        meter.record("t1", "token:a", "Encrypt", "ok", &one(64));
        store
            .failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            meter.flush().unwrap(),
            6,
            "five cells of the first minute, one of the next"
        );
        let sums = meter.query("t1", start, start + 120).unwrap();
        let calls = |caller: &str, operation: &str, outcome: &str| {
            sums.iter()
                .find(|s| s.caller == caller && s.operation == operation && s.outcome == outcome)
                .map(|s| s.counts.calls)
        };
        assert_eq!(calls("token:a", "Encrypt", "ok"), Some(97));
        assert_eq!(calls("token:b", "Encrypt", "ok"), Some(2));
        assert_eq!(calls("token:a", "Decrypt", "ok"), Some(4));
        assert_eq!(calls("token:a", "Decrypt", "denied"), Some(8));
        assert_eq!(sums.len(), 4, "t2's cell is not t1's: {sums:?}");
        assert_eq!(
            meter.query("t2", start, start + 60).unwrap()[0]
                .counts
                .calls,
            16
        );
    }
}
