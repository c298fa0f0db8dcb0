//! The failover drill (issue 14, items 3 and 7): a primary and a streaming standby
//! (`pg_basebackup -R`) with synchronous replication (`synchronous_standby_names = '*'`,
//! `synchronous_commit = on`), two service nodes in this process on a multi-host connection
//! string with `target_session_attrs=read-write`, under load. The primary is killed with
//! SIGKILL and the standby promoted: the nodes continue on it without a restart, no
//! acknowledged tenant, key or audit record is missing, and `audit verify` passes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit_postgres_nodes::{recorded_encrypts, request_id};
use common::postgres::PgCluster;
use common::*;
use tenant_kms::pb;
use tenant_kms::store::StoreBackend;
use tenant_kms::store::postgres::PgOptions;
use tonic::Code;

/// What the load saw acknowledged.
#[derive(Default)]
struct Acked {
    /// Tenants whose creation was answered OK.
    tenants: Vec<String>,
    /// Encryptions answered OK: request id, tenant, plaintext, ciphertext.
    encrypts: Vec<(String, String, Vec<u8>, Vec<u8>)>,
    /// Refusals other than UNAVAILABLE (none expected).
    unexpected: Vec<String>,
}

/// Options of node `name` in `dir` on the multi-host `url`, sharing the keyring in `shared`.
fn node_options(
    dir: &Path,
    shared: &Path,
    name: &str,
    url: &str,
) -> tenant_kms::service::ServiceOptions {
    let mut options = test_options(dir);
    let mut pg = PgOptions::new(url);
    // Calls that wait for a connection give up quickly while no primary takes writes.
    pg.connect_timeout = Duration::from_secs(1);
    options.store = StoreBackend::Postgres(pg);
    options.master_keys = tenant_kms::keys::MasterKeySource::File(shared.join("master.keyring"));
    options.shred_ledger = Some(shared.join(format!("{name}.ledger")));
    options.node_id = Some(name.into());
    options.staleness_bound = Duration::from_secs(1);
    options
}

