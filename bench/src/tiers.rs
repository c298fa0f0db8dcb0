//! `--postgres`: the same node on SQLite, one node on PostgreSQL and two nodes on one
//! PostgreSQL database, measured in one run (issue 14, item 8).
//!
//! The bench starts a private PostgreSQL cluster with the test harness's start-up code
//! (`tests/common/postgres.rs`, included here, with PostgreSQL's durable defaults: `fsync` and
//! `synchronous_commit` on, so an acknowledged audit record is on disk as with SQLite's fsync
//! durability), a fresh database per deployment, and the nodes as child processes of this
//! binary. For each deployment, scenario and concurrency it reports requests/s and latency,
//! and the CPU per request of each tier read from /proc: the node processes, and the
//! postmaster with all its backends; and, from PostgreSQL's statistics, database commits per
//! request and audit records per audit commit (the group commit) and per database commit.
//!
//! Two nodes share this machine's cores with the database, so their throughput cannot show
//! the scale-out factor; the CPU per request per tier can: the database saturates at
//! `node CPU / database CPU` nodes of the database machine's size (see docs/SCALING.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tonic::transport::Channel;

use crate::BenchConfig;
use crate::child::{self, ChildOptions, ChildServer};
use crate::load::{self, Window};
use crate::procfs;
use crate::report::TargetCheck;
use crate::scenario::{self, Bearer, RpcDriver, Workload};
use crate::stats::{median, ratio};
use tenant_kms::audit::Durability;
use tenant_kms::error::{Error, Result};

// The harness's own file, so the cluster starts exactly as in the tests. Its setup failures
// panic with what to install, as they do there.
#[path = "../../tests/common/postgres.rs"]
#[allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]
mod pgcluster;

use pgcluster::PgCluster;

/// PostgreSQL settings of the bench's cluster beyond the defaults (which keep `fsync` and
/// `synchronous_commit` on): room for the WAL of a run without forced checkpoints.
const CLUSTER_SETTINGS: &str = "-c max_wal_size=1GB";

/// How long PostgreSQL may take to publish a backend's statistics (it flushes them at most
/// once a second, and within a second of going idle).
const STATS_SETTLE: Duration = Duration::from_millis(1500);

/// One way of deploying the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deployment {
    /// One node on its SQLite data directory.
    Sqlite,
    /// This many nodes on one PostgreSQL database.
    Postgres(usize),
}

impl Deployment {
    fn label(self) -> String {
        match self {
            Self::Sqlite => "sqlite, 1 node".into(),
            Self::Postgres(n) => format!("postgres, {n} node{}", if n == 1 { "" } else { "s" }),
        }
    }
}

/// The deployments every run measures, in order.
const DEPLOYMENTS: [Deployment; 3] = [
    Deployment::Sqlite,
    Deployment::Postgres(1),
    Deployment::Postgres(2),
];

/// One deployment, scenario and concurrency: medians over runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierResult {
    /// `sqlite, 1 node`, `postgres, 1 node`, `postgres, 2 nodes`.
    pub deployment: String,
    /// Scenario name.
    pub scenario: String,
    /// Calls in flight (spread evenly over the nodes).
    pub concurrency: usize,
    /// Runs the medians are over.
    pub runs: usize,
    /// Successful calls per second.
    pub rps: f64,
    /// Latency p50, µs.
    pub p50_us: f64,
    /// Latency p99, µs.
    pub p99_us: f64,
    /// Failed calls, summed over runs.
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// CPU µs per successful call of the node processes (all nodes together).
    pub node_cpu_us_per_req: Option<f64>,
    /// CPU µs per successful call of the PostgreSQL processes (postmaster and children).
    pub db_cpu_us_per_req: Option<f64>,
    /// Node + database CPU µs per successful call.
    pub server_cpu_us_per_req: Option<f64>,
    /// The load generator's CPU µs per call.
    pub client_cpu_us_per_req: Option<f64>,
    /// Database commits (pg_stat_database.xact_commit, reads included) per call.
    pub db_commits_per_req: Option<f64>,
    /// Audit records per audit transaction (the nodes' group commits).
    pub audit_records_per_audit_commit: Option<f64>,
    /// Audit records per database commit of any kind.
    pub audit_records_per_db_commit: Option<f64>,
}

