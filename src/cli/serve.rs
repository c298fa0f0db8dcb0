//! `tenant-kms serve`: run the service.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tonic::service::Routes;

use super::common::StoreArgs;
use super::keyring::SealArgs;
use crate::audit::Durability;
use crate::config::{FileConfig, bounded_count, max, parse_duration_seconds};
use crate::error::{Error, Result};
use crate::keys::MasterKeySource;
use crate::service::state::KEYRING_FILE;
use crate::service::{AppState, ServiceOptions, TlsFiles, server};

/// How long a graceful shutdown waits for open connections.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Flags of `serve`; each overrides the config file, which overrides the defaults.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "TENANT_KMS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051]. Port 0 picks a free port; the bound
    /// address is printed on stdout as `listening on ADDR` once the service is ready.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Master keyring file [default: <data-dir>/master.keyring].
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Read master keys from this environment variable instead of a keyring file.
    #[arg(long)]
    master_key_env: Option<String>,
    /// Shred ledger file [default: <keyring>.shred-ledger; with --master-key-env,
    /// <data-dir>/master.keyring.shred-ledger]. Keep it with the master keys, apart from data backups.
    #[arg(long, env = "TENANT_KMS_SHRED_LEDGER")]
    shred_ledger: Option<PathBuf>,
    /// Audit durability: fsync (survives power loss) or process (survives a crash).
    #[arg(long, value_enum)]
    audit_durability: Option<Durability>,
    /// Shortest deletion window callers may ask for (0s allowed, for drills) [default: 1d].
    #[arg(long)]
    min_deletion_window: Option<String>,
    /// Allow a non-loopback address without TLS (traffic and tokens travel in clear).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates that chain to this CA (PEM): mutual TLS. Certificates
    /// listed in the config's [[tls_callers]] then act as callers without a token.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default; keep it on loopback
    /// or a private network: it names the most active tenants).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log filter (tracing EnvFilter syntax), e.g. info, debug, tenant_kms=trace. An
    /// invalid filter is a usage error (exit 2), not silently replaced.
    #[arg(long, env = "TENANT_KMS_LOG", default_value = "info", value_parser = parse_log_filter)]
    log: String,
    /// Log line format on stderr: `text` for people, `json` for log shippers (one JSON object
    /// per line; every line of a call carries its request id and tenant).
    #[arg(
        long,
        env = "TENANT_KMS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// How the keyring file is sealed (`--seal pkcs11|passphrase` and its flags).
    #[command(flatten)]
    seal: SealArgs,
    /// Which key store (`--store` and its settings).
    #[command(flatten)]
    store: StoreArgs,
}

/// What `serve` prints on stdout, followed by the bound address, once it is ready to serve.
pub const READY_LINE_PREFIX: &str = "listening on ";

/// What `serve` resolved from flags, config and defaults.
struct Resolved {
    options: ServiceOptions,
    listen: SocketAddr,
    insecure: bool,
    lock_memory: bool,
}

