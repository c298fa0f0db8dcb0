//! Process-wide service metrics and the Prometheus text endpoint that exposes them.
//!
//! The metrics are instruments of the `prometheus` crate (TiKV's Rust client) in one registry
//! per process, and the crate's `TextEncoder` writes the exposition (text format 0.0.4): no
//! metric line is formatted by hand here. What is recorded:
//!
//! - per RPC: calls by outcome and a latency histogram (from the start of a call to its
//!   audited answer);
//! - audit group commit: records per batch, commit latency, failed commits;
//! - anomalies found by the detectors (`crate::detect`), by detector, and what became of
//!   their webhook alerts (`crate::webhook`);
//! - the tenant-key cache: hits and misses, and whole-cache drops after a change made by
//!   another process;
//! - audit streaming to a SIEM, per sink: lag, delivered records, failed attempts;
//! - anything a caller of [`serve`] adds at scrape time ([`Extra`]: the server adds the nonce
//!   budget of its cached tenant keys and its usage per tenant and caller).
//!
//! **Hot path.** Recording an RPC, a cache lookup or an anomaly is a relaxed atomic increment
//! on a handle resolved beforehand: the label sets are looked up once (the first call of an
//! RPC with an outcome, through a `OnceLock` per RPC and outcome; the detectors at start), never
//! by formatting or hashing a name per call. A histogram observation is a few atomic
//! operations in the crate (no lock, no allocation).
//!
//! The registry is global to the process ([`global`]), so the lower layers (`audit`, `keys`)
//! record without any handle being passed down; several servers in one process (tests) share
//! it. Nothing secret is ever recorded: names, counts and durations only.
//!
//! The endpoint ([`serve`]) speaks plain HTTP/1.1 (hyper) on its own listener, separate from
//! the gRPC port, and answers `GET /metrics` only. It is off unless `serve --metrics-listen`.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::audit::operation::Rpc;
use crate::detect::Detector;

/// Latency bucket upper bounds, in seconds (50 µs doubling to 1.6384 s, then 5 s).
const LATENCY_BOUNDS_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512,
    0.1024, 0.2048, 0.4096, 0.8192, 1.6384, 5.0,
];