/// Creates tenants and encrypts under them on `url` until `stop`, recording what was
/// acknowledged; UNAVAILABLE (no primary yet) is retried.
fn load(
    tasks: &mut tokio::task::JoinSet<()>,
    url: String,
    token: String,
    node: &'static str,
    acked: &Arc<Mutex<Acked>>,
    count: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
) {
    for c in 0..3 {
        let (url, token) = (url.clone(), token.clone());
        let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
        tasks.spawn(async move {
            let (mut keys, mut tenants, _) = clients(&url, Some(&token)).await;
            let mut i = 0u32;
            let mut current: Option<String> = None;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let tenant = match &current {
                    Some(t) if !i.is_multiple_of(4) => t.clone(),
                    _ => {
                        let id = format!("{node}-{c}-{i}");
                        match try_create_tenant(&mut tenants, &id).await {
                            Ok(_) => {
                                acked.lock().unwrap().tenants.push(id.clone());
                                count.fetch_add(1, Ordering::SeqCst);
                                current = Some(id.clone());
                                id
                            }
                            Err(status) => {
                                note(&acked, &status);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                    }
                };
                let plain = format!("{node}.{c}.{i}").into_bytes();
                match keys
                    .encrypt(encrypt_request(&tenant, "drill", &plain, b""))
                    .await
                {
                    Ok(reply) => {
                        let id = request_id(&reply);
                        let ciphertext = reply.into_inner().ciphertext;
                        acked
                            .lock()
                            .unwrap()
                            .encrypts
                            .push((id, tenant, plain, ciphertext));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) => {
                        note(&acked, &status);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
}

fn note(acked: &Mutex<Acked>, status: &tonic::Status) {
    if status.code() != Code::Unavailable {
        acked
            .lock()
            .unwrap()
            .unexpected
            .push(format!("{:?}: {}", status.code(), status.message()));
    }
}

async fn wait_for(count: &AtomicUsize, n: usize, what: &str) {
    let started = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: only {} of {n} calls acknowledged",
            count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_to_a_synchronous_standby_loses_no_acknowledged_key_or_record() {
    let (mut primary, standby, db) = tokio::task::spawn_blocking(|| {
        let primary = PgCluster::new();
        let db = primary.create_database();
        let standby = primary.standby();
        primary.require_synchronous_standby();
        (primary, standby, db)
    })
    .await
    .unwrap();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        primary.password(),
        primary.port(),
        standby.port()
    );
    let dirs = tempfile::tempdir().unwrap();
    let shared = dirs.path();
    let a = TestServer::start_with(node_options(&shared.join("a"), shared, "node-a", &url)).await;
    let b_dir = shared.join("b");
    std::fs::create_dir(&b_dir).unwrap();
    std::fs::copy(a.data_dir.join("admin.token"), b_dir.join("admin.token")).unwrap();
    let b = TestServer::start_with(node_options(&b_dir, shared, "node-b", &url)).await;

    let acked = Arc::new(Mutex::new(Acked::default()));
    // Acknowledged calls per node: each node must be shown to serve again on its own.
    let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for ((node, server), count) in [("a", &a), ("b", &b)].into_iter().zip(&counts) {
        load(
            &mut tasks,
            server.url(),
            server.admin_token.clone(),
            node,
            &acked,
            count,
            &stop,
        );
    }
    for (node, count) in ["a", "b"].into_iter().zip(&counts) {
        wait_for(count, 30, &format!("node {node} before the failover")).await;
    }
    let killed_at: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let primary = tokio::task::spawn_blocking(move || {
        primary.kill9();
        primary
    })
    .await
    .unwrap();
    let killed = Instant::now();
    // Nothing can commit now: the primary is gone and the standby is read-only.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let standby = tokio::task::spawn_blocking(move || {
        standby.promote();
        standby
    })
    .await
    .unwrap();
    // The same nodes, not restarted, each serve again on the promoted standby.
    for (node, count) in ["a", "b"].into_iter().zip(&counts) {
        let target = count.load(Ordering::SeqCst) + 30;
        wait_for(count, target, &format!("node {node} after the promotion")).await;
    }
    println!(
        "{killed_at:?} calls acknowledged by nodes a and b before the kill; both served again \
         {:?} after it",
        killed.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.unexpected.is_empty(),
        "refusals other than UNAVAILABLE: {:?}",
        acked.unexpected
    );

    // Every acknowledged tenant and its key are on the promoted standby.
    let new_primary = standby.url(&db);
    let (tenants, keys): (HashSet<String>, HashSet<String>) = {
        let url = new_primary.clone();
        tenant_kms::store::postgres::off_runtime(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            let column = |client: &mut ::postgres::Client, sql: &str| -> HashSet<String> {
                client
                    .query(sql, &[])
                    .unwrap()
                    .iter()
                    .map(|row| row.get(0))
                    .collect()
            };
            (
                column(&mut client, "SELECT tenant_id FROM tenants"),
                column(&mut client, "SELECT tenant_id FROM wrapped_keys"),
            )
        })
    };
    let lost: Vec<&String> = acked
        .tenants
        .iter()
        .filter(|t| !tenants.contains(*t) || !keys.contains(*t))
        .collect();
    assert!(lost.is_empty(), "acknowledged tenants lost: {lost:?}");
    // Every acknowledged encryption has its audit record, and decrypts through either node.
    let recorded = recorded_encrypts(&new_primary);
    let missing: Vec<&String> = acked
        .encrypts
        .iter()
        .map(|(id, ..)| id)
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged calls without an audit record: {missing:?}"
    );
    let (mut keys_a, _, mut audit) = a.clients().await;
    let (mut keys_b, _, _) = b.clients().await;
    for (n, (_, tenant, plain, ciphertext)) in acked.encrypts.iter().enumerate() {
        let keys = if n % 2 == 0 { &mut keys_a } else { &mut keys_b };
        let opened = decrypt(keys, tenant, "drill", ciphertext, b"")
            .await
            .unwrap_or_else(|s| panic!("acknowledged ciphertext of {tenant}: {s:?}"));
        assert_eq!(&opened.plaintext, plain);
    }
    println!(
        "{} tenants and {} encryptions acknowledged, all on the promoted standby",
        acked.tenants.len(),
        acked.encrypts.len()
    );
    let report = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    a.stop().await;
    b.stop().await;
    // `audit verify` of the command line, on the multi-host store (it finds the new primary).
    let (code, out, err) = run_command(
        std::process::Command::new(env!("CARGO_BIN_EXE_tenant-kms"))
            .args(["audit", "verify", "--node-id", "node-a", "--data-dir"])
            .arg(shared.join("a"))
            .arg("--keyring")
            .arg(shared.join("master.keyring"))
            .arg("--shred-ledger")
            .arg(shared.join("node-a.ledger"))
            .env("TENANT_KMS_STORE", &url),
    );
    assert_eq!(code, 0, "audit verify --store: {out}{err}");
    assert!(out.starts_with("OK: "), "{out}");
    drop(primary);
    drop(standby);
}