/// What the scale-out projection derives from the two-node run.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    /// Scenario and concurrency it is from.
    pub scenario: String,
    /// Calls in flight.
    pub concurrency: usize,
    /// Node CPU µs per call (two nodes).
    pub node_cpu_us_per_req: f64,
    /// Database CPU µs per call (two nodes).
    pub db_cpu_us_per_req: f64,
    /// Nodes (each as large as the database machine) one database carries before it
    /// saturates: node CPU / database CPU. Throughput grows linearly with nodes up to it.
    pub nodes_per_database: f64,
    /// The database's ceiling over one SQLite node of the same size: SQLite CPU / database
    /// CPU per call.
    pub ceiling_vs_sqlite_node: Option<f64>,
}

/// Everything a `--postgres` run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierReport {
    /// The machine.
    pub machine: String,
    /// The command line.
    pub command: String,
    /// PostgreSQL's version and the settings the cluster ran with.
    pub postgres: String,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Interleaved runs.
    pub runs: usize,
    /// Tenants the load spreads over.
    pub tenants: usize,
    /// Per deployment, scenario and concurrency.
    pub results: Vec<TierResult>,
    /// The two-node projections.
    pub projections: Vec<Projection>,
    /// The targets.
    pub targets: Vec<TargetCheck>,
}

/// One measurement.
struct Sample {
    window: Window,
    node_cpu: Option<f64>,
    db_cpu: Option<f64>,
    db: Option<DbDelta>,
}

/// The database counters of one measurement (after minus before).
#[derive(Clone, Copy)]
struct DbDelta {
    commits: f64,
    audit_records: f64,
    audit_commits: f64,
}

/// PostgreSQL's counters at one moment.
#[derive(Clone, Copy)]
struct DbCounters {
    commits: i64,
    audit_records: i64,
    audit_commits: i64,
}

/// A running deployment.
struct Running {
    nodes: Vec<ChildServer>,
    /// The database's admin URL (password included; never printed), for PostgreSQL.
    db_url: Option<String>,
    token: String,
    /// The nodes' metrics addresses (PostgreSQL nodes), where their group commits are counted.
    metrics: Vec<String>,
}