/// Audit batch size bucket upper bounds, in records.
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The outcome names RPC counters know (the audit outcomes); anything else counts as `other`.
const OUTCOMES: [&str; 12] = [
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

/// The horizon of `tenant_kms_tenant_deletions_closing`: deletions whose window closes within
/// this many seconds (a day: time for an operator to cancel one made in error).
pub const DELETION_CLOSING_HORIZON_SECONDS: i64 = 24 * 3600;

/// The series of one RPC, resolved on first use: one counter per outcome (so a series appears
/// once it counts something) and the latency histogram.
struct RpcSeries {
    outcomes: [OnceLock<IntCounter>; OUTCOMES.len()],
    latency: OnceLock<Histogram>,
}

/// Every metric of the process.
pub struct Registry {
    registry: prometheus::Registry,
    rpc_calls: IntCounterVec,
    rpc_latency: HistogramVec,
    /// Indexed like [`Rpc::ALL`].
    rpcs: Vec<RpcSeries>,
    audit_batch_records: Histogram,
    audit_commit_latency: Histogram,
    audit_commit_failures: IntCounter,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_drops: IntCounter,
    /// Findings per detector, indexed like [`Detector::ALL`] (every series exists from the
    /// start, zeros included, so alert rules see them).
    anomalies: [IntCounter; Detector::ALL.len()],
    /// Anomaly webhook alerts, indexed like [`WebhookEvent::ALL`].
    webhook: [IntCounter; WebhookEvent::ALL.len()],
    rotation_due: IntGauge,
    deletions_closing: IntGauge,
    stream_lag: IntGaugeVec,
    stream_delivered: IntCounterVec,
    stream_failed: IntCounterVec,
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

/// Registers `metric` in `registry` and returns it.
///
/// Every name, help text, label and bucket list given to this module is a constant, valid and
/// unique (the unit test `every_family_is_exported` builds the whole registry), so neither the
/// construction nor the registration can fail at run time.
#[allow(clippy::expect_used)]
fn registered<M>(registry: &prometheus::Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("constant metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric name");
    metric
}

impl Registry {
    /// A registry holding every family, with no observation yet.
    fn new() -> Self {
        let r = prometheus::Registry::new();
        let counter = |name: &str, help: &str| registered(&r, IntCounter::new(name, help));
        let gauge = |name: &str, help: &str| registered(&r, IntGauge::new(name, help));
        let histogram = |name: &str, help: &str, bounds: &[f64]| {
            registered(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(bounds.to_vec())),
            )
        };
        let rpc_calls = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tenant_kms_rpc_total",
                    "RPCs finished, by method and audit outcome.",
                ),
                &["method", "outcome"],
            ),
        );
        let rpc_latency = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "tenant_kms_rpc_duration_seconds",
                    "Time from a call's arrival to its audited answer.",
                )
                .buckets(LATENCY_BOUNDS_SECONDS.to_vec()),
                &["method"],
            ),
        );
        let anomalies = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tenant_kms_anomalies_total",
                    "Anomalies found by the in-process detectors.",
                ),
                &["detector"],
            ),
        );
        let stream_lag = registered(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "tenant_kms_audit_stream_lag_records",
                    "Committed audit records a SIEM sink has not acknowledged yet.",
                ),
                &["sink"],
            ),
        );
        let stream_delivered = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tenant_kms_audit_stream_delivered_total",
                    "Audit records a SIEM sink acknowledged (repeats after a failure included).",
                ),
                &["sink"],
            ),
        );
        let stream_failed = registered(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "tenant_kms_audit_stream_failures_total",
                    "Failed deliveries to a SIEM sink (each batch is retried).",
                ),
                &["sink"],
            ),
        );
        Self {
            rpcs: Rpc::ALL
                .iter()
                .map(|_| RpcSeries {
                    outcomes: std::array::from_fn(|_| OnceLock::new()),
                    latency: OnceLock::new(),
                })
                .collect(),
            audit_batch_records: histogram(
                "tenant_kms_audit_batch_records",
                "Records committed per audit group commit.",
                BATCH_BOUNDS,
            ),
            audit_commit_latency: histogram(
                "tenant_kms_audit_commit_seconds",
                "Time of one audit group commit (with its fsync under fsync durability, except for the writer thread's batches, whose fsync runs apart, pipelined).",
                LATENCY_BOUNDS_SECONDS,
            ),
            audit_commit_failures: counter(
                "tenant_kms_audit_commit_failures_total",
                "Audit group commits that failed (their calls failed closed).",
            ),
            cache_hits: counter(
                "tenant_kms_key_cache_hits_total",
                "Tenant-key cache lookups that found the tenant.",
            ),
            cache_misses: counter(
                "tenant_kms_key_cache_misses_total",
                "Tenant-key cache lookups that had to load and unwrap from the key store.",
            ),
            cache_drops: counter(
                "tenant_kms_key_cache_drops_total",
                "Whole-cache drops after another process changed the key store.",
            ),
            anomalies: Detector::ALL.map(|d| anomalies.with_label_values(&[d.name()])),
            webhook: WebhookEvent::ALL.map(|e| counter(e.metric(), e.help())),
            rotation_due: gauge(
                "tenant_kms_tenants_rotation_due",
                "Active tenants whose key rotation is due (period passed or nonce budget near its \
                 end), at the last lifecycle check (every minute).",
            ),
            deletions_closing: gauge(
                "tenant_kms_tenant_deletions_closing",
                "Pending tenant deletions whose window closes within a day (the tenant's keys are \
                 then destroyed), at the last lifecycle check.",
            ),
            registry: r,
            rpc_calls,
            rpc_latency,
            stream_lag,
            stream_delivered,
            stream_failed,
        }
    }
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// A count as a gauge value (saturating: the gauges are signed).
fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Registry {
    /// Records one finished RPC: which one, its audit outcome and how long it took.
    pub fn rpc(&self, operation: Rpc, outcome: &str, elapsed: Duration) {
        let Some(series) = self.rpcs.get(operation as usize) else {
            return;
        };
        let index = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(OUTCOMES.len() - 1);
        if let (Some(cell), Some(name)) = (series.outcomes.get(index), OUTCOMES.get(index)) {
            cell.get_or_init(|| {
                self.rpc_calls
                    .with_label_values(&[operation.stored_name(), name])
            })
            .inc();
        }
        series
            .latency
            .get_or_init(|| {
                self.rpc_latency
                    .with_label_values(&[operation.stored_name()])
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one audit group commit of `records` records.
    pub fn audit_commit(&self, records: usize, elapsed: Duration, ok: bool) {
        self.audit_batch_records.observe(records as f64);
        self.audit_commit_latency.observe(elapsed.as_secs_f64());
        if !ok {
            self.audit_commit_failures.inc();
        }
    }

    /// Records a tenant-key cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    /// Records that the whole cache was dropped (another process changed the key store).
    pub fn cache_dropped(&self) {
        self.cache_drops.inc();
    }

    /// Counts one anomaly webhook `event`.
    pub fn webhook(&self, event: WebhookEvent) {
        if let Some(counter) = self.webhook.get(event as usize) {
            counter.inc();
        }
    }

    /// How many of `event` so far (tests read it).
    pub fn webhook_count(&self, event: WebhookEvent) -> u64 {
        self.webhook.get(event as usize).map_or(0, |c| c.get())
    }

    /// Records one anomaly found by `detector`.
    pub fn anomaly(&self, detector: Detector) {
        if let Some(counter) = self.anomalies.get(detector.index()) {
            counter.inc();
        }
    }

    /// Anomalies found by `detector` so far (tests read it).
    pub fn anomalies(&self, detector: Detector) -> u64 {
        self.anomalies.get(detector.index()).map_or(0, |c| c.get())
    }

    /// Records what the server's periodic lifecycle check found: active tenants whose key
    /// rotation is due (older than their rotation period, or near their nonce budget), and
    /// pending deletions whose window closes within [`DELETION_CLOSING_HORIZON_SECONDS`].
    pub fn lifecycle(&self, rotation_due: u64, deletions_closing: u64) {
        self.rotation_due.set(signed(rotation_due));
        self.deletions_closing.set(signed(deletions_closing));
    }

    /// Makes `sink`'s stream series exist (at zero) as soon as the sink is configured, so that
    /// the lag alert sees the sink before its first batch.
    pub fn stream_configured(&self, sink: &'static str) {
        self.stream_lag.with_label_values(&[sink]);
        self.stream_delivered.with_label_values(&[sink]);
        self.stream_failed.with_label_values(&[sink]);
    }

    /// Sets how many committed records `sink` has not acknowledged yet.
    pub fn stream_lag(&self, sink: &'static str, records: u64) {
        self.stream_lag
            .with_label_values(&[sink])
            .set(signed(records));
    }

    /// Counts `records` delivered to and acknowledged by `sink`.
    pub fn stream_delivered(&self, sink: &'static str, records: u64) {
        self.stream_delivered
            .with_label_values(&[sink])
            .inc_by(records);
    }

    /// Counts a failed delivery attempt to `sink` (the batch is sent again).
    pub fn stream_failed(&self, sink: &'static str) {
        self.stream_failed.with_label_values(&[sink]).inc();
    }

    /// Audit batches committed so far (tests and `bench` read it).
    pub fn audit_commits(&self) -> u64 {
        self.audit_batch_records.get_sample_count()
    }

    /// Every family of the registry with at least one series, sorted by name.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

/// Scrape-time additions to the registry's families (e.g. gauges read from the key cache),
/// built with [`family`] and [`sample`].
pub type Extra = Arc<dyn Fn() -> Vec<MetricFamily> + Send + Sync>;

/// A scrape-time metric family of `kind` (counter or gauge) named `name`, with `samples`.
pub fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<proto::Metric>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(samples);
    family
}

/// One sample of a scrape-time counter or gauge family (as `kind`) with `labels` (in the order
/// given; the encoder escapes their values).
pub fn sample(kind: MetricType, labels: &[(&str, &str)], value: f64) -> proto::Metric {
    let mut metric = proto::Metric::default();
    metric.set_label(
        labels
            .iter()
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*value).to_owned());
                pair
            })
            .collect(),
    );
    if kind == MetricType::COUNTER {
        let mut counter = proto::Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
    } else {
        let mut gauge = proto::Gauge::default();
        gauge.set_value(value);
        metric.set_gauge(gauge);
    }
    metric
}

