//! Crypto-shredding on PostgreSQL (issue 14, items 4 and 7), against a private cluster of the
//! test's own (`tests/common/postgres.rs`), whose relation files the test reads:
//! - after a destruction (and the table rewrite the backend runs) the wrapped key's exact
//!   bytes are in no live relation file of the cluster (`base/`, after a CHECKPOINT);
//! - a database restored from a dump taken before a destruction is shredded again when a
//!   node starts on it (its shred ledger names the destruction);
//! - a destruction through node A lands in node B's own shred ledger.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::postgres::PgCluster;
use common::*;
use tenant_kms::service::ServiceOptions;
use tenant_kms::store::StoreBackend;
use tenant_kms::store::postgres::PgOptions;
use tonic::Code;

/// Options of a node in `dir` on the database at `url`, with the keyring every node shares
/// (in `keyring_dir`) and a shred ledger file of its own at `ledger`.
fn node_options(dir: &Path, keyring_dir: &Path, ledger: &Path, url: &str) -> ServiceOptions {
    let mut options = test_options(dir);
    options.store = StoreBackend::Postgres(PgOptions::new(url));
    options.master_keys =
        tenant_kms::keys::MasterKeySource::File(keyring_dir.join("master.keyring"));
    options.shred_ledger = Some(ledger.to_path_buf());
    options.staleness_bound = Duration::from_secs(1);
    options
}

/// A private cluster with one database, and a directory for the nodes' files.
async fn cluster() -> (PgCluster, String, tempfile::TempDir) {
    let cluster = tokio::task::spawn_blocking(PgCluster::new).await.unwrap();
    let db = cluster.create_database();
    (cluster, db, tempfile::tempdir().unwrap())
}

/// The wrapped key of `tenant` version `version` as the database holds it, if it does.
fn wrapped_key(cluster: &PgCluster, db: &str, tenant: &str, version: i64) -> Option<Vec<u8>> {
    let url = cluster.url(db);
    let tenant = tenant.to_owned();
    tenant_kms::store::postgres::off_runtime(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client
            .query_opt(
                "SELECT wrapped_key FROM wrapped_keys WHERE tenant_id = $1 AND version = $2",
                &[&tenant, &version],
            )
            .unwrap()
            .map(|row| row.get(0))
    })
}