/// Runs the three deployments for every scenario and concurrency of `config` and returns the
/// report (the caller prints it).
pub async fn run(config: BenchConfig, command: String) -> Result<TierReport> {
    if config.addr.is_some() || config.data_dir.is_some() {
        return Err(Error::InvalidArgument(
            "--postgres starts its own servers and database: drop --addr and --data-dir".into(),
        ));
    }
    if config.scenarios.contains(&scenario::Scenario::Churn) {
        return Err(Error::InvalidArgument(
            "--postgres does not run the churn soak; drop the churn scenario".into(),
        ));
    }
    let temp = crate::tempdir()?;
    eprintln!("postgres: starting a private cluster");
    let cluster = tokio::task::spawn_blocking(|| PgCluster::with_settings(CLUSTER_SETTINGS))
        .await
        .map_err(|e| Error::Internal(format!("cannot start PostgreSQL: {e}")))?;
    let password_file = temp.join("pgpass");
    tenant_kms::fsutil::write_private_file(&password_file, cluster.password().as_bytes())?;
    let config_file = temp.join("serve.toml");
    let cache_tenants = config
        .cache_tenants
        .unwrap_or(tenant_kms::keys::KeyPolicy::default().cache_tenants);
    std::fs::write(
        &config_file,
        format!(
            "cache_tenants = {cache_tenants}\nrate_limit_per_second = 0.0\n\
             max_concurrent_requests = 100000\n"
        ),
    )
    .map_err(|e| Error::Internal(format!("cannot write {}: {e}", config_file.display())))?;
    let mut report = TierReport {
        machine: procfs::machine(&temp),
        command,
        postgres: postgres_version(&cluster.url("postgres"))
            .map(|v| format!("{v}; {CLUSTER_SETTINGS}, fsync and synchronous_commit on"))
            .unwrap_or_default(),
        duration_s: config.duration.as_secs_f64(),
        warmup_s: config.warmup.as_secs_f64(),
        runs: config.runs.max(1),
        tenants: config.tenants,
        ..TierReport::default()
    };
    let tenant_ids: Vec<String> = (0..config.tenants)
        .map(|i| format!("{}{i}", config.prefix))
        .collect();
    let mut samples: Vec<((Deployment, String, usize), Sample)> = Vec::new();
    for run in 0..config.runs.max(1) {
        for deployment in DEPLOYMENTS {
            let dir = temp.join(format!(
                "run{run}-{}",
                deployment.label().replace([',', ' '], "")
            ));
            let running = start(
                deployment,
                &dir,
                &cluster,
                &password_file,
                &config_file,
                config.server_exe.clone(),
            )
            .await?;
            let result = measure_deployment(
                &config,
                deployment,
                &running,
                &cluster,
                &tenant_ids,
                run,
                &mut samples,
            )
            .await;
            for node in running.nodes {
                node.stop().await;
            }
            result?;
        }
    }
    report.results = aggregate(&samples);
    report.projections = project(&report.results);
    report.targets = check_targets(&report.results);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&temp);
    Ok(report)
}

/// Starts `deployment`'s nodes in `dir` (a new database on `cluster` for PostgreSQL).
async fn start(
    deployment: Deployment,
    dir: &Path,
    cluster: &PgCluster,
    password_file: &Path,
    config_file: &Path,
    exe: Option<PathBuf>,
) -> Result<Running> {
    tenant_kms::fsutil::create_private_dir(dir)?;
    let base = vec!["--min-deletion-window".to_owned(), "0s".to_owned()];
    let Deployment::Postgres(count) = deployment else {
        let data_dir = dir.join("data");
        let node = ChildServer::start(ChildOptions {
            data_dir: &data_dir,
            durability: Durability::Fsync,
            config: Some(config_file),
            log: dir.join("server.log"),
            extra: base,
            exe,
        })
        .await?;
        return Ok(Running {
            token: child::admin_token(&data_dir)?,
            nodes: vec![node],
            db_url: None,
            metrics: Vec::new(),
        });
    };
    let database = {
        let admin = cluster.url("postgres");
        tokio::task::spawn_blocking(move || create_database(&admin))
            .await
            .map_err(|e| Error::Internal(format!("CREATE DATABASE: {e}")))??
    };
    // Every node holds the same keyring and shred ledger (DESIGN §8); tokens live in the
    // database, so the second node uses the first one's admin token.
    let shared = dir.join("shared");
    tenant_kms::fsutil::create_private_dir(&shared)?;
    let mut nodes = Vec::with_capacity(count);
    let mut metrics = Vec::with_capacity(count);
    let mut token = String::new();
    for i in 0..count {
        let data_dir = dir.join(format!("node{i}"));
        if i > 0 {
            tenant_kms::fsutil::create_private_dir(&data_dir)?;
            tenant_kms::fsutil::write_private_file(
                &data_dir.join(tenant_kms::service::state::ADMIN_TOKEN_FILE),
                token.as_bytes(),
            )?;
        }
        let metrics_addr = format!("127.0.0.1:{}", child::free_port()?);
        let mut extra = base.clone();
        extra.extend([
            "--metrics-listen".to_owned(),
            metrics_addr.clone(),
            "--store".to_owned(),
            cluster.url_without_password(&database),
            "--store-password-file".to_owned(),
            password_file.display().to_string(),
            "--keyring".to_owned(),
            shared.join("master.keyring").display().to_string(),
            "--shred-ledger".to_owned(),
            shared.join("shred.ledger").display().to_string(),
            "--node-id".to_owned(),
            format!("bench-node-{i}"),
        ]);
        let node = ChildServer::start(ChildOptions {
            data_dir: &data_dir,
            durability: Durability::Fsync,
            config: Some(config_file),
            log: dir.join(format!("node{i}.log")),
            extra,
            exe: exe.clone(),
        })
        .await?;
        if i == 0 {
            token = child::admin_token(&data_dir)?;
        }
        nodes.push(node);
        metrics.push(metrics_addr);
    }
    Ok(Running {
        nodes,
        db_url: Some(cluster.url(&database)),
        token,
        metrics,
    })
}

