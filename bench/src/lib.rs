//! `tenant-kms-bench`: the load generator of tenant-kms, with its same-run baselines.
//!
//! A crate of its own (`publish = false`, like rustls's `ci-bench`), so nothing of the bench
//! ships in the product: the `tenant-kms` library and binary neither compile nor serve the
//! echo RPC. This crate's binary is both the load generator (`tenant-kms-bench [FLAGS]`, the
//! flags `tenant-kms bench` had) and the server it measures (`tenant-kms-bench serve`: the
//! product's `serve`, with the same flags, plus the echo baseline through the product's
//! neutral extension point `tenant_kms::cli::serve::run_with`).
//!
//! It starts the server under test as a child process of this binary (`serve` on a data
//! directory and a free loopback port), or drives a server given by `--addr`. For each
//! scenario and concurrency it runs the real RPC and, interleaved with it, `BenchService.Echo`
//! of the same request and response sizes on the same server: the transport's ceiling. It also
//! measures in-process baselines (raw ring seal, our field encryption, fsync of the data dir,
//! the key store's change check). Every figure is reported beside its baseline, because on a
//! shared machine only ratios measured in the same run mean anything.
//!
//! - [`cli`]: the command line (the bench's flags and the `serve` subcommand);
//! - [`echo`]: `tenantkms.bench.v1.BenchService`, the empty-work echo RPC; [`pb`]: its messages;
//! - [`scenario`]: scenario names, the calls they send and their echo twins;
//! - [`load`]: the closed-loop driver (N calls in flight, warm-up, measured window);
//! - [`child`]: the child server; [`procfs`]: its CPU time and memory from /proc;
//! - [`baseline`]: in-process baselines; [`stats`]: percentiles and medians;
//! - [`churn`]: the lifecycle churn soak and its checks; [`report`]: tables and JSON;
//! - [`tiers`]: `--postgres`, SQLite against one and two nodes on PostgreSQL, CPU per tier.
//!
//! The load generator shares the machine with the server, so client CPU is reported too.

#![forbid(unsafe_code)]

pub mod baseline;
pub mod child;
pub mod churn;
pub mod cli;
pub mod echo;
pub mod load;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod tiers;

/// The generated messages and gRPC stubs of `tenantkms.bench.v1` (the echo RPC only; the
/// real services' stubs are `tenant_kms::pb`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tenantkms.bench.v1");

    // The echo RPC decodes through the product's codec, as the real RPCs do, so the baseline
    // pays the same decoding: its request strictly (unknown fields refused), its response
    // leniently.
    impl tenant_kms::service::codec::Strictness for EchoRequest {
        const STRICT: bool = true;
    }
    impl tenant_kms::service::codec::Strictness for EchoResponse {
        const STRICT: bool = false;
    }
}

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use self::child::{ChildOptions, ChildServer};
use self::load::Window;
use self::report::{Baselines, Report, ScenarioResult, Setup};
use self::scenario::{Bearer, RpcDriver, Scenario, Workload};
use self::stats::{median, ratio};
use tenant_kms::audit::Durability;
use tenant_kms::domain::TenantId;
use tenant_kms::error::{Error, Result};
use tenant_kms::service::ServiceOptions;
use tenant_kms::service::state::DataDir;

/// Tenants created per store transaction during setup.
const SETUP_BATCH: usize = 10_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Measured window per scenario and concurrency.
    pub duration: Duration,
    /// Warm-up before each window.
    pub warmup: Duration,
    /// Calls in flight, one measurement each.
    pub concurrency: Vec<usize>,
    /// Scenarios.
    pub scenarios: Vec<Scenario>,
    /// Audit durabilities (one child server each).
    pub durabilities: Vec<Durability>,
    /// Interleaved repetitions; figures are medians over them.
    pub runs: usize,
    /// Tenants the load spreads over.
    pub tenants: usize,
    /// Their id prefix (ids are `<prefix><n>`).
    pub prefix: String,
    /// HTTP/2 connections per measurement; `None` picks ceil(concurrency / 16), at most 8.
    pub connections: Option<usize>,
    /// Data directory to use and keep (default: a temporary one).
    pub data_dir: Option<PathBuf>,
    /// `cache_tenants` of the child server.
    pub cache_tenants: Option<usize>,
    /// A running server to drive instead of a child (no CPU or memory figures).
    pub addr: Option<String>,
    /// Its token file.
    pub token_file: Option<PathBuf>,
    /// Budget of each in-process baseline.
    pub baseline_time: Duration,
    /// Encrypt once for every tenant after each server start, before measuring, so that the
    /// measurement sees a warm cache however many tenants there are.
    pub prewarm: bool,
    /// Serve with this `tenant-kms` binary instead of this one (compare two builds with the
    /// same load generator).
    pub server_exe: Option<PathBuf>,
}

