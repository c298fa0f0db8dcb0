//! The `tenant-kms-bench` command line: load-test a server with same-run baselines (the flags
//! `tenant-kms bench` had), and the subcommands the bench runs this binary as.
//!
//! Prints a table (or `--json`) with every scenario's requests/s, items/s and latency
//! percentiles beside the echo baseline of the same shape, the in-process baselines, and the
//! issue's performance targets checked against them. Exit code 0 when the run completed, 1
//! when it could not run (or a churn soak found a violation); missed performance targets do
//! not fail the command (the machine decides those).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tenant_kms::audit::Durability;
use tenant_kms::cli::EXIT_FAILURE;
use tenant_kms::cli::audit::AuditCommand;
use tenant_kms::cli::rotate::RotateArgs;
use tenant_kms::cli::serve::ServeArgs;
use tenant_kms::error::{Error, Result};

use crate::BenchConfig;
use crate::scenario::Scenario;

/// tenant-kms-bench: load-test a tenant-kms server (a child process by default) against
/// same-run baselines.
#[derive(Debug, Parser)]
#[command(
    name = "tenant-kms-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What the bench runs this same binary as. The product's commands come from the library, so
/// they behave exactly as `tenant-kms`'s.
#[derive(Debug, Subcommand)]
enum Command {
    /// The server under test: `tenant-kms serve` (same flags) plus the echo baseline.
    Serve(ServeArgs),
    /// `tenant-kms rotate`: the churn soak runs it as a second process on the data directory.
    Rotate(RotateArgs),
    /// `tenant-kms audit`: the churn soak verifies the audit chain with it.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// Parses the command line and runs the bench or the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.bench),
        Some(Command::Serve(args)) => tenant_kms::cli::serve::run_with(args, crate::echo::routes),
        Some(Command::Rotate(args)) => tenant_kms::cli::rotate::run(args),
        Some(Command::Audit(command)) => tenant_kms::cli::audit::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tenant-kms-bench: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The bench's flags (those of the former `tenant-kms bench`).
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
    /// batch-1000, generate-data-key, rewrap, churn, blind-index-1000 (ComputeBlindIndex),
    /// det-batch-1000 (deterministic EncryptBatch) (any size: encrypt-1k, batch-10).
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
    /// echo baselines only if it is a `tenant-kms-bench serve`).
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
    /// Run this binary's `serve` as the server (to compare builds under the same load): a
    /// tenant-kms-bench build serves the echo baseline too, a tenant-kms binary does not.
    #[arg(long)]
    server_exe: Option<PathBuf>,
    /// Compare deployments instead: the same node on SQLite, one node on PostgreSQL and two
    /// nodes on one PostgreSQL database (a private cluster this bench starts with
    /// /usr/lib/postgresql/15/bin, durable settings), each scenario and concurrency on each,
    /// with CPU per call per tier (nodes, database) and audit records per commit. Audit
    /// durability is fsync; --durability, --addr, --data-dir and churn do not apply.
    #[arg(long)]
    postgres: bool,
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
    if args.postgres {
        let report = runtime.block_on(crate::tiers::run(config, command))?;
        print_report(&report, args.json, || report.to_text())?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = runtime.block_on(crate::run(config, command))?;
    print_report(&report, args.json, || report.to_text())?;
    Ok(if report.churn.iter().all(|c| c.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

/// Prints `report` on stdout: pretty JSON with `--json`, else its `text`.
fn print_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    text: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).map_err(Error::internal)?
        );
    } else {
        print!("{}", text());
    }
    Ok(())
}