/// Creates the deployment's tenants, prepares ciphertexts, and measures every scenario and
/// concurrency on it.
async fn measure_deployment(
    config: &BenchConfig,
    deployment: Deployment,
    running: &Running,
    cluster: &PgCluster,
    tenant_ids: &[String],
    run: usize,
    samples: &mut Vec<((Deployment, String, usize), Sample)>,
) -> Result<()> {
    let bearer = Bearer::new(&running.token)?;
    let most = config
        .concurrency
        .iter()
        .map(|c| config.connections_for(*c))
        .max()
        .unwrap_or(1);
    // Channels interleaved over the nodes: slot i goes to node i % nodes.
    let mut per_node: Vec<Vec<Channel>> = Vec::new();
    for node in &running.nodes {
        let mut channels = Vec::with_capacity(most);
        for _ in 0..most.div_ceil(running.nodes.len()).max(1) {
            channels.push(child::connect(&node.url).await?);
        }
        per_node.push(channels);
    }
    let first = per_node
        .first()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| Error::Internal("no node started".into()))?;
    crate::create_tenants_via_api(
        &mut tenant_kms::pb::tenant_service_client::TenantServiceClient::with_interceptor(
            first.clone(),
            bearer.clone(),
        ),
        tenant_ids,
    )
    .await?;
    let mut work = Workload {
        tenants: tenant_ids.to_vec(),
        ciphertexts: Default::default(),
    };
    for scenario in &config.scenarios {
        if let Some(size) = scenario.needs_ciphertexts() {
            work.prepare(
                &mut scenario::key_client(first.clone(), bearer.clone()),
                size,
            )
            .await?;
        }
    }
    let work = Arc::new(work);
    let node_pids: Vec<u32> = running.nodes.iter().map(|n| n.pid).collect();
    let db_pid = running
        .db_url
        .as_ref()
        .and_then(|_| cluster.postmaster_pid());
    for scenario in &config.scenarios {
        for &concurrency in &config.concurrency {
            eprintln!(
                "run {}/{}: {} {} @{concurrency}",
                run + 1,
                config.runs.max(1),
                deployment.label(),
                scenario.name()
            );
            let connections = config.connections_for(concurrency);
            let make = |slot: usize| {
                let node = &per_node[slot % per_node.len()];
                let per = connections.div_ceil(per_node.len()).clamp(1, node.len());
                let channel = node[(slot / per_node.len()) % per].clone();
                RpcDriver::new(
                    *scenario,
                    scenario::key_client(channel.clone(), bearer.clone()),
                    scenario::echo_client(channel, bearer.clone()),
                    false,
                    Arc::clone(&work),
                    0x5ea1 ^ (slot as u64).wrapping_mul(0x9e37_79b9),
                )
            };
            // Warm up, let the statistics settle, then measure every call of the window with
            // the counters read just before it starts and after its last call answered.
            let _ = load::run(concurrency, Duration::ZERO, config.warmup, None, make).await;
            tokio::time::sleep(STATS_SETTLE).await;
            let db_before = counters(running.db_url.as_deref(), &running.metrics).await?;
            let node_before = sum_cpu(&node_pids);
            let db_cpu_before = db_pid.and_then(procfs::family_cpu_seconds);
            let window = load::run(concurrency, Duration::ZERO, config.duration, None, make).await;
            let node_after = sum_cpu(&node_pids);
            let db_cpu_after = db_pid.and_then(procfs::family_cpu_seconds);
            tokio::time::sleep(STATS_SETTLE).await;
            let db_after = counters(running.db_url.as_deref(), &running.metrics).await?;
            samples.push((
                (deployment, scenario.name(), concurrency),
                Sample {
                    window,
                    node_cpu: node_before.zip(node_after).map(|(a, b)| b - a),
                    db_cpu: db_cpu_before.zip(db_cpu_after).map(|(a, b)| b - a),
                    db: db_before.zip(db_after).map(|(a, b)| DbDelta {
                        commits: (b.commits - a.commits) as f64,
                        audit_records: (b.audit_records - a.audit_records) as f64,
                        audit_commits: (b.audit_commits - a.audit_commits) as f64,
                    }),
                },
            ));
        }
    }
    Ok(())
}

