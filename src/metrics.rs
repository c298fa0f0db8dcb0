//! Process-wide service metrics and the Prometheus text endpoint that exposes them.
//!
//! Recording is lock-free on the hot path (relaxed atomics; one read lock to find an RPC's
//! slot), so it costs tens of nanoseconds per call. What is recorded:
//!
//! - per RPC: calls by outcome and a latency histogram (from the start of a call to its
//!   audited answer);
//! - audit group commit: records per batch, commit latency, failed commits;
//! - anomalies found by the detectors (`crate::detect`), by detector, and what became of
//!   their webhook alerts (`crate::webhook`);
//! - the tenant-key cache: hits and misses, and whole-cache drops after a change made by
//!   another process;
//! - anything a caller of [`serve`] adds at scrape time (the server adds the nonce budget of
//!   its cached tenant keys).
//!
//! The registry is global to the process ([`global`]), so the lower layers (`audit`, `keys`)
//! record without any handle being passed down; several servers in one process (tests) share
//! it. Nothing secret is ever recorded: names, counts and durations only.
//!
//! The endpoint ([`serve`]) speaks plain HTTP/1.1 (hyper) on its own listener, separate from
//! the gRPC port, and answers `GET /metrics` only. It is off unless `serve --metrics-listen`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Latency bucket upper bounds, in microseconds (rendered in seconds).
const LATENCY_BOUNDS_US: &[u64] = &[
    50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 204_800, 409_600,
    819_200, 1_638_400, 5_000_000,
];

/// Audit batch size bucket upper bounds, in records.
const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The outcome names RPC counters know (the audit outcomes); anything else counts as `other`.
const OUTCOMES: &[&str] = &[
    "ok",
    "partial",
    "unauthenticated",
    "denied",
    "invalid",
    "not_found",
    "already_exists",
    "failed_precondition",
    "exhausted",
    "unavailable",
    "internal",
    "other",
];

/// A cumulative histogram with fixed bucket bounds (Prometheus semantics).
pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound, plus the overflow (`+Inf`) bucket; not cumulative in memory.
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation (in the histogram's unit).
    pub fn observe(&self, value: u64) {
        let index = self.bounds.partition_point(|&bound| bound < value);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// How many observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; values are divided by `per_unit`
    /// (1e6 turns microseconds into seconds), `labels` are extra labels (`k="v",` form, may be
    /// empty).
    fn render(&self, out: &mut String, name: &str, labels: &str, per_unit: f64) {
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = *bound as f64 / per_unit;
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        if let Some(overflow) = self.buckets.last() {
            cumulative += overflow.load(Ordering::Relaxed);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let trimmed = labels.trim_end_matches(',');
        let braced = if trimmed.is_empty() {
            String::new()
        } else {
            format!("{{{trimmed}}}")
        };
        let sum = self.sum.load(Ordering::Relaxed) as f64 / per_unit;
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

/// Counters of one RPC.
struct RpcMetrics {
    outcomes: Vec<AtomicU64>,
    latency: Histogram,
}

impl RpcMetrics {
    fn new() -> Self {
        Self {
            outcomes: OUTCOMES.iter().map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::new(LATENCY_BOUNDS_US),
        }
    }
}

/// Every metric of the process.
pub struct Registry {
    rpcs: RwLock<BTreeMap<&'static str, Arc<RpcMetrics>>>,
    audit_batch_records: Histogram,
    audit_commit_latency: Histogram,
    audit_commit_failures: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_drops: AtomicU64,
    /// Findings per detector, indexed like [`crate::detect::Detector::ALL`].
    anomalies: [AtomicU64; 5],
    /// Anomaly webhook alerts, indexed like [`WebhookEvent::ALL`].
    webhook: [AtomicU64; 4],
    rotation_due: AtomicU64,
    deletions_closing: AtomicU64,
    /// Per audit stream sink: lag, delivered records, failed attempts (one update per batch).
    streams: std::sync::Mutex<BTreeMap<&'static str, StreamCounts>>,
}

/// What became of an anomaly webhook alert, or of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookEvent {
    /// An alert the endpoint acknowledged (2xx).
    Delivered,
    /// A failed attempt that will be retried.
    Retried,
    /// An alert given up on (out of retries, or refused with a 4xx).
    Failed,
    /// An alert dropped before any attempt: the queue was full.
    Dropped,
}

impl WebhookEvent {
    /// Every event, in the registry's order.
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::Delivered,
        WebhookEvent::Retried,
        WebhookEvent::Failed,
        WebhookEvent::Dropped,
    ];

    /// The metric family counting it.
    pub const fn metric(self) -> &'static str {
        match self {
            WebhookEvent::Delivered => "tenant_kms_anomaly_webhook_delivered_total",
            WebhookEvent::Retried => "tenant_kms_anomaly_webhook_retries_total",
            WebhookEvent::Failed => "tenant_kms_anomaly_webhook_failures_total",
            WebhookEvent::Dropped => "tenant_kms_anomaly_webhook_dropped_total",
        }
    }

    const fn help(self) -> &'static str {
        match self {
            WebhookEvent::Delivered => "Anomaly alerts the webhook endpoint acknowledged (2xx).",
            WebhookEvent::Retried => "Failed anomaly webhook attempts that were retried.",
            WebhookEvent::Failed => {
                "Anomaly alerts given up on (out of retries, or refused with a 4xx)."
            }
            WebhookEvent::Dropped => {
                "Anomaly alerts dropped because the webhook queue was full (the Anomaly audit \
                 record is kept)."
            }
        }
    }
}

