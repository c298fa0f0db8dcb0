//! The in-memory side of usage accounting: per-minute cells waiting for the next flush, and
//! cumulative counters with bounded labels for `/metrics`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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

/// operation, outcome → counts.
type Cells = HashMap<(&'static str, &'static str), UsageCounts>;
/// tenant → caller → cells.
type Nested = HashMap<String, HashMap<String, Cells>>;

/// The counts of `tenant`, `caller`, `operation`, `outcome` in `map`, created at zero when
/// missing (allocating only then), or `None` when missing and `create` is false.
fn cell<'a>(
    map: &'a mut Nested,
    tenant: &str,
    caller: &str,
    key: (&'static str, &'static str),
    create: bool,
) -> Option<&'a mut UsageCounts> {
    if !create {
        // The common case, a cell that exists: one lookup per level.
        return map.get_mut(tenant)?.get_mut(caller)?.get_mut(&key);
    }
    if !map.contains_key(tenant) {
        map.insert(tenant.to_owned(), HashMap::new());
    }
    let callers = map.get_mut(tenant)?;
    if !callers.contains_key(caller) {
        callers.insert(caller.to_owned(), HashMap::new());
    }
    let cells = callers.get_mut(caller)?;
    Some(cells.entry(key).or_default())
}

#[derive(Default)]
struct Inner {
    /// Minute start → cells not yet flushed.
    pending: HashMap<i64, Nested>,
    pending_cells: usize,
    /// Cumulative counts by bounded label (tenant or `other`, caller or `other`).
    totals: Nested,
    labelled_tenants: HashSet<String>,
    labelled_callers: HashSet<String>,
    dropped: u64,
}

impl Inner {
    fn label<'a>(set: &mut HashSet<String>, top: usize, name: &'a str) -> &'a str {
        if set.contains(name) {
            name
        } else if set.len() < top {
            set.insert(name.to_owned());
            name
        } else {
            OTHER
        }
    }

    fn merge(&mut self, pending: HashMap<i64, Nested>) {
        for (minute, tenants) in pending {
            for (tenant, callers) in tenants {
                for (caller, cells) in callers {
                    for (key, counts) in cells {
                        let slot = self.pending.entry(minute).or_default();
                        if let Some(c) = cell(slot, &tenant, &caller, key, true) {
                            c.add(&counts);
                        }
                        self.pending_cells += 1;
                    }
                }
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
    /// one uncontended mutex, a few hash lookups, no allocation for a key seen before.
    pub fn record(
        &self,
        tenant: &str,
        caller: &str,
        operation: &'static str,
        outcome: &'static str,
        counts: &UsageCounts,
    ) {
        let minute = minute_of(self.clock.now_micros());
        let key = (operation, outcome);
        let mut inner = self.inner();
        let inner = &mut *inner;
        let full = inner.pending_cells >= MAX_PENDING_CELLS;
        let slot = inner.pending.entry(minute).or_default();
        match cell(slot, tenant, caller, key, false) {
            Some(c) => c.add(counts),
            None if full => {
                inner.dropped = inner.dropped.saturating_add(counts.calls);
                self.flush_now.notify_one();
            }
            None => {
                if let Some(c) = cell(slot, tenant, caller, key, true) {
                    c.add(counts);
                }
                inner.pending_cells += 1;
            }
        }
        let top = self.policy.metrics_top;
        let tenant_label = Inner::label(&mut inner.labelled_tenants, top, tenant);
        let caller_label = Inner::label(&mut inner.labelled_callers, top, caller);
        if let Some(c) = cell(&mut inner.totals, tenant_label, caller_label, key, false) {
            c.add(counts);
        } else if let Some(c) = cell(&mut inner.totals, tenant_label, caller_label, key, true) {
            c.add(counts);
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
        let inner = self.inner();
        for (minute, tenants) in &inner.pending {
            if *minute < since || *minute >= until {
                continue;
            }
            for (caller, cells) in tenants.get(tenant).into_iter().flatten() {
                for ((operation, outcome), counts) in cells {
                    sums.entry((
                        caller.clone(),
                        (*operation).to_owned(),
                        (*outcome).to_owned(),
                    ))
                    .or_default()
                    .add(counts);
                }
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
            for (tenant, callers) in &inner.totals {
                for (caller, cells) in callers {
                    for ((operation, outcome), counts) in cells {
                        series.push((tenant.clone(), caller.clone(), operation, outcome, *counts));
                    }
                }
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

fn rows_of(pending: &HashMap<i64, Nested>) -> Vec<UsageRow> {
    let mut rows = Vec::new();
    for (minute, tenants) in pending {
        for (tenant, callers) in tenants {
            for (caller, cells) in callers {
                for ((operation, outcome), counts) in cells {
                    rows.push(UsageRow {
                        minute: *minute,
                        tenant: tenant.clone(),
                        caller: caller.clone(),
                        operation: (*operation).to_owned(),
                        outcome: (*outcome).to_owned(),
                        counts: *counts,
                    });
                }
            }
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
}