/// The live relation files of the cluster holding `needle`, after a CHECKPOINT wrote every
/// dirty page out.
fn relation_files_with(cluster: &PgCluster, db: &str, needle: &[u8]) -> Vec<PathBuf> {
    cluster.execute(db, "CHECKPOINT");
    let base = cluster.data_dir().join("base");
    assert!(
        std::fs::read_dir(&base).is_ok(),
        "cannot read the cluster's relation files under {} (run the tests as root or as \
         the postgres user)",
        base.display()
    );
    files_containing(&base, needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destroyed_key_is_in_no_relation_file_of_the_cluster() {
    let (cluster, db, dirs) = cluster().await;
    let node = TestServer::start_with(node_options(
        &dirs.path().join("n"),
        dirs.path(),
        &dirs.path().join("n.ledger"),
        &cluster.url(&db),
    ))
    .await;
    let (_, mut tenants, _) = node.clients().await;
    // Neighbours around the victims, so their rows sit in shared pages.
    for i in 0..20 {
        create_tenant(&mut tenants, &format!("other-{i}")).await;
        if i == 10 {
            create_tenant(&mut tenants, "gone").await;
            create_tenant(&mut tenants, "rotated").await;
        }
    }
    create_tenant(&mut tenants, "last").await;
    rotate_tenant(&mut tenants, "rotated").await.unwrap();
    let gone = wrapped_key(&cluster, &db, "gone", 1).unwrap();
    let rotated_v1 = wrapped_key(&cluster, &db, "rotated", 1).unwrap();
    let last = wrapped_key(&cluster, &db, "last", 1).unwrap();
    let kept = wrapped_key(&cluster, &db, "other-3", 1).unwrap();
    // Planner statistics would copy sample values into pg_statistic: none for wrapped keys.
    cluster.execute(&db, "ANALYZE");
    // The scan finds live keys (so an empty answer below means something).
    for key in [&gone, &rotated_v1, &last, &kept] {
        assert!(
            !relation_files_with(&cluster, &db, key).is_empty(),
            "the scan does not find a live wrapped key"
        );
    }

    schedule_deletion(&mut tenants, "gone", Some(0))
        .await
        .unwrap();
    destroy_key_version(&mut tenants, "rotated", 1)
        .await
        .unwrap();
    // The last row inserted sits at the bottom of its page, where a freed row's bytes stay
    // until overwritten (plain VACUUM leaves them there).
    schedule_deletion(&mut tenants, "last", Some(0))
        .await
        .unwrap();
    for (what, key) in [
        ("destroyed tenant", &gone),
        ("destroyed version", &rotated_v1),
        ("last inserted, destroyed", &last),
    ] {
        let files = relation_files_with(&cluster, &db, key);
        assert!(files.is_empty(), "{what}: its key is still in {files:?}");
    }
    assert!(
        !relation_files_with(&cluster, &db, &kept).is_empty(),
        "a live key vanished"
    );
    node.stop().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_dump_is_shredded_again_when_a_node_starts() {
    let (cluster, db, dirs) = cluster().await;
    let options = node_options(
        &dirs.path().join("n"),
        dirs.path(),
        &dirs.path().join("n.ledger"),
        &cluster.url(&db),
    );
    let node = TestServer::start_with(options.clone()).await;
    let (mut keys, mut tenants, _) = node.clients().await;
    for id in ["doomed", "alive", "half"] {
        create_tenant(&mut tenants, id).await;
    }
    rotate_tenant(&mut tenants, "half").await.unwrap();
    let doomed_ct = encrypt(&mut keys, "doomed", "c", b"secret", b"")
        .await
        .ciphertext;
    let alive_ct = encrypt(&mut keys, "alive", "c", b"kept", b"")
        .await
        .ciphertext;
    let doomed_key = wrapped_key(&cluster, &db, "doomed", 1).unwrap();
    let dump = {
        let cluster = &cluster;
        let db = db.clone();
        tokio::task::block_in_place(|| cluster.dump(&db))
    };
    schedule_deletion(&mut tenants, "doomed", Some(0))
        .await
        .unwrap();
    destroy_key_version(&mut tenants, "half", 1).await.unwrap();
    node.stop().await;

    // The operator restores the dump taken before the destructions.
    tokio::task::block_in_place(|| cluster.restore(&db, &dump));
    assert!(
        wrapped_key(&cluster, &db, "doomed", 1).is_some(),
        "the dump holds the key"
    );
    assert!(wrapped_key(&cluster, &db, "half", 1).is_some());

    // A node starting on it applies its shred ledger before it serves.
    let node = TestServer::start_with(options).await;
    let (mut keys, mut tenants, _) = node.clients().await;
    assert!(wrapped_key(&cluster, &db, "doomed", 1).is_none());
    assert!(wrapped_key(&cluster, &db, "half", 1).is_none());
    let refused = get_tenant(&mut tenants, "doomed")
        .await
        .expect_err("a re-shredded tenant is a tombstone");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(refused.message(), "tenant destroyed");
    let refused = decrypt(&mut keys, "doomed", "c", &doomed_ct, b"")
        .await
        .err()
        .expect("a re-shredded tenant decrypts nothing");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let versions = key_versions(&mut tenants, "half").await;
    assert_eq!(
        versions[0].state,
        tenant_kms::pb::KeyVersionState::Destroyed as i32
    );
    let plain = decrypt(&mut keys, "alive", "c", &alive_ct, b"")
        .await
        .unwrap();
    assert_eq!(plain.plaintext, b"kept");
    let files = relation_files_with(&cluster, &db, &doomed_key);
    assert!(
        files.is_empty(),
        "the re-shredded key is still in {files:?}"
    );
    node.stop().await;
    drop(cluster);
}

/// Whether the shred ledger at `path` names `tenant` (a whole tenant, or `version` of it).
fn ledger_names(path: &Path, tenant: &str, version: Option<u32>) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    text.lines().any(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        entry["tenant_id"] == tenant
            && match version {
                None => entry["kind"] == "tenant",
                Some(v) => entry["kind"] == "version" && entry["version"] == v,
            }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destruction_through_node_a_lands_in_node_bs_ledger() {
    let (cluster, db, dirs) = cluster().await;
    let url = cluster.url(&db);
    let (ledger_a, ledger_b) = (dirs.path().join("a.ledger"), dirs.path().join("b.ledger"));
    let a = TestServer::start_with(node_options(
        &dirs.path().join("a"),
        dirs.path(),
        &ledger_a,
        &url,
    ))
    .await;
    let b_dir = dirs.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    std::fs::copy(a.data_dir.join("admin.token"), b_dir.join("admin.token")).unwrap();
    let b_options = node_options(&b_dir, dirs.path(), &ledger_b, &url);
    let b = TestServer::start_with(b_options.clone()).await;
    let (_, mut tenants_a, _) = a.clients().await;
    create_tenant(&mut tenants_a, "t").await;
    create_tenant(&mut tenants_a, "v").await;
    rotate_tenant(&mut tenants_a, "v").await.unwrap();
    schedule_deletion(&mut tenants_a, "t", Some(0))
        .await
        .unwrap();
    destroy_key_version(&mut tenants_a, "v", 1).await.unwrap();
    assert!(ledger_names(&ledger_a, "t", None));
    assert!(ledger_names(&ledger_a, "v", Some(1)));
    let started = Instant::now();
    while !(ledger_names(&ledger_b, "t", None) && ledger_names(&ledger_b, "v", Some(1))) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node B's ledger never recorded node A's destructions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "node A's destructions in node B's ledger after {:?}",
        started.elapsed()
    );
    // Each node's ledger head is its own: both restart on their own ledgers.
    b.stop().await;
    a.stop().await;
    let b = TestServer::start_with(b_options).await;
    let (_, mut tenants_b, _) = b.clients().await;
    let refused = get_tenant(&mut tenants_b, "t")
        .await
        .expect_err("a destroyed tenant is a tombstone");
    assert_eq!(refused.message(), "tenant destroyed");
    b.stop().await;
    drop(cluster);
}
