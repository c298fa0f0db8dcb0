//! Audited Encrypt throughput with fsync durability at 1, 16 and 64 concurrent clients.
//!
//! Every Encrypt is answered only after its audit record is committed with an fsync, so a
//! single client is bound by the disk's fsync latency; group commit lets concurrent clients
//! share each fsync. This starts an in-process server on a temporary data directory, drives
//! it over loopback gRPC for a few seconds per level and prints calls/s, p50/p99 latency, the
//! mean group-commit batch size and the ratio to the single-client rate.
//!
//! The same levels run again with `process` durability (no fsync per commit) as the CPU
//! ceiling: where the two meet, group commit has hidden the fsync entirely.
//!
//! Run: `cargo bench --bench audit_throughput`. Environment: `AUDIT_BENCH_SECS` (seconds per
//! level, default 4), `AUDIT_BENCH_LEVELS` (default `1,16,64`), `AUDIT_BENCH_DURABILITY`
//! (default `fsync,process`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The in-process server harness of the integration tests: one way to start a server.
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenant_kms::audit::Durability;
use tenant_kms::pb;
use tenant_kms::pb::key_service_client::KeyServiceClient;
use tenant_kms::pb::tenant_service_client::TenantServiceClient;
use tenant_kms::service::ServiceOptions;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Keys = KeyServiceClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
struct Auth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Median latency of rewriting one 4 KiB block in place and flushing it (`fdatasync`), in
/// `dir`: about what SQLite pays per WAL commit once the WAL file has its size.
fn fsync_latency(dir: &std::path::Path) -> Duration {
    use std::io::{Seek, SeekFrom};
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    file.sync_all().unwrap();
    let mut samples: Vec<Duration> = (0..100)
        .map(|i| {
            let start = Instant::now();
            file.seek(SeekFrom::Start(0)).unwrap();
            file.write_all(&[i as u8; 4096]).unwrap();
            file.sync_data().unwrap();
            start.elapsed()
        })
        .collect();
    std::fs::remove_file(&path).unwrap();
    samples.sort();
    samples[samples.len() / 2]
}

struct Level {
    clients: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
    records: u64,
    commits: u64,
    /// Share of the wall time the writer spent in transactions.
    writer_busy: f64,
}

/// Drives `clients` concurrent callers; `counters` gives (records, commits) so far.
async fn drive(
    channels: &[Channel],
    auth: &Auth,
    clients: usize,
    secs: f64,
    counters: &dyn Fn() -> (u64, u64, u64),
) -> Level {
    let run = |measure: bool, duration: Duration| {
        let mut tasks = tokio::task::JoinSet::new();
        let deadline = Instant::now() + duration;
        for c in 0..clients {
            let mut keys: Keys = KeyServiceClient::with_interceptor(
                channels[c % channels.len()].clone(),
                auth.clone(),
            );
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let plaintext = vec![0x5au8; 64];
                while Instant::now() < deadline {
                    let start = Instant::now();
                    keys.encrypt(pb::EncryptRequest {
                        tenant_id: "bench".into(),
                        context: "bench.value".into(),
                        plaintext: plaintext.clone(),
                        aad: Vec::new(),
                        ..Default::default()
                    })
                    .await
                    .expect("audited encrypt");
                    if measure {
                        latencies.push(start.elapsed());
                    }
                }
                latencies
            });
        }
        tasks
    };
    // Warm up (connections, caches, the WAL), then measure.
    let mut warm = run(false, Duration::from_millis(500));
    while warm.join_next().await.is_some() {}
    let before = counters();
    let started = Instant::now();
    let mut tasks = run(true, Duration::from_secs_f64(secs));
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Level {
        clients,
        rate: latencies.len() as f64 / elapsed,
        p50: pick(0.50),
        p99: pick(0.99),
        records: counters().0 - before.0,
        commits: (counters().1 - before.1).max(1),
        writer_busy: (counters().2 - before.2) as f64 / 1e9 / elapsed,
    }
}

/// A server on a fresh data directory and eight connections to it.
struct Bench {
    server: common::TestServer,
    channels: Vec<Channel>,
    auth: Auth,
    _temp: tempfile::TempDir,
}

async fn start(base: &std::path::Path, durability: Durability) -> Bench {
    let temp = tempfile::tempdir_in(base).unwrap();
    let mut options = ServiceOptions::new(temp.path().join("data"));
    options.durability = durability;
    let server = common::TestServer::start_with(options).await;
    // Parsed once here, not per call as the tests' interceptor does, so the measured loop
    // pays only for the call.
    let auth = Auth(format!("Bearer {}", server.admin_token).parse().unwrap());
    let endpoint = Channel::from_shared(server.url()).unwrap();
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(endpoint.connect().await.unwrap());
    }
    TenantServiceClient::with_interceptor(channels[0].clone(), auth.clone())
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: "bench".into(),
        })
        .await
        .unwrap();
    Bench {
        server,
        channels,
        auth,
        _temp: temp,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let secs: f64 = std::env::var("AUDIT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let levels: Vec<usize> = std::env::var("AUDIT_BENCH_LEVELS")
        .unwrap_or_else(|_| "1,16,64".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let durabilities: Vec<Durability> = std::env::var("AUDIT_BENCH_DURABILITY")
        .unwrap_or_else(|_| "fsync,process".into())
        .split(',')
        .map(|s| match s.trim() {
            "fsync" => Durability::Fsync,
            "process" => Durability::Process,
            other => panic!("unknown durability {other}"),
        })
        .collect();

    // The data directory sits on the same file system as the target dir (the real disk),
    // not on a tmpfs where fsync would be free.
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "audited Encrypt over loopback gRPC, {secs}s per level; {cpus} CPUs (load average {}); \
         fdatasync of a 4 KiB block: median {:.2} ms on {}",
        load.split_whitespace().next().unwrap_or("?"),
        fsync_latency(&base).as_secs_f64() * 1e3,
        base.display()
    );
    for durability in durabilities {
        let bench = start(&base, durability).await;
        println!("\ndurability {durability:?}");
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>14} {:>12} {:>8}",
            "clients", "calls/s", "p50 ms", "p99 ms", "records/commit", "writer busy", "ratio"
        );
        let counters = {
            let state = Arc::clone(&bench.server.state);
            move || {
                (
                    state.audit_reader.count().unwrap(),
                    state.audit.commits(),
                    state.audit.busy_nanos(),
                )
            }
        };
        let mut single = None;
        for &clients in &levels {
            let level = drive(&bench.channels, &bench.auth, clients, secs, &counters).await;
            let base_rate = *single.get_or_insert(level.rate);
            println!(
                "{:>8} {:>10.0} {:>10.2} {:>10.2} {:>14.1} {:>11.0}% {:>7.1}x",
                level.clients,
                level.rate,
                level.p50.as_secs_f64() * 1e3,
                level.p99.as_secs_f64() * 1e3,
                level.records as f64 / level.commits as f64,
                level.writer_busy * 100.0,
                level.rate / base_rate
            );
        }
        bench.server.stop().await;
    }
}
