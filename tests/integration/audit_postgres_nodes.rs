//! The PostgreSQL audit log under faults, through real servers (docs/AUDIT.md §9): a node
//! killed with SIGKILL under load, and the database stopped under load. In both, no call may
//! have been answered without its audit record committed, and the chains verify afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::{PgCluster, fresh_database};
use common::*;
use tenant_kms::pb;
use tenant_kms::store::StoreBackend;
use tenant_kms::store::postgres::PgOptions;
use tonic::Code;

/// The request id a reply names (shared with the failover drill).
pub(crate) fn request_id<T>(response: &tonic::Response<T>) -> String {
    response
        .metadata()
        .get("x-request-id")
        .expect("every reply names its request id")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The request ids of the `ok` Encrypt records every chain holds.
pub(crate) fn recorded_encrypts(url: &str) -> HashSet<String> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client
            .query(
                "SELECT request_id FROM audit_records WHERE operation = 'Encrypt' AND \
                 outcome = 'ok'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    })
    .join()
    .unwrap()
}

/// Encrypts on `clients` connections until `stop` is set, pushing the request id of every
/// acknowledged call; returns the tasks. A failed call ends its client only once `stop` is
/// set (a kill) or, with `tolerate_failures`, always (a database outage).
async fn load(
    url: &str,
    token: &str,
    clients_n: usize,
    acked: &Arc<Mutex<Vec<String>>>,
    count: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
    tolerate_failures: bool,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients_n {
        let (mut keys, _, _) = clients(url, Some(token)).await;
        let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
        tasks.spawn(async move {
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) && tolerate_failures {
                    return;
                }
                let reply = keys
                    .encrypt(encrypt_request(
                        "t",
                        "load",
                        format!("{c}.{i}").as_bytes(),
                        b"",
                    ))
                    .await;
                match reply {
                    Ok(r) => {
                        acked.lock().unwrap().push(request_id(&r));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) if tolerate_failures => {
                        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(status) => {
                        assert!(stop.load(Ordering::SeqCst), "a call failed: {status}");
                        return;
                    }
                }
            }
        });
    }
    tasks
}

async fn wait_for(count: &AtomicUsize, n: usize) {
    let started = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_keeps_every_acknowledged_record_and_the_chains_verify() {
    let url = fresh_database();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    // The URL carries the test cluster's password: from the environment, never the command line.
    let env = [("TENANT_KMS_STORE", url.as_str())];
    let flags = ["--node-id", "node-a"];
    let server = BinaryServer::start_with_env(&dir, &flags, &env).await;
    let token = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "t").await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = load(&server.url(), &token, 16, &acked, &count, &killed, false).await;
    wait_for(&count, 500).await;
    killed.store(true, Ordering::SeqCst);
    server.kill9();
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    println!("{} calls acknowledged before the SIGKILL", acked.len());
    // Restarted, the node continues its chain from the committed head; every acknowledged
    // call has its record and every chain verifies.
    let server = BinaryServer::start_with_env(&dir, &flags, &env).await;
    let recorded = recorded_encrypts(&url);
    let missing: Vec<&String> = acked.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged calls without a record: {missing:?}"
    );
    let (_, _, mut audit) = clients(&server.url(), Some(&token)).await;
    let report = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    let (code, out, err) = run_command(
        std::process::Command::new(env!("CARGO_BIN_EXE_tenant-kms"))
            .args(["audit", "verify", "--node-id", "node-a", "--data-dir"])
            .arg(&dir)
            .env("TENANT_KMS_STORE", &url),
    );
    assert_eq!(code, 0, "audit verify --store: {out}{err}");
    assert!(out.starts_with("OK: "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_stopped_under_load_fails_calls_closed_and_loses_no_acknowledged_record() {
    let mut cluster = tokio::task::spawn_blocking(PgCluster::new).await.unwrap();
    let db = cluster.create_database();
    let url = cluster.url(&db);
    let temp = tempfile::tempdir().unwrap();
    let mut options = test_options(&temp.path().join("n"));
    let mut pg = PgOptions::new(url.as_str());
    // Calls that wait for a pooled connection give up quickly while the database is gone.
    pg.connect_timeout = Duration::from_secs(1);
    options.store = StoreBackend::Postgres(pg);
    options.node_id = Some("node-a".into());
    let node = TestServer::start_with(options).await;
    let token = node.admin_token.clone();
    let (_, mut tenants, _) = node.clients().await;
    create_tenant(&mut tenants, "t").await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = load(&node.url(), &token, 8, &acked, &count, &stop, true).await;
    wait_for(&count, 200).await;
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    // While the database is gone, calls fail UNAVAILABLE (the load asserts the code).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = count.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        during,
        "a call succeeded without the database"
    );
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start();
        cluster
    })
    .await
    .unwrap();
    // The node, not restarted, serves again; the load goes on.
    wait_for(&count, during + 100).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let recorded = recorded_encrypts(&url);
    let missing: Vec<&String> = acked.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged calls without a record: {missing:?}"
    );
    let (_, _, mut audit) = node.clients().await;
    let report = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    node.stop().await;
    drop(cluster);
}