fn resolve(args: &ServeArgs) -> Result<Resolved> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let tls_callers = file.tls_callers()?;
    let mut limits = crate::service::Limits::default();
    apply_abuse_limits(&file, &mut limits)?;
    let detect = crate::detect::Policy::from_file(&file)?;
    let usage = usage_policy(&file)?;
    let streaming = audit_stream(&file)?;
    let webhook = crate::webhook::WebhookConfig::from_file(&file)?;
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("./data"));
    let mut options = ServiceOptions::new(&data_dir);
    options.limits = limits;
    options.detect = detect;
    options.usage = usage;
    options.audit_stream = streaming;
    options.webhook = webhook;
    options.clock = crate::clock::process_clock();
    options.master_keys = match (
        args.master_key_env.clone().or(file.master_key_env.clone()),
        args.keyring.clone().or(file.keyring_file.clone()),
    ) {
        (Some(var), _) => MasterKeySource::Env(var),
        (None, Some(path)) => args.seal.source(path),
        (None, None) => args.seal.source(data_dir.join(KEYRING_FILE)),
    };
    options.shred_ledger = args.shred_ledger.clone();
    args.store.apply(&file, &mut options)?;
    if let Some(d) = args.audit_durability.or(file.audit_durability) {
        options.durability = d;
    }
    if let Some(text) = args
        .min_deletion_window
        .as_ref()
        .or(file.min_deletion_window.as_ref())
    {
        options.min_deletion_window_seconds = parse_duration_seconds(text)?;
    }
    if let Some(text) = &file.default_deletion_window {
        options.default_deletion_window_seconds = parse_duration_seconds(text)?;
    }
    if let Some(n) = file.max_field_bytes {
        options.limits.max_field_bytes = bounded_count("max_field_bytes", n, max::MESSAGE_BYTES)?;
    }
    if let Some(n) = file.max_batch_items {
        options.limits.max_batch_items = bounded_count("max_batch_items", n, max::BATCH_ITEMS)?;
    }
    if let Some(n) = file.max_message_bytes {
        options.limits.max_message_bytes =
            bounded_count("max_message_bytes", n, max::MESSAGE_BYTES)?;
    }
    if let Some(n) = file.cache_tenants {
        options.key_policy.cache_tenants = n;
    }
    if let Some(n) = file.default_max_encryptions {
        options.key_policy.default_max_encryptions =
            bounded_count("default_max_encryptions", n, max::ENCRYPTIONS)?;
    }
    let listen = match (args.listen, &file.listen) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("listen address '{text}' is invalid")))?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 50051)),
    };
    if let Some(rate) = file.rate_limit_per_second {
        if !rate.is_finite() || rate < 0.0 {
            return Err(Error::InvalidArgument(
                "rate_limit_per_second must be 0 (off) or more".into(),
            ));
        }
        options.limits.rate_limit.per_second = rate;
    }
    if let Some(burst) = file.rate_limit_burst {
        options.limits.rate_limit.burst = burst.max(1);
    }
    if let Some(n) = file.max_concurrent_requests {
        options.limits.max_concurrent_requests =
            bounded_count("max_concurrent_requests", n, max::CONCURRENT_REQUESTS)?.max(1);
    }
    if let Some(text) = &file.request_timeout {
        let seconds = parse_duration_seconds(text)?;
        if seconds == 0 {
            return Err(Error::InvalidArgument(
                "request_timeout must be at least 1s".into(),
            ));
        }
        options.limits.request_timeout = std::time::Duration::from_secs(seconds);
    }
    if let Some(text) = &file.request_body_timeout {
        let seconds = parse_duration_seconds(text)?;
        if seconds == 0 {
            return Err(Error::InvalidArgument(
                "request_body_timeout must be at least 1s".into(),
            ));
        }
        options.limits.body_timeout = std::time::Duration::from_secs(seconds);
    }
    options.tls_callers = tls_callers;
    let cert = args.tls_cert.clone().or(file.tls_cert.clone());
    let key = args.tls_key.clone().or(file.tls_key.clone());
    let client_ca = args.client_ca.clone().or(file.client_ca.clone());
    options.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        (None, None) if client_ca.is_none() => None,
        _ => {
            return Err(Error::InvalidArgument(
                "TLS needs both --tls-cert and --tls-key (and --client-ca needs both)".into(),
            ));
        }
    };
    if !options.tls_callers.is_empty() && options.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
    {
        return Err(Error::InvalidArgument(
            "[[tls_callers]] needs --client-ca: certificates can only name callers when they \
             are verified"
                .into(),
        ));
    }
    let insecure = args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
    Ok(Resolved {
        options,
        listen,
        insecure,
        lock_memory: file.lock_memory.unwrap_or(true),
    })
}

