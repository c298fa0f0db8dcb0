//! `tenant-kms bench`: load-test a server with same-run baselines (see `crate::bench`).
//!
//! Prints a table (or `--json`) with every scenario's requests/s, items/s and latency
//! percentiles beside the echo baseline of the same shape, the in-process baselines, and the
//! issue's performance targets checked against them. Exit code 0 when the run completed, 1
//! when it could not run (or a churn soak found a violation); missed performance targets do
//! not fail the command (the machine decides those).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::audit::Durability;
use crate::bench::scenario::Scenario;
use crate::bench::{self, BenchConfig};
use crate::error::{Error, Result};

/// Flags of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measured time per scenario and concurrency (and the churn soak's length), e.g. 10s, 5m.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Warm-up before each measurement [default: a fifth of --duration, at most 2s].
    #[arg(long)]
    warmup: Option<String>,
    /// Calls in flight, comma-separated; one measurement each.
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Scenarios, comma-separated: encrypt-64, encrypt-4k, decrypt-64, decrypt-4k, batch-100,
    /// batch-1000, generate-data-key, rewrap, churn (any size: encrypt-1k, batch-10).
    #[arg(
        long,
        default_value = "encrypt-64,encrypt-4k,decrypt-64,decrypt-4k,batch-100,batch-1000,generate-data-key,rewrap",
        value_delimiter = ','
    )]
    scenario: Vec<String>,
    /// Audit durabilities, comma-separated (a child server each): fsync, process.
    #[arg(
        long,
        default_value = "fsync,process",
        value_delimiter = ',',
        value_enum
    )]
    durability: Vec<Durability>,
    /// Interleaved repetitions; every figure is the median over them.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Tenants the load spreads over, uniformly at random (created in bulk if missing).
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Tenant id prefix.
    #[arg(long, default_value = "bench-")]
    tenant_prefix: String,
    /// The child server's cache_tenants [default: the server's default].
    #[arg(long)]
    cache_tenants: Option<usize>,
    /// HTTP/2 connections per measurement [default: concurrency/16 rounded up, at most 8].
    #[arg(long)]
    connections: Option<usize>,
    /// Use (and keep) this data directory instead of a temporary one; tenants that exist are
    /// reused, so a million-tenant directory is built once.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Drive this running server instead of starting one (no server CPU or memory figures;
    /// echo baselines only if it runs with --bench-echo).
    #[arg(long)]
    addr: Option<String>,
    /// Token file for --addr.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Time spent on each in-process baseline.
    #[arg(long, default_value = "300ms")]
    baseline_time: String,
    /// Before measuring, encrypt once for every tenant (a warm cache with many tenants).
    #[arg(long)]
    prewarm: bool,
    /// Run this tenant-kms binary as the server (to compare builds under the same load).
    #[arg(long)]
    server_exe: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn duration(text: &str) -> Result<Duration> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        Error::InvalidArgument(format!(
            "'{text}' is not a duration (examples: 500ms, 10s, 5m)"
        ))
    })
}

/// Runs `bench`.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let window = duration(&args.duration)?;
    let warmup = match &args.warmup {
        Some(text) => duration(text)?,
        None => (window / 5).min(Duration::from_secs(2)),
    };
    let scenarios = args
        .scenario
        .iter()
        .map(|s| Scenario::parse(s))
        .collect::<Result<Vec<_>>>()?;
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        return Err(Error::InvalidArgument(
            "--concurrency needs positive numbers".into(),
        ));
    }
    if args.tenants == 0 {
        return Err(Error::InvalidArgument(
            "--tenants must be at least 1".into(),
        ));
    }
    let config = BenchConfig {
        duration: window,
        warmup,
        concurrency: args.concurrency.clone(),
        scenarios,
        durabilities: args.durability.clone(),
        runs: args.runs.max(1),
        tenants: args.tenants,
        prefix: args.tenant_prefix.clone(),
        connections: args.connections,
        data_dir: args.data_dir.clone(),
        cache_tenants: args.cache_tenants,
        addr: args.addr.clone(),
        token_file: args.token_file.clone(),
        baseline_time: duration(&args.baseline_time)?,
        prewarm: args.prewarm,
        server_exe: args.server_exe.clone(),
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    let report = runtime.block_on(bench::run(config, command))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(Error::internal)?
        );
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.churn.iter().all(|c| c.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}