/// CPU seconds of all `pids` together.
fn sum_cpu(pids: &[u32]) -> Option<f64> {
    pids.iter()
        .map(|pid| procfs::cpu_seconds(*pid))
        .sum::<Option<f64>>()
}

/// A new database on the cluster (through its admin URL); returns its name.
fn create_database(admin_url: &str) -> Result<String> {
    let name = format!(
        "kms_bench_{}_{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let mut client = postgres::Client::connect(admin_url, postgres::NoTls).map_err(|e| {
        Error::Unavailable(format!("cannot connect to the bench's PostgreSQL: {e}"))
    })?;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .map_err(|e| Error::Internal(format!("CREATE DATABASE {name}: {e}")))?;
    Ok(name)
}

/// PostgreSQL's `server_version`.
fn postgres_version(url: &str) -> Option<String> {
    tenant_kms::store::postgres::off_runtime(|| {
        let mut client = postgres::Client::connect(url, postgres::NoTls).ok()?;
        let row = client.query_one("SHOW server_version", &[]).ok()?;
        Some(format!("PostgreSQL {}", row.get::<_, String>(0)))
    })
}

/// The database's commit count and audit records, and the audit transactions the nodes made
/// (the count of their `tenant_kms_audit_batch_records` histograms: exact, where PostgreSQL's
/// table statistics reach the reader up to a second late and then fell into the next
/// window). `None` for SQLite.
async fn counters(url: Option<&str>, metrics: &[String]) -> Result<Option<DbCounters>> {
    let Some(url) = url else {
        return Ok(None);
    };
    let url = url.to_owned();
    let metrics = metrics.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls)
            .map_err(|e| Error::Unavailable(format!("bench statistics: {e}")))?;
        let row = client
            .query_one(
                "SELECT (SELECT xact_commit FROM pg_stat_database \
                         WHERE datname = current_database()), \
                        (SELECT count(*) FROM audit_records)",
                &[],
            )
            .map_err(|e| Error::Internal(format!("bench statistics: {e}")))?;
        let mut audit_commits = 0;
        for addr in &metrics {
            audit_commits += audit_batches(addr)?;
        }
        Ok(Some(DbCounters {
            commits: row.get::<_, Option<i64>>(0).unwrap_or(0),
            audit_records: row.get(1),
            audit_commits,
        }))
    })
    .await
    .map_err(|e| Error::Internal(format!("bench statistics: {e}")))?
}