/// What one audit stream sink reported.
#[derive(Default, Clone, Copy)]
struct StreamCounts {
    lag: u64,
    delivered: u64,
    failed: u64,
}

/// The horizon of `tenant_kms_tenant_deletions_closing`: deletions whose window closes within
/// this many seconds (a day: time for an operator to cancel one made in error).
pub const DELETION_CLOSING_HORIZON_SECONDS: i64 = 24 * 3600;

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        rpcs: RwLock::new(BTreeMap::new()),
        audit_batch_records: Histogram::new(BATCH_BOUNDS),
        audit_commit_latency: Histogram::new(LATENCY_BOUNDS_US),
        audit_commit_failures: AtomicU64::new(0),
        cache_hits: AtomicU64::new(0),
        cache_misses: AtomicU64::new(0),
        cache_drops: AtomicU64::new(0),
        anomalies: Default::default(),
        webhook: Default::default(),
        rotation_due: AtomicU64::new(0),
        deletions_closing: AtomicU64::new(0),
        streams: std::sync::Mutex::new(BTreeMap::new()),
    })
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

impl Registry {
    /// Records one finished RPC: its name, its audit outcome and how long it took.
    pub fn rpc(&self, operation: &'static str, outcome: &str, elapsed: Duration) {
        let existing = self
            .rpcs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(operation)
            .cloned();
        let slot = match existing {
            Some(slot) => slot,
            None => Arc::clone(
                self.rpcs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(operation)
                    .or_insert_with(|| Arc::new(RpcMetrics::new())),
            ),
        };
        let index = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        if let Some(counter) = slot.outcomes.get(index) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        slot.latency.observe(micros(elapsed));
    }

