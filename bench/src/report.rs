//! The bench report: per-scenario figures with their echo baselines and ratios, the
//! in-process baselines, the targets checked against them, as a table or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::baseline::FsyncBaseline;
use super::churn::ChurnReport;

/// The in-process baselines of one run (medians over runs when several).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Baselines {
    /// AAD bytes a v1 field ciphertext authenticates for the bench's tenant and context.
    pub wire_aad_bytes: usize,
    /// ring AES-256-GCM seal of 64 B with the wire format's AAD length, ns.
    pub raw_seal_64_ns: f64,
    /// The same without AAD, ns.
    pub raw_seal_64_no_aad_ns: f64,
    /// ring seal of 4 KiB with the wire AAD length, ns.
    pub raw_seal_4k_ns: f64,
    /// Our field encryption of 64 B with a cached key, ns.
    pub field_encrypt_cached_64_ns: f64,
    /// Our field encryption of 4 KiB with a cached key, ns.
    pub field_encrypt_cached_4k_ns: f64,
    /// Key derivation + seal of 64 B, ns.
    pub field_encrypt_uncached_64_ns: f64,
    /// One key-store change check, ns.
    pub change_check_ns: f64,
    /// fsync of a file in the data directory, one at a time.
    pub fsync: FsyncBaseline,
}

/// One scenario at one durability and concurrency, medians over runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// `fsync`, `process`, or `external` (a server given by `--addr`).
    pub durability: String,
    /// Calls in flight.
    pub concurrency: usize,
    /// HTTP/2 connections they were spread over.
    pub connections: usize,
    /// Runs the medians are over.
    pub runs: usize,
    /// Tenants the calls were spread over (uniformly at random).
    pub tenants: usize,
    /// Successful calls per second.
    pub rps: f64,
    /// Items per second (calls × items per call).
    pub items_per_s: f64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Failed calls, summed over runs.
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// Server CPU µs per successful call (child servers only).
    pub server_cpu_us_per_req: Option<f64>,
    /// Load generator CPU µs per call.
    pub client_cpu_us_per_req: Option<f64>,
    /// Echo of the same shape: calls per second.
    pub echo_rps: Option<f64>,
    /// Echo p50, µs.
    pub echo_p50_us: Option<f64>,
    /// Echo p99, µs.
    pub echo_p99_us: Option<f64>,
    /// Server CPU µs per echo call.
    pub echo_server_cpu_us_per_req: Option<f64>,
    /// rps / echo rps (= items/s over echo items/s).
    pub rps_vs_echo: Option<f64>,
    /// p50 / echo p50.
    pub p50_vs_echo: Option<f64>,
    /// p99 / echo p99.
    pub p99_vs_echo: Option<f64>,
    /// Cores the server used on average (child servers only): 2.0 is both of this machine's.
    pub server_cores: Option<f64>,
    /// Share of one core the server's audit writer thread used (child servers only).
    pub writer_cores: Option<f64>,
    /// Server resident memory after the scenario, MiB.
    pub server_rss_mib: Option<f64>,
    /// Server peak resident memory so far, MiB.
    pub server_peak_rss_mib: Option<f64>,
}

/// How the tenants were set up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Setup {
    /// Tenants the load uses.
    pub tenants: usize,
    /// Of those, created by this run.
    pub created: usize,
    /// Seconds spent creating them.
    pub seconds: f64,
    /// `serve`'s `cache_tenants`.
    pub cache_tenants: usize,
}

/// One of the targets, checked.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// What is measured.
    pub name: String,
    /// Measured value.
    pub value: f64,
    /// The bound.
    pub target: String,
    /// Whether it holds.
    pub met: bool,
}