/// The audit group commits a node has made: its `tenant_kms_audit_batch_records_count`, read
/// from its metrics endpoint at `addr`.
fn audit_batches(addr: &str) -> Result<i64> {
    use std::io::{Read, Write};
    let failed = |e: &dyn std::fmt::Display| Error::Unavailable(format!("metrics of {addr}: {e}"));
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| failed(&e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| failed(&e))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| failed(&e))?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(|e| failed(&e))?;
    text.lines()
        .find_map(|line| line.strip_prefix("tenant_kms_audit_batch_records_count "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|count| count as i64)
        .ok_or_else(|| failed(&"no tenant_kms_audit_batch_records_count"))
}

/// Medians over runs, per (deployment, scenario, concurrency), in first-seen order.
fn aggregate(samples: &[((Deployment, String, usize), Sample)]) -> Vec<TierResult> {
    let mut keys: Vec<&(Deployment, String, usize)> = Vec::new();
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
            // Per call: every call of the window, failed ones included, was paid for.
            let calls = |s: &Sample| (s.window.requests + s.window.errors) as f64;
            let m =
                |f: &dyn Fn(&Sample) -> f64| median(&runs.iter().map(|s| f(s)).collect::<Vec<_>>());
            let mo = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let values: Vec<f64> = runs.iter().filter_map(|s| f(s)).collect();
                (!values.is_empty()).then(|| median(&values))
            };
            let node = mo(&|s| s.node_cpu.map(|c| ratio(c * 1e6, calls(s))));
            let db = mo(&|s| s.db_cpu.map(|c| ratio(c * 1e6, calls(s))));
            TierResult {
                deployment: key.0.label(),
                scenario: key.1.clone(),
                concurrency: key.2,
                runs: runs.len(),
                rps: m(&|s| s.window.rps()),
                p50_us: m(&|s| s.window.latency.p50_us),
                p99_us: m(&|s| s.window.latency.p99_us),
                errors: runs.iter().map(|s| s.window.errors).sum(),
                first_error: runs.iter().find_map(|s| s.window.first_error.clone()),
                node_cpu_us_per_req: node,
                db_cpu_us_per_req: db,
                server_cpu_us_per_req: node.map(|n| n + db.unwrap_or(0.0)),
                client_cpu_us_per_req: mo(&|s| {
                    s.window
                        .client_cpu_seconds
                        .map(|c| ratio(c * 1e6, calls(s)))
                }),
                db_commits_per_req: mo(&|s| s.db.map(|d| ratio(d.commits, calls(s)))),
                audit_records_per_audit_commit: mo(&|s| {
                    s.db.map(|d| ratio(d.audit_records, d.audit_commits))
                }),
                audit_records_per_db_commit: mo(&|s| {
                    s.db.map(|d| ratio(d.audit_records, d.commits))
                }),
            }
        })
        .collect()
}

fn find<'r>(
    results: &'r [TierResult],
    deployment: Deployment,
    scenario: &str,
    concurrency: usize,
) -> Option<&'r TierResult> {
    let label = deployment.label();
    results
        .iter()
        .find(|r| r.deployment == label && r.scenario == scenario && r.concurrency == concurrency)
}

/// The scale-out projection of every two-node result.
fn project(results: &[TierResult]) -> Vec<Projection> {
    results
        .iter()
        .filter(|r| r.deployment == Deployment::Postgres(2).label())
        .filter_map(|r| {
            let node = r.node_cpu_us_per_req?;
            let db = r.db_cpu_us_per_req?;
            let sqlite = find(results, Deployment::Sqlite, &r.scenario, r.concurrency)
                .and_then(|s| s.server_cpu_us_per_req);
            Some(Projection {
                scenario: r.scenario.clone(),
                concurrency: r.concurrency,
                node_cpu_us_per_req: node,
                db_cpu_us_per_req: db,
                nodes_per_database: ratio(node, db),
                ceiling_vs_sqlite_node: sqlite.map(|s| ratio(s, db)),
            })
        })
        .collect()
}