/// The configuration keys of issue 13's network limits (see `service::refusals`,
/// `service::connections`, `service::guard`).
fn apply_abuse_limits(file: &FileConfig, limits: &mut crate::service::Limits) -> Result<()> {
    let at_least_1s = |name: &str, text: &String| -> Result<std::time::Duration> {
        match parse_duration_seconds(text)? {
            0 => Err(Error::InvalidArgument(format!(
                "{name} must be at least 1s"
            ))),
            seconds => Ok(std::time::Duration::from_secs(seconds)),
        }
    };
    if let Some(n) = file.max_requests_awaiting_body {
        limits.max_awaiting_body =
            bounded_count("max_requests_awaiting_body", n, max::CONNECTION_COUNTS)?.max(1);
    }
    if let Some(n) = file.max_unestablished_connections {
        limits.max_unestablished_connections =
            bounded_count("max_unestablished_connections", n, max::CONNECTION_COUNTS)?.max(1);
    }
    if let Some(text) = &file.refusal_audit_window {
        limits.refusals.window = at_least_1s("refusal_audit_window", text)?;
    }
    if let Some(rate) = file.refusal_rate_per_second {
        if !rate.is_finite() || rate < 0.0 {
            return Err(Error::InvalidArgument(
                "refusal_rate_per_second must be 0 (off) or more".into(),
            ));
        }
        limits.refusals.budget.per_second = rate;
    }
    if let Some(burst) = file.refusal_rate_burst {
        limits.refusals.budget.burst = burst.max(1);
    }
    if let Some(text) = &file.response_send_timeout {
        limits.send_timeout = at_least_1s("response_send_timeout", text)?;
    }
    if let Some(text) = &file.handshake_timeout {
        limits.handshake_timeout = at_least_1s("handshake_timeout", text)?;
    }
    Ok(())
}

/// The usage-accounting keys (`usage_metrics_top`, `usage_flush_interval`).
fn usage_policy(file: &FileConfig) -> Result<crate::usage::UsagePolicy> {
    let mut policy = crate::usage::UsagePolicy::default();
    if let Some(n) = file.usage_metrics_top {
        policy.metrics_top = bounded_count("usage_metrics_top", n, max::USAGE_METRICS_TOP)?;
    }
    if let Some(text) = &file.usage_flush_interval {
        policy.flush_interval = match parse_duration_seconds(text)? {
            0 => {
                return Err(Error::InvalidArgument(
                    "usage_flush_interval must be at least 1s".into(),
                ));
            }
            seconds => std::time::Duration::from_secs(seconds),
        };
    }
    Ok(policy)
}

/// The audit streaming keys (`audit_stream_file`, `audit_stream_file_max_bytes`,
/// `audit_stream_file_keep`, `audit_stream_syslog`).
fn audit_stream(file: &FileConfig) -> Result<crate::audit::stream::StreamConfig> {
    use crate::audit::stream::file::FileSinkConfig;
    let sized = file.audit_stream_file_max_bytes.is_some() || file.audit_stream_file_keep.is_some();
    if sized && file.audit_stream_file.is_none() {
        return Err(Error::InvalidArgument(
            "audit_stream_file_max_bytes and audit_stream_file_keep need audit_stream_file".into(),
        ));
    }
    let file_sink = match &file.audit_stream_file {
        Some(path) => Some(FileSinkConfig {
            path: path.clone(),
            max_bytes: file
                .audit_stream_file_max_bytes
                .unwrap_or(FileSinkConfig::DEFAULT_MAX_BYTES)
                .max(1),
            keep: bounded_count(
                "audit_stream_file_keep",
                file.audit_stream_file_keep
                    .unwrap_or(FileSinkConfig::DEFAULT_KEEP),
                max::STREAM_FILES_KEPT,
            )?,
        }),
        None => None,
    };
    Ok(crate::audit::stream::StreamConfig {
        file: file_sink,
        syslog: file
            .audit_stream_syslog
            .as_deref()
            .map(crate::audit::stream::syslog::SyslogTarget::parse)
            .transpose()?,
    })
}

/// How `serve` writes its log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only on a terminal without `NO_COLOR`.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter) with the fields of the
    /// spans the line was written in: a call's `request_id`, `tenant` and `trace_id`.
    Json,
}

/// clap's check of `--log`: the filter must parse, so a typo is refused at start (exit 2)
/// instead of silently logging at another level.
fn parse_log_filter(text: &str) -> std::result::Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("not a log filter ({e}); examples: info, debug, tenant_kms=trace"))
}