    /// Records one audit group commit of `records` records.
    pub fn audit_commit(&self, records: usize, elapsed: Duration, ok: bool) {
        self.audit_batch_records.observe(records as u64);
        self.audit_commit_latency.observe(micros(elapsed));
        if !ok {
            self.audit_commit_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a tenant-key cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that the whole cache was dropped (another process changed the key store).
    pub fn cache_dropped(&self) {
        self.cache_drops.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one anomaly found by `detector`.
    pub fn anomaly(&self, detector: crate::detect::Detector) {
        if let Some(counter) = self.anomalies.get(detector.index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Anomalies found by `detector` so far (tests read it).
    pub fn anomalies(&self, detector: crate::detect::Detector) -> u64 {
        self.anomalies
            .get(detector.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one anomaly webhook `event`.
    pub fn webhook(&self, event: WebhookEvent) {
        if let Some(counter) = self.webhook.get(event as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many of `event` so far (tests read it).
    pub fn webhook_count(&self, event: WebhookEvent) -> u64 {
        self.webhook
            .get(event as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Records what the server's periodic lifecycle check found: active tenants whose key
    /// rotation is due (older than their rotation period, or near their nonce budget), and
    /// pending deletions whose window closes within [`DELETION_CLOSING_HORIZON_SECONDS`].
    pub fn lifecycle(&self, rotation_due: u64, deletions_closing: u64) {
        self.rotation_due.store(rotation_due, Ordering::Relaxed);
        self.deletions_closing
            .store(deletions_closing, Ordering::Relaxed);
    }

    fn stream(&self, sink: &'static str, update: impl FnOnce(&mut StreamCounts)) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        update(streams.entry(sink).or_default());
    }

    /// Sets how many committed records `sink` has not acknowledged yet.
    pub fn stream_lag(&self, sink: &'static str, records: u64) {
        self.stream(sink, |s| s.lag = records);
    }

    /// Counts `records` delivered to and acknowledged by `sink`.
    pub fn stream_delivered(&self, sink: &'static str, records: u64) {
        self.stream(sink, |s| s.delivered = s.delivered.saturating_add(records));
    }

    /// Counts a failed delivery attempt to `sink` (the batch is sent again).
    pub fn stream_failed(&self, sink: &'static str) {
        self.stream(sink, |s| s.failed = s.failed.saturating_add(1));
    }

    /// Audit batches committed so far (tests and `bench` read it).
    pub fn audit_commits(&self) -> u64 {
        self.audit_batch_records.count()
    }

    /// The whole registry in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP tenant_kms_rpc_total RPCs finished, by method and audit outcome.\n");
        out.push_str("# TYPE tenant_kms_rpc_total counter\n");
        let rpcs: Vec<(&'static str, Arc<RpcMetrics>)> = self
            .rpcs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, Arc::clone(v)))
            .collect();
        for (method, slot) in &rpcs {
            for (outcome, counter) in OUTCOMES.iter().zip(&slot.outcomes) {
                let n = counter.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "tenant_kms_rpc_total{{method=\"{method}\",outcome=\"{outcome}\"}} {n}"
                    );
                }
            }
        }
        out.push_str(
            "# HELP tenant_kms_rpc_duration_seconds Time from a call's arrival to its audited \
             answer.\n# TYPE tenant_kms_rpc_duration_seconds histogram\n",
        );
        for (method, slot) in &rpcs {
            slot.latency.render(
                out,
                "tenant_kms_rpc_duration_seconds",
                &format!("method=\"{method}\","),
                1e6,
            );
        }
        out.push_str(
            "# HELP tenant_kms_audit_batch_records Records committed per audit group commit.\n\
             # TYPE tenant_kms_audit_batch_records histogram\n",
        );
        self.audit_batch_records
            .render(out, "tenant_kms_audit_batch_records", "", 1.0);
        out.push_str(
            "# HELP tenant_kms_audit_commit_seconds Time of one audit group commit (with its \
             fsync under fsync durability).\n# TYPE tenant_kms_audit_commit_seconds histogram\n",
        );
        self.audit_commit_latency
            .render(out, "tenant_kms_audit_commit_seconds", "", 1e6);
        let counters = [
            (
                "tenant_kms_audit_commit_failures_total",
                "Audit group commits that failed (their calls failed closed).",
                &self.audit_commit_failures,
            ),
            (
                "tenant_kms_key_cache_hits_total",
                "Tenant-key cache lookups that found the tenant.",
                &self.cache_hits,
            ),
            (
                "tenant_kms_key_cache_misses_total",
                "Tenant-key cache lookups that had to load and unwrap from the key store.",
                &self.cache_misses,
            ),
            (
                "tenant_kms_key_cache_drops_total",
                "Whole-cache drops after another process changed the key store.",
                &self.cache_drops,
            ),
        ];
        // Every detector's series, zeros included, so alert rules see them from the start.
        out.push_str(
            "# HELP tenant_kms_anomalies_total Anomalies found by the in-process detectors.\n\
             # TYPE tenant_kms_anomalies_total counter\n",
        );
        for (detector, counter) in crate::detect::Detector::ALL.iter().zip(&self.anomalies) {
            let _ = writeln!(
                out,
                "tenant_kms_anomalies_total{{detector=\"{}\"}} {}",
                detector.name(),
                counter.load(Ordering::Relaxed)
            );
        }
        for event in WebhookEvent::ALL {
            let name = event.metric();
            let _ = writeln!(
                out,
                "# HELP {name} {}\n# TYPE {name} counter\n{name} {}",
                event.help(),
                self.webhook_count(event)
            );
        }
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "tenant_kms_tenants_rotation_due",
                "Active tenants whose key rotation is due (period passed or nonce budget near its \
                 end), at the last lifecycle check (every minute).",
                &self.rotation_due,
            ),
            (
                "tenant_kms_tenant_deletions_closing",
                "Pending tenant deletions whose window closes within a day (the tenant's keys are \
                 then destroyed), at the last lifecycle check.",
                &self.deletions_closing,
            ),
        ];
        let streams: Vec<(&'static str, StreamCounts)> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        type Field = fn(&StreamCounts) -> u64;
        let stream_families: [(&str, &str, &str, Field); 3] = [
            (
                "tenant_kms_audit_stream_lag_records",
                "gauge",
                "Committed audit records a SIEM sink has not acknowledged yet.",
                |s| s.lag,
            ),
            (
                "tenant_kms_audit_stream_delivered_total",
                "counter",
                "Audit records a SIEM sink acknowledged (repeats after a failure included).",
                |s| s.delivered,
            ),
            (
                "tenant_kms_audit_stream_failures_total",
                "counter",
                "Failed deliveries to a SIEM sink (each batch is retried).",
                |s| s.failed,
            ),
        ];
        for (name, kind, help, field) in stream_families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (sink, counts) in &streams {
                let _ = writeln!(out, "{name}{{sink=\"{sink}\"}} {}", field(counts));
            }
        }
        for (name, help, gauge) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                gauge.load(Ordering::Relaxed)
            );
        }
    }
}

/// Scrape-time additions to the registry's text (e.g. gauges read from the key cache).
pub type Extra = Arc<dyn Fn(&mut String) + Send + Sync>;

/// The body of one scrape: the registry, then `extra`'s lines.
pub fn scrape(extra: &Extra) -> String {
    let mut out = String::with_capacity(16 * 1024);
    global().render(&mut out);
    extra(&mut out);
    out
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown` completes.
/// Every other path is 404. Each connection is served on its own task; a broken connection
/// only ends itself.
pub async fn serve(
    listener: tokio::net::TcpListener,
    extra: Extra,
    shutdown: impl Future<Output = ()> + Send,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let extra = Arc::clone(&extra);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let extra = Arc::clone(&extra);
                async move {
                    if request.method() == hyper::Method::GET && request.uri().path() == "/metrics"
                    {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(scrape(&extra))))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"only /metrics is here\n")))
                    }
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[10, 100]);
        h.observe(5);
        h.observe(10);
        h.observe(50);
        h.observe(1000);
        let mut out = String::new();
        h.render(&mut out, "x", "", 1.0);
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 1065\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn rpc_outcomes_render() {
        let registry = global();
        registry.rpc("UnitTestRpc", "ok", Duration::from_micros(70));
        registry.rpc("UnitTestRpc", "bogus", Duration::from_micros(70));
        let mut out = String::new();
        registry.render(&mut out);
        assert!(out.contains("tenant_kms_rpc_total{method=\"UnitTestRpc\",outcome=\"ok\"}"));
        assert!(out.contains("tenant_kms_rpc_total{method=\"UnitTestRpc\",outcome=\"other\"}"));
        assert!(out.contains("tenant_kms_rpc_duration_seconds_bucket{method=\"UnitTestRpc\","));
    }
}