impl BenchConfig {
    fn connections_for(&self, concurrency: usize) -> usize {
        self.connections
            .unwrap_or_else(|| concurrency.div_ceil(16).clamp(1, 8))
            .clamp(1, concurrency.max(1))
    }
}

/// Where the load goes: a child server (with its pid) or an external one.
struct Target {
    url: String,
    token: String,
    pid: Option<u32>,
    label: String,
}

/// One measurement of one run.
struct Sample {
    real: Window,
    echo: Option<Window>,
    rss: Option<(f64, f64)>,
}

/// Runs the whole bench and returns the report (the caller prints it).
pub async fn run(config: BenchConfig, command: String) -> Result<Report> {
    let temp = tempdir()?;
    let data_dir = config.data_dir.clone().unwrap_or_else(|| temp.join("data"));
    let mut report = Report {
        command,
        duration_s: config.duration.as_secs_f64(),
        warmup_s: config.warmup.as_secs_f64(),
        runs: config.runs,
        ..Report::default()
    };
    let load_scenarios: Vec<Scenario> = config
        .scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Churn)
        .collect();
    let churn = config.scenarios.contains(&Scenario::Churn);

    tenant_kms::fsutil::create_private_dir(&data_dir)?;
    let mut tenant_ids: Vec<String> = (0..config.tenants)
        .map(|i| format!("{}{i}", config.prefix))
        .collect();
    if config.addr.is_none() {
        report.setup = setup_tenants(&data_dir, &tenant_ids)?;
    }
    report.setup.tenants = config.tenants;
    let cache_tenants = config
        .cache_tenants
        .unwrap_or(tenant_kms::keys::KeyPolicy::default().cache_tenants);
    report.setup.cache_tenants = cache_tenants;
    let config_file = temp.join("serve.toml");
    // The admission limits (a per-caller rate limit, a cap on calls in flight) exist to shed
    // overload; a bench measures what a call costs, so the child server runs without them.
    std::fs::write(
        &config_file,
        format!(
            "cache_tenants = {cache_tenants}\nrate_limit_per_second = 0.0\n\
             max_concurrent_requests = 100000\n"
        ),
    )
    .map_err(|e| Error::Internal(format!("cannot write {}: {e}", config_file.display())))?;
    report.machine = procfs::machine(data_dir.parent().unwrap_or(&data_dir));

    let mut baseline_runs: Vec<Baselines> = Vec::new();
    let mut samples: Vec<((String, String, usize), Sample)> = Vec::new();
    let mut workload: Option<Arc<Workload>> = None;
    let durabilities: Vec<Option<Durability>> = if config.addr.is_some() {
        vec![None]
    } else {
        config.durabilities.iter().copied().map(Some).collect()
    };
    for run in 0..config.runs.max(1) {
        eprintln!(
            "run {}/{}: in-process baselines",
            run + 1,
            config.runs.max(1)
        );
        baseline_runs.push(measure_baselines(&data_dir, config.baseline_time)?);
        if load_scenarios.is_empty() {
            continue;
        }
        for durability in &durabilities {
            let (target, child) =
                start_target(&config, &data_dir, &temp, &config_file, *durability, run).await?;
            let clients = Clients::connect(&target, &config).await?;
            if load_scenarios
                .iter()
                .any(|s| matches!(s, Scenario::BlindIndex(_)))
            {
                declare_bench_index(&mut clients.keys_tenants(&target).await?).await?;
            }
            if config.addr.is_some() && run == 0 {
                create_tenants_via_api(&mut clients.keys_tenants(&target).await?, &tenant_ids)
                    .await?;
            }
            let work = match &workload {
                Some(w) => Arc::clone(w),
                None => {
                    let mut w = Workload {
                        tenants: std::mem::take(&mut tenant_ids),
                        ciphertexts: Default::default(),
                    };
                    for scenario in &load_scenarios {
                        if let Some(size) = scenario.needs_ciphertexts() {
                            w.prepare(&mut clients.key(0), size).await?;
                        }
                    }
                    let w = Arc::new(w);
                    workload = Some(Arc::clone(&w));
                    w
                }
            };
            if config.prewarm {
                let started = Instant::now();
                let done = prewarm(&clients, &work, 64).await?;
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "prewarm: {done} tenants in {seconds:.1}s ({:.0}/s)",
                    done as f64 / seconds.max(1e-9)
                );
                report.prewarm_tenants_per_s = Some(done as f64 / seconds.max(1e-9));
            }
            let echo_works = clients.echo_works().await;
            for (si, scenario) in load_scenarios.iter().enumerate() {
                for (ci, &concurrency) in config.concurrency.iter().enumerate() {
                    let key = (scenario.name(), target.label.clone(), concurrency);
                    eprintln!(
                        "run {}/{}: {} {} @{concurrency}",
                        run + 1,
                        config.runs.max(1),
                        key.0,
                        key.1
                    );
                    let echo_first = (run + si + ci) % 2 == 1;
                    let measure_as = |echo: bool| {
                        measure(
                            &config,
                            &clients,
                            &target,
                            &work,
                            *scenario,
                            concurrency,
                            echo,
                        )
                    };
                    let mut echo = None;
                    if echo_first && echo_works {
                        echo = Some(measure_as(true).await);
                    }
                    let real = measure_as(false).await;
                    if !echo_first && echo_works {
                        echo = Some(measure_as(true).await);
                    }
                    let rss = target.pid.and_then(procfs::rss_mib);
                    samples.push((key, Sample { real, echo, rss }));
                }
            }
            drop(clients);
            if let Some(child) = child {
                child.stop().await;
            }
        }
    }
    report.baselines = median_baselines(&baseline_runs);
    report.results = aggregate(
        &config,
        &samples,
        workload.as_ref().map_or(0, |w| w.tenants.len()),
    );

    if churn {
        if config.addr.is_some() {
            return Err(Error::InvalidArgument(
                "the churn soak needs its own child server and data directory; drop --addr".into(),
            ));
        }
        for (i, durability) in config.durabilities.iter().enumerate() {
            let (target, child) = start_target(
                &config,
                &data_dir,
                &temp,
                &config_file,
                Some(*durability),
                1000 + i,
            )
            .await?;
            let Some(child) = child else {
                continue;
            };
            eprintln!(
                "churn soak under {} for {:?}",
                target.label, config.duration
            );
            let churn_report = churn::run(churn::ChurnOptions {
                data_dir: &data_dir,
                server: child,
                token: target.token.clone(),
                durability: target.label.clone(),
                duration: config.duration,
                concurrency: config.concurrency.first().copied().unwrap_or(16),
                prefix: format!("churn-{}-{}-", std::process::id(), i),
            })
            .await?;
            report.churn.push(churn_report);
        }
    }
    report.check_targets();
    if config.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    } else {
        eprintln!("kept data directory {}", data_dir.display());
        let _ = std::fs::remove_dir_all(&temp);
    }
    Ok(report)
}