/// Whether log lines may carry ANSI colour: only on a terminal, and never when `NO_COLOR` is
/// set to anything non-empty (<https://no-color.org>), so files and pipes get plain text.
fn colour_allowed() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the log subscriber on stderr in `format`. `filter` is one [`parse_log_filter`]
/// accepted; should it fail anyway, `info` is used and the failure is the first line logged.
/// A write to a closed stderr is dropped by the formatter (no panic, no exit): logging never
/// stops the service.
pub fn init_logging(filter: &str, format: LogFormat) {
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new("info"), Some(e)),
    };
    // A call's span is made only when a line is written inside the call (telemetry), unless
    // the filter matches on spans (`[call{…}]`) or writes debug lines, one of which every
    // call writes anyway; the OTLP exporter, when on, makes it up front too (`install`).
    let lazy_spans = !filter.to_string().contains('[')
        && filter
            .max_level_hint()
            .is_none_or(|level| level <= tracing::level_filters::LevelFilter::INFO);
    // `log_internal_errors(false)`: the formatter would otherwise report a failed write with
    // eprintln!, which panics when stderr is a closed pipe, and so would every logging call
    // (issue 18: `serve` under a supervisor whose log reader died).
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => install(filter, lazy_spans, lines.with_ansi(colour_allowed())),
        LogFormat::Json => install(
            filter,
            lazy_spans,
            lines.json().with_current_span(true).with_span_list(false),
        ),
    };
    if installed.is_ok()
        && let Some(e) = bad
    {
        tracing::warn!(error = %e, "invalid log filter; logging at info");
    }
}

type Filtered =
    tracing_subscriber::layer::Layered<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Installs `filter`, the log `lines` and (feature `otlp`, endpoint set) the OTLP span
/// exporter as the process's subscriber. The lines make a call's span when they need it
/// (`telemetry::CallLines`); with `lazy_spans` and no exporter, only then.
fn install<L>(
    filter: tracing_subscriber::EnvFilter,
    lazy_spans: bool,
    lines: L,
) -> std::result::Result<(), tracing_subscriber::util::TryInitError>
where
    L: tracing_subscriber::Layer<Filtered> + Send + Sync,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let exporter = crate::telemetry::layer::<
        tracing_subscriber::layer::Layered<crate::telemetry::CallLines<L>, Filtered>,
    >();
    let eager = !lazy_spans || exporter.is_some();
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(crate::telemetry::CallLines::new(lines))
        .with(exporter)
        .try_init();
    // Only a subscriber with these lines makes spans on demand; another one, installed
    // before, gets them up front (the default).
    if installed.is_ok() {
        crate::telemetry::set_call_spans_eager(eager);
    }
    installed
}

/// Warns at start when the master keys are not sealed under a root of trust, naming the
/// options that seal them.
fn warn_if_unsealed(source: &MasterKeySource) {
    match source {
        MasterKeySource::Sealed(_) => {}
        // A sealed file opened without --seal is refused with its own message when loaded.
        MasterKeySource::File(path) if crate::keys::seal::is_sealed_file(path) => {}
        MasterKeySource::File(path) => tracing::warn!(
            path = %path.display(),
            "the master keyring is NOT sealed: whoever reads this file (a stolen disk or \
             backup) holds every key. Seal it under an HSM or a passphrase: tenant-kms keyring \
             seal --seal pkcs11|passphrase, then start with the same --seal flags \
             (docs/OPERATIONS.md, \"Root of trust\")"
        ),
        MasterKeySource::Env(var) => tracing::warn!(
            var = %var,
            "the master keys come unsealed from the environment; a keyring file sealed with \
             --seal pkcs11|passphrase keeps them under a root of trust (docs/OPERATIONS.md)"
        ),
    }
}

/// Runs the service until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    run_with(args, |_| Routes::default())
}