/// Everything one `bench` run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The machine (CPU, cores, RAM, file system).
    pub machine: String,
    /// The command line.
    pub command: String,
    /// Measured window per scenario, seconds.
    pub duration_s: f64,
    /// Warm-up per scenario, seconds.
    pub warmup_s: f64,
    /// Interleaved runs.
    pub runs: usize,
    /// Tenant setup.
    pub setup: Setup,
    /// With `--prewarm`: first-touch rate (load, unwrap, reserve budget, audit), tenants/s.
    pub prewarm_tenants_per_s: Option<f64>,
    /// In-process baselines.
    pub baselines: Baselines,
    /// Per scenario.
    pub results: Vec<ScenarioResult>,
    /// Churn soaks.
    pub churn: Vec<ChurnReport>,
    /// Targets that these results can check.
    pub targets: Vec<TargetCheck>,
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// Checks the targets that the results cover.
    pub fn check_targets(&mut self) {
        let mut checks = Vec::new();
        let mut push = |name: String, value: f64, target: &str, met: bool| {
            checks.push(TargetCheck {
                name,
                value,
                target: target.to_owned(),
                met,
            });
        };
        let find = |scenario: &str, durability: &str, concurrency: usize| {
            self.results.iter().find(|r| {
                r.scenario == scenario && r.durability == durability && r.concurrency == concurrency
            })
        };
        for (durability, bound) in [("fsync", 0.5), ("process", 0.85)] {
            if let Some(r) = find("encrypt-64", durability, 64)
                && let Some(v) = r.rps_vs_echo
            {
                push(
                    format!("encrypt-64 @64 {durability}: rps / echo rps"),
                    v,
                    &format!(">= {bound}"),
                    v >= bound,
                );
            }
        }
        for r in self
            .results
            .iter()
            .filter(|r| r.scenario == "encrypt-64" && r.concurrency == 64)
        {
            if let Some(cpu) = r.server_cpu_us_per_req {
                push(
                    format!("encrypt-64 @64 {}: server CPU µs/request", r.durability),
                    cpu,
                    "<= 40",
                    cpu <= 40.0,
                );
            }
        }
        for r in self.results.iter().filter(|r| r.scenario == "batch-1000") {
            if let Some(v) = r.rps_vs_echo {
                push(
                    format!(
                        "batch-1000 @{} {}: items/s / echo items/s",
                        r.concurrency, r.durability
                    ),
                    v,
                    ">= 0.7",
                    v >= 0.7,
                );
            }
            if let Some(unary) = find("encrypt-64", &r.durability, r.concurrency) {
                let v = super::stats::ratio(r.items_per_s, unary.items_per_s);
                push(
                    format!(
                        "batch-1000 @{} {}: items/s / unary encrypt-64 items/s",
                        r.concurrency, r.durability
                    ),
                    v,
                    ">= 10",
                    v >= 10.0,
                );
            }
        }
        if let Some(r) = find("encrypt-64", "process", 1) {
            if let Some(v) = r.p50_vs_echo {
                push(
                    "encrypt-64 @1 process: p50 / echo p50".into(),
                    v,
                    "<= 2",
                    v <= 2.0,
                );
            }
            if let Some(v) = r.p99_vs_echo {
                push(
                    "encrypt-64 @1 process: p99 / echo p99".into(),
                    v,
                    "<= 2.5",
                    v <= 2.5,
                );
            }
        }
        let b = &self.baselines;
        if b.raw_seal_64_ns > 0.0 {
            let v = b.field_encrypt_cached_64_ns / b.raw_seal_64_ns;
            push(
                "field encrypt 64 B cached / raw ring seal (same AAD length)".into(),
                v,
                "<= 1.5",
                v <= 1.5,
            );
            push(
                "field encrypt 64 B uncached (derive + seal), ns".into(),
                b.field_encrypt_uncached_64_ns,
                "<= 1000",
                b.field_encrypt_uncached_64_ns <= 1000.0,
            );
        }
        self.targets = checks;
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let b = &self.baselines;
        let _ = writeln!(out, "machine: {}", self.machine);
        let _ = writeln!(out, "command: {}", self.command);
        let _ = writeln!(
            out,
            "window {:.1}s after {:.1}s warm-up, medians of {} interleaved run(s); {} tenant(s) \
             (cache_tenants {}), {} created in {:.1}s",
            self.duration_s,
            self.warmup_s,
            self.runs,
            self.setup.tenants,
            self.setup.cache_tenants,
            self.setup.created,
            self.setup.seconds
        );
        if let Some(rate) = self.prewarm_tenants_per_s {
            let _ = writeln!(
                out,
                "prewarm (first Encrypt of every tenant): {rate:.0} tenants/s"
            );
        }
        let _ = writeln!(out, "\nin-process baselines (one core):");
        let _ = writeln!(
            out,
            "  raw ring AES-256-GCM seal   64 B: {:>8.0} ns ({} B AAD, as the wire format); {:.0} ns without AAD",
            b.raw_seal_64_ns, b.wire_aad_bytes, b.raw_seal_64_no_aad_ns
        );
        let _ = writeln!(
            out,
            "  field encrypt, cached key   64 B: {:>8.0} ns = {:.2}x raw seal",
            b.field_encrypt_cached_64_ns,
            super::stats::ratio(b.field_encrypt_cached_64_ns, b.raw_seal_64_ns)
        );
        let _ = writeln!(
            out,
            "  field encrypt, derive+seal  64 B: {:>8.0} ns",
            b.field_encrypt_uncached_64_ns
        );
        let _ = writeln!(
            out,
            "  raw ring seal             4 KiB: {:>8.0} ns; field encrypt cached 4 KiB {:.0} ns = {:.2}x",
            b.raw_seal_4k_ns,
            b.field_encrypt_cached_4k_ns,
            super::stats::ratio(b.field_encrypt_cached_4k_ns, b.raw_seal_4k_ns)
        );
        let _ = writeln!(
            out,
            "  key-store change check (PRAGMA data_version): {:.0} ns",
            b.change_check_ns
        );
        let _ = writeln!(
            out,
            "  fsync of the data dir, one at a time: p50 {:.0} µs, p99 {:.0} µs, {:.0}/s",
            b.fsync.latency.p50_us, b.fsync.latency.p99_us, b.fsync.per_second
        );
        let _ = writeln!(
            out,
            "\nscenarios (latency in µs; ratios against echo of the same shape on the same server):"
        );
        let _ = writeln!(
            out,
            "{:<18} {:<8} {:>4} {:>3} {:>9} {:>10} {:>7} {:>7} {:>7} {:>7} {:>6} | {:>8} {:>7} {:>7} {:>6} | {:>6} {:>6} {:>6} {:>6} {:>5} {:>5}",
            "scenario",
            "durab.",
            "conc",
            "cx",
            "rps",
            "items/s",
            "p50",
            "p90",
            "p99",
            "max",
            "cpu/rq",
            "echo rps",
            "e.p50",
            "e.p99",
            "e.cpu",
            "rps/e",
            "p50/e",
            "p99/e",
            "rssMiB",
            "cores",
            "wr.c"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<18} {:<8} {:>4} {:>3} {:>9.0} {:>10.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>6} | {:>8} {:>7} {:>7} {:>6} | {:>6} {:>6} {:>6} {:>6} {:>5} {:>5}",
                r.scenario,
                r.durability,
                r.concurrency,
                r.connections,
                r.rps,
                r.items_per_s,
                r.p50_us,
                r.p90_us,
                r.p99_us,
                r.max_us,
                opt(r.server_cpu_us_per_req, 1),
                opt(r.echo_rps, 0),
                opt(r.echo_p50_us, 0),
                opt(r.echo_p99_us, 0),
                opt(r.echo_server_cpu_us_per_req, 1),
                opt(r.rps_vs_echo, 2),
                opt(r.p50_vs_echo, 2),
                opt(r.p99_vs_echo, 2),
                opt(r.server_rss_mib, 0),
                opt(r.server_cores, 2),
                opt(r.writer_cores, 2),
            );
            if r.errors > 0 {
                let _ = writeln!(
                    out,
                    "    {} error(s); first: {}",
                    r.errors,
                    r.first_error.as_deref().unwrap_or("?")
                );
            }
        }
        for c in &self.churn {
            let _ = writeln!(out, "\n{}", c.to_text());
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "  [{}] {}: {:.2} (target {})",
                    if t.met { "met" } else { "MISSED" },
                    t.name,
                    t.value,
                    t.target
                );
            }
        }
        out
    }
}