/// A fresh private scratch directory under the system temp dir.
fn tempdir() -> Result<PathBuf> {
    let base = std::env::temp_dir().join(format!(
        "tenant-kms-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    tenant_kms::fsutil::create_private_dir(&base)?;
    Ok(base)
}

/// Creates the tenants the load needs (those missing) through the key store, in large
/// transactions, before any server runs.
fn setup_tenants(data_dir: &Path, ids: &[String]) -> Result<Setup> {
    let mut options = ServiceOptions::new(data_dir);
    options.bootstrap_admin_token = false;
    let dir = DataDir::open(&options, true)?;
    let started = Instant::now();
    let mut created = 0;
    // Skip the work when the last id exists already (a kept data directory).
    let last_exists = match ids.last() {
        Some(last) => dir.store.tenant(&TenantId::parse(last)?)?.is_some(),
        None => true,
    };
    if !last_exists {
        for (n, chunk) in ids.chunks(SETUP_BATCH).enumerate() {
            let parsed = chunk
                .iter()
                .map(|id| TenantId::parse(id))
                .collect::<Result<Vec<_>>>()?;
            created += dir.keys.create_tenants(&parsed)?.len();
            if ids.len() > 100_000 && n % 10 == 9 {
                eprintln!("setup: {} of {} tenants", (n + 1) * SETUP_BATCH, ids.len());
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if created > 0 {
        eprintln!(
            "setup: created {created} tenants in {seconds:.1}s ({:.0}/s)",
            created as f64 / seconds.max(1e-9)
        );
    }
    Ok(Setup {
        tenants: ids.len(),
        created,
        seconds,
        cache_tenants: 0,
    })
}

async fn start_target(
    config: &BenchConfig,
    data_dir: &Path,
    temp: &Path,
    config_file: &Path,
    durability: Option<Durability>,
    run: usize,
) -> Result<(Target, Option<ChildServer>)> {
    match (&config.addr, durability) {
        (Some(addr), _) => {
            let path = config
                .token_file
                .clone()
                .ok_or_else(|| Error::InvalidArgument("--addr needs --token-file".into()))?;
            let token = std::fs::read_to_string(&path).map_err(|e| {
                Error::InvalidArgument(format!("cannot read {}: {e}", path.display()))
            })?;
            let url = if addr.starts_with("http") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            Ok((
                Target {
                    url,
                    token: token.trim().to_owned(),
                    pid: None,
                    label: "external".into(),
                },
                None,
            ))
        }
        (None, durability) => {
            let durability = durability.unwrap_or(Durability::Fsync);
            let label = match durability {
                Durability::Fsync => "fsync",
                Durability::Process => "process",
            };
            let child = ChildServer::start(ChildOptions {
                data_dir,
                durability,
                config: Some(config_file),
                log: temp.join(format!("server-{label}-{run}.log")),
                extra: vec!["--min-deletion-window".into(), "0s".into()],
                exe: config.server_exe.clone(),
            })
            .await?;
            let token = child::admin_token(data_dir)?;
            Ok((
                Target {
                    url: child.url.clone(),
                    token,
                    pid: Some(child.pid),
                    label: label.into(),
                },
                Some(child),
            ))
        }
    }
}

/// The connections of one target.
struct Clients {
    channels: Vec<Channel>,
    bearer: Bearer,
}

impl Clients {
    async fn connect(target: &Target, config: &BenchConfig) -> Result<Self> {
        let most = config
            .concurrency
            .iter()
            .map(|c| config.connections_for(*c))
            .max()
            .unwrap_or(1);
        let mut channels = Vec::with_capacity(most);
        for _ in 0..most {
            channels.push(child::connect(&target.url).await?);
        }
        Ok(Self {
            channels,
            bearer: Bearer::new(&target.token)?,
        })
    }

    fn channel(&self, slot: usize, connections: usize) -> Channel {
        let n = connections.clamp(1, self.channels.len().max(1));
        self.channels[slot % n].clone()
    }

    fn key(&self, slot: usize) -> scenario::KeyClient {
        scenario::key_client(self.channel(slot, 1), self.bearer.clone())
    }

    async fn keys_tenants(
        &self,
        _target: &Target,
    ) -> Result<
        tenant_kms::pb::tenant_service_client::TenantServiceClient<
            tonic::service::interceptor::InterceptedService<Channel, Bearer>,
        >,
    > {
        Ok(
            tenant_kms::pb::tenant_service_client::TenantServiceClient::with_interceptor(
                self.channel(0, 1),
                self.bearer.clone(),
            ),
        )
    }

    /// Whether the server answers `BenchService.Echo` (child servers always do).
    async fn echo_works(&self) -> bool {
        let mut echo = scenario::echo_client(self.channel(0, 1), self.bearer.clone());
        echo.echo(crate::pb::EchoRequest::default()).await.is_ok()
    }
}

/// Declares the blind index the `blind-index-N` scenario computes, for every tenant (a
/// repeated declaration of the same definition is a no-op).
async fn declare_bench_index(
    tenants: &mut tenant_kms::pb::tenant_service_client::TenantServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, Bearer>,
    >,
) -> Result<()> {
    tenants
        .declare_blind_index(tenant_kms::pb::DeclareBlindIndexRequest {
            tenant_id: String::new(),
            name: scenario::BLIND_INDEX.into(),
            bits: 32,
            normalization: "exact".into(),
        })
        .await
        .map_err(|s| {
            Error::Unavailable(format!("cannot declare the bench index: {}", s.message()))
        })?;
    Ok(())
}

async fn create_tenants_via_api(
    tenants: &mut tenant_kms::pb::tenant_service_client::TenantServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, Bearer>,
    >,
    ids: &[String],
) -> Result<()> {
    // A server that has the last tenant already has them all (a previous run made them).
    if let Some(last) = ids.last()
        && tenants
            .get_tenant(tenant_kms::pb::GetTenantRequest {
                tenant_id: last.clone(),
            })
            .await
            .is_ok()
    {
        return Ok(());
    }
    for id in ids {
        match tenants
            .create_tenant(tenant_kms::pb::CreateTenantRequest {
                tenant_id: id.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => {
                return Err(Error::Unavailable(format!(
                    "cannot create tenant {id}: {}",
                    s.message()
                )));
            }
        }
    }
    Ok(())
}

/// Encrypts once for every tenant, `concurrency` at a time: each first call loads and
/// unwraps the tenant's keys and reserves nonce budget.
async fn prewarm(clients: &Clients, work: &Arc<Workload>, concurrency: usize) -> Result<u64> {
    let mut tasks = Vec::new();
    for slot in 0..concurrency {
        let mut client = clients.key(slot);
        let work = Arc::clone(work);
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            for tenant in work.tenants.iter().skip(slot).step_by(concurrency) {
                let request = tenant_kms::pb::EncryptRequest {
                    tenant_id: tenant.clone(),
                    context: scenario::CONTEXT.into(),
                    plaintext: vec![0; 64],
                    aad: scenario::AAD.to_vec(),
                    ..Default::default()
                };
                client
                    .encrypt(request)
                    .await
                    .map_err(|s| Error::Unavailable(format!("prewarm: {}", s.message())))?;
                done += 1;
            }
            Ok::<u64, Error>(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task
            .await
            .map_err(|e| Error::Internal(format!("prewarm task: {e}")))??;
    }
    Ok(total)
}

async fn measure(
    config: &BenchConfig,
    clients: &Clients,
    target: &Target,
    work: &Arc<Workload>,
    scenario: Scenario,
    concurrency: usize,
    echo: bool,
) -> Window {
    let connections = config.connections_for(concurrency);
    let seed = if echo { 0x0ec0 } else { 0x5ea1 };
    load::run(
        concurrency,
        config.warmup,
        config.duration,
        target.pid,
        |slot| {
            let channel = clients.channel(slot, connections);
            RpcDriver::new(
                scenario,
                scenario::key_client(channel.clone(), clients.bearer.clone()),
                scenario::echo_client(channel, clients.bearer.clone()),
                echo,
                Arc::clone(work),
                seed ^ (slot as u64).wrapping_mul(0x9e37_79b9),
            )
        },
    )
    .await
}

fn measure_baselines(data_dir: &Path, budget: Duration) -> Result<Baselines> {
    let aad = baseline::wire_aad_len();
    let (raw_seal_64_ns, field_encrypt_cached_64_ns) = baseline::seal_pair_ns(64, budget)?;
    let (raw_seal_4k_ns, field_encrypt_cached_4k_ns) = baseline::seal_pair_ns(4096, budget)?;
    Ok(Baselines {
        wire_aad_bytes: aad,
        raw_seal_64_ns,
        raw_seal_64_no_aad_ns: baseline::raw_seal_ns(64, 0, budget),
        raw_seal_4k_ns,
        field_encrypt_cached_64_ns,
        field_encrypt_cached_4k_ns,
        field_encrypt_uncached_64_ns: baseline::field_encrypt_uncached_ns(64, budget)?,
        change_check_ns: baseline::change_check_ns(data_dir, budget)?,
        fsync: baseline::fsync(data_dir, budget.max(Duration::from_millis(500)))?,
    })
}

fn median_baselines(runs: &[Baselines]) -> Baselines {
    let m = |f: fn(&Baselines) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let mut fsync = runs.first().map(|b| b.fsync).unwrap_or_default();
    fsync.per_second = m(|b| b.fsync.per_second);
    fsync.latency.p50_us = m(|b| b.fsync.latency.p50_us);
    fsync.latency.p90_us = m(|b| b.fsync.latency.p90_us);
    fsync.latency.p99_us = m(|b| b.fsync.latency.p99_us);
    fsync.latency.max_us = m(|b| b.fsync.latency.max_us);
    Baselines {
        wire_aad_bytes: runs.first().map_or(0, |b| b.wire_aad_bytes),
        raw_seal_64_ns: m(|b| b.raw_seal_64_ns),
        raw_seal_64_no_aad_ns: m(|b| b.raw_seal_64_no_aad_ns),
        raw_seal_4k_ns: m(|b| b.raw_seal_4k_ns),
        field_encrypt_cached_64_ns: m(|b| b.field_encrypt_cached_64_ns),
        field_encrypt_cached_4k_ns: m(|b| b.field_encrypt_cached_4k_ns),
        field_encrypt_uncached_64_ns: m(|b| b.field_encrypt_uncached_64_ns),
        change_check_ns: m(|b| b.change_check_ns),
        fsync,
    }
}

/// Medians over runs, per (scenario, durability, concurrency), in first-seen order.
fn aggregate(
    config: &BenchConfig,
    samples: &[((String, String, usize), Sample)],
    tenants: usize,
) -> Vec<ScenarioResult> {
    let mut keys: Vec<&(String, String, usize)> = Vec::new();
    for (key, _) in samples {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|key| {
            let runs: Vec<&Sample> = samples
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, s)| s)
                .collect();
            let m =
                |f: &dyn Fn(&Sample) -> f64| median(&runs.iter().map(|s| f(s)).collect::<Vec<_>>());
            let mo = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let values: Vec<f64> = runs.iter().filter_map(|s| f(s)).collect();
                (!values.is_empty()).then(|| median(&values))
            };
            let rps = m(&|s| s.real.rps());
            let p50 = m(&|s| s.real.latency.p50_us);
            let p99 = m(&|s| s.real.latency.p99_us);
            let echo_rps = mo(&|s| s.echo.as_ref().map(Window::rps));
            let echo_p50 = mo(&|s| s.echo.as_ref().map(|e| e.latency.p50_us));
            let echo_p99 = mo(&|s| s.echo.as_ref().map(|e| e.latency.p99_us));
            ScenarioResult {
                scenario: key.0.clone(),
                durability: key.1.clone(),
                concurrency: key.2,
                connections: config.connections_for(key.2),
                runs: runs.len(),
                tenants,
                rps,
                items_per_s: m(&|s| s.real.items_per_second()),
                p50_us: p50,
                p90_us: m(&|s| s.real.latency.p90_us),
                p99_us: p99,
                max_us: m(&|s| s.real.latency.max_us),
                errors: runs.iter().map(|s| s.real.errors).sum(),
                first_error: runs.iter().find_map(|s| s.real.first_error.clone()),
                server_cpu_us_per_req: mo(&|s| s.real.server_cpu_us_per_request()),
                client_cpu_us_per_req: mo(&|s| {
                    s.real
                        .client_cpu_seconds
                        .map(|c| ratio(c * 1e6, s.real.requests as f64))
                }),
                echo_rps,
                echo_p50_us: echo_p50,
                echo_p99_us: echo_p99,
                echo_server_cpu_us_per_req: mo(&|s| {
                    s.echo.as_ref().and_then(Window::server_cpu_us_per_request)
                }),
                // Ratios of the medians, and medians of per-run ratios would differ little;
                // per-run ratios pair each run with its own interleaved echo, so use those.
                rps_vs_echo: mo(&|s| s.echo.as_ref().map(|e| ratio(s.real.rps(), e.rps()))),
                p50_vs_echo: mo(&|s| {
                    s.echo
                        .as_ref()
                        .map(|e| ratio(s.real.latency.p50_us, e.latency.p50_us))
                }),
                p99_vs_echo: mo(&|s| {
                    s.echo
                        .as_ref()
                        .map(|e| ratio(s.real.latency.p99_us, e.latency.p99_us))
                }),
                server_cores: mo(&|s| s.real.server_cores()),
                writer_cores: mo(&|s| s.real.writer_cores()),
                server_rss_mib: mo(&|s| s.rss.map(|r| r.0)),
                server_peak_rss_mib: mo(&|s| s.rss.map(|r| r.1)),
            }
        })
        .collect()
}