/// [`run`], also serving the services `extra` returns (see [`server::run_with`]): the bench
/// crate's server binary serves its echo baseline beside the real services this way, with
/// exactly the flags, configuration, hardening and start checks of `serve`.
pub fn run_with(args: ServeArgs, extra: impl FnOnce(&AppState) -> Routes) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    {
        // Inside the runtime: the OTLP exporter (feature `otlp`) keeps its connection there.
        let _inside = runtime.enter();
        init_logging(&args.log, args.log_format);
    }
    let served = serve_on(&runtime, args, extra);
    // Spans of the last calls reach the collector before the process ends.
    crate::telemetry::shutdown();
    served
}

/// [`run_with`] on `runtime`, logging installed.
fn serve_on(
    runtime: &tokio::runtime::Runtime,
    args: ServeArgs,
    extra: impl FnOnce(&AppState) -> Routes,
) -> Result<ExitCode> {
    let Resolved {
        options,
        listen,
        insecure,
        lock_memory,
    } = resolve(&args)?;
    // Before any key is read: no core dumps, memory locked where the OS allows.
    crate::hardening::harden_process(lock_memory);
    // Held until the process exits: `restore` and a second `serve` refuse while it is held.
    crate::service::data_dir_guard::check_dir_mode(&options.data_dir)?;
    crate::fsutil::create_private_dir(&options.data_dir)?;
    let _lock = crate::service::data_dir_guard::DataDirLock::acquire(&options.data_dir, "serve")?;
    warn_if_unsealed(&options.master_keys);
    if options.tls.is_none() && !listen.ip().is_loopback() {
        if !insecure {
            return Err(Error::FailedPrecondition(format!(
                "refusing to listen on non-loopback {listen} without TLS; pass \
                 --insecure-plaintext to allow it anyway"
            )));
        }
        tracing::warn!(%listen, "listening on a non-loopback address WITHOUT TLS: tokens and data travel in clear");
    }
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| Error::FailedPrecondition(format!("cannot listen on {listen}: {e}")))?;
        let data_dir = options.data_dir.clone();
        let opening = std::time::Instant::now();
        let state = Arc::new(tokio::task::block_in_place(|| AppState::open(options))?);
        // Reported so operators can compare start-up with a sealed and a plain keyring.
        let open_ms = opening.elapsed().as_millis();
        let transport = match &state.options.tls {
            None => "plaintext",
            Some(TlsFiles {
                client_ca: None, ..
            }) => "tls",
            Some(_) => "mtls",
        };
        let bound = listener.local_addr().map_err(Error::internal)?;
        tracing::info!(
            addr = %bound,
            data_dir = %data_dir.display(),
            transport,
            open_ms,
            "tenant-kms serving"
        );
        // The one line `serve` writes to stdout, for scripts and test harnesses: the address
        // actually bound (so `--listen 127.0.0.1:0` is usable), printed only once the data
        // directory is open, so it also says the service is ready. A closed stdout is no
        // reason to stop serving, hence no println! (which panics on a write error).
        let _ = writeln!(std::io::stdout(), "{READY_LINE_PREFIX}{bound}");
        // The signal starts a graceful shutdown; clients that keep connections open get at
        // most SHUTDOWN_GRACE before the process exits anyway. Either way every answered call
        // was audited before its answer, so nothing acknowledged is lost.
        let stop = Arc::new(tokio::sync::Notify::new());
        let signalled = Arc::clone(&stop);
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing in-flight calls");
            signalled.notify_waiters();
            signalled.notify_one();
        });
        if let Some(addr) = args.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::FailedPrecondition(format!("cannot listen on {addr} for metrics: {e}"))
            })?;
            tracing::info!(%addr, "serving metrics at /metrics");
            let stop_metrics = Arc::clone(&stop);
            tokio::spawn(crate::metrics::serve(
                metrics,
                server::metrics_extra(&state),
                async move { stop_metrics.notified().await },
            ));
        }
        let stop_serving = Arc::clone(&stop);
        let serving = server::run_with(
            listener,
            Arc::clone(&state),
            async move {
                stop_serving.notified().await;
            },
            extra,
        );
        tokio::select! {
            result = serving => {
                result?;
                tracing::info!("shut down: in-flight calls finished, audit flushed");
            }
            _ = async {
                stop.notified().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("shut down after the grace period with connections still open");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