/// `families` in the Prometheus text exposition format (version 0.0.4). A family without
/// series is left out (the format has no use for it and the encoder refuses it).
pub fn encode(mut families: Vec<MetricFamily>) -> String {
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::error!(error = %e, "metrics: a family could not be encoded");
    }
    out
}

/// The body of one scrape: the registry, then `extra`'s families.
pub fn scrape(extra: &Extra) -> String {
    let mut families = global().gather();
    families.extend(extra());
    encode(families)
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
    fn every_family_is_exported() {
        let registry = Registry::new();
        registry.rpc(Rpc::Encrypt, "ok", Duration::from_micros(70));
        registry.stream_configured("file");
        let text = encode(registry.gather());
        for family in [
            "tenant_kms_rpc_total counter",
            "tenant_kms_rpc_duration_seconds histogram",
            "tenant_kms_audit_batch_records histogram",
            "tenant_kms_audit_commit_seconds histogram",
            "tenant_kms_audit_commit_failures_total counter",
            "tenant_kms_key_cache_hits_total counter",
            "tenant_kms_key_cache_misses_total counter",
            "tenant_kms_key_cache_drops_total counter",
            "tenant_kms_anomalies_total counter",
            "tenant_kms_tenants_rotation_due gauge",
            "tenant_kms_tenant_deletions_closing gauge",
            "tenant_kms_audit_stream_lag_records gauge",
            "tenant_kms_audit_stream_delivered_total counter",
            "tenant_kms_audit_stream_failures_total counter",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family}:\n{text}"
            );
        }
        // Every detector's series from the start, zeros included.
        for detector in Detector::ALL {
            let line = format!(
                "tenant_kms_anomalies_total{{detector=\"{}\"}} 0\n",
                detector.name()
            );
            assert!(text.contains(&line), "{line}:\n{text}");
        }
        assert!(text.contains("tenant_kms_audit_stream_lag_records{sink=\"file\"} 0\n"));
    }

    #[test]
    fn rpc_outcomes_and_latency_render_in_seconds() {
        let registry = Registry::new();
        registry.rpc(Rpc::Decrypt, "ok", Duration::from_micros(70));
        registry.rpc(Rpc::Decrypt, "ok", Duration::from_micros(150));
        registry.rpc(Rpc::Decrypt, "bogus", Duration::from_secs(9));
        let text = encode(registry.gather());
        for line in [
            "tenant_kms_rpc_total{method=\"Decrypt\",outcome=\"ok\"} 2\n",
            "tenant_kms_rpc_total{method=\"Decrypt\",outcome=\"other\"} 1\n",
            "tenant_kms_rpc_duration_seconds_bucket{method=\"Decrypt\",le=\"0.00005\"} 0\n",
            "tenant_kms_rpc_duration_seconds_bucket{method=\"Decrypt\",le=\"0.0001\"} 1\n",
            "tenant_kms_rpc_duration_seconds_bucket{method=\"Decrypt\",le=\"0.0002\"} 2\n",
            "tenant_kms_rpc_duration_seconds_bucket{method=\"Decrypt\",le=\"5\"} 2\n",
            "tenant_kms_rpc_duration_seconds_bucket{method=\"Decrypt\",le=\"+Inf\"} 3\n",
            "tenant_kms_rpc_duration_seconds_count{method=\"Decrypt\"} 3\n",
        ] {
            assert!(text.contains(line), "{line}:\n{text}");
        }
        // Outcomes never seen have no series; neither have RPCs never called.
        assert!(!text.contains("outcome=\"denied\""), "{text}");
        assert!(!text.contains("method=\"Encrypt\""), "{text}");
    }

    #[test]
    fn audit_commits_count_batches_and_failures() {
        let registry = Registry::new();
        registry.audit_commit(3, Duration::from_micros(300), true);
        registry.audit_commit(1, Duration::from_micros(300), false);
        assert_eq!(registry.audit_commits(), 2);
        let text = encode(registry.gather());
        assert!(
            text.contains("tenant_kms_audit_batch_records_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("tenant_kms_audit_batch_records_bucket{le=\"4\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tenant_kms_audit_batch_records_sum 4\n"),
            "{text}"
        );
        assert!(
            text.contains("tenant_kms_audit_commit_failures_total 1\n"),
            "{text}"
        );
    }

    #[test]
    fn scrape_time_families_keep_label_order_and_escape_values() {
        let text = encode(vec![
            family(
                "x_total",
                "X.",
                MetricType::COUNTER,
                vec![sample(
                    MetricType::COUNTER,
                    &[("tenant", "a\"b"), ("caller", "c")],
                    2.0,
                )],
            ),
            family("empty", "Left out.", MetricType::GAUGE, Vec::new()),
        ]);
        assert_eq!(
            text,
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{tenant=\"a\\\"b\",caller=\"c\"} 2\n"
        );
    }
}