/// The targets for one node on PostgreSQL against the same node on SQLite.
fn check_targets(results: &[TierResult]) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for pg in results
        .iter()
        .filter(|r| r.deployment == Deployment::Postgres(1).label())
    {
        let Some(sqlite) = find(results, Deployment::Sqlite, &pg.scenario, pg.concurrency) else {
            continue;
        };
        let named = pg.scenario == "encrypt-64" && pg.concurrency == 64;
        let rps = ratio(pg.rps, sqlite.rps);
        checks.push(TargetCheck {
            name: format!(
                "{} @{}: postgres 1 node rps / sqlite rps",
                pg.scenario, pg.concurrency
            ),
            value: rps,
            target: if named { ">= 0.7" } else { "(none)" }.into(),
            met: !named || rps >= 0.7,
        });
        if let (Some(p), Some(s)) = (pg.server_cpu_us_per_req, sqlite.server_cpu_us_per_req) {
            let cpu = ratio(p, s);
            checks.push(TargetCheck {
                name: format!(
                    "{} @{}: postgres 1 node (node + database) CPU per call / sqlite's",
                    pg.scenario, pg.concurrency
                ),
                value: cpu,
                target: if named { "<= 1.3" } else { "(none)" }.into(),
                met: !named || cpu <= 1.3,
            });
        }
    }
    checks
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

impl TierReport {
    /// The report as a table.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "machine: {}", self.machine);
        let _ = writeln!(out, "command: {}", self.command);
        let _ = writeln!(out, "database: {}", self.postgres);
        let _ = writeln!(
            out,
            "window {:.1}s after {:.1}s warm-up, medians of {} run(s); {} tenant(s); audit \
             durability fsync (SQLite) / synchronous commit (PostgreSQL)\n",
            self.duration_s, self.warmup_s, self.runs, self.tenants
        );
        let _ = writeln!(
            out,
            "{:<18} {:<18} {:>4} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>6}",
            "deployment",
            "scenario",
            "@",
            "req/s",
            "p50 µs",
            "p99 µs",
            "node µs",
            "db µs",
            "total µs",
            "commits",
            "rec/audit",
            "rec/commit",
            "errors"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<18} {:<18} {:>4} {:>9.0} {:>8.0} {:>8.0} {:>9} {:>9} {:>9} {:>8} {:>10} {:>10} {:>6}",
                r.deployment,
                r.scenario,
                r.concurrency,
                r.rps,
                r.p50_us,
                r.p99_us,
                opt(r.node_cpu_us_per_req, 1),
                opt(r.db_cpu_us_per_req, 1),
                opt(r.server_cpu_us_per_req, 1),
                opt(r.db_commits_per_req, 2),
                opt(r.audit_records_per_audit_commit, 1),
                opt(r.audit_records_per_db_commit, 2),
                r.errors
            );
            if let Some(e) = &r.first_error {
                let _ = writeln!(out, "    first error: {e}");
            }
        }
        let _ = writeln!(
            out,
            "\n(CPU per call from /proc; commits: database commits per call, reads included; \
             rec/audit: audit records per audit transaction; rec/commit: per database commit)"
        );
        if !self.projections.is_empty() {
            let _ = writeln!(out, "\nscale-out projection from the two-node run:");
            for p in &self.projections {
                let _ = writeln!(
                    out,
                    "  {} @{}: node {:.1} µs + database {:.1} µs per call: one database carries \
                     {:.1} nodes of its size before it saturates; its ceiling is {} × one \
                     SQLite node",
                    p.scenario,
                    p.concurrency,
                    p.node_cpu_us_per_req,
                    p.db_cpu_us_per_req,
                    p.nodes_per_database,
                    opt(p.ceiling_vs_sqlite_node, 1)
                );
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "  {:<4} {}: {:.2} (target {})",
                    if t.met { "ok" } else { "MISS" },
                    t.name,
                    t.value,
                    t.target
                );
            }
        }
        out
    }
}
