//! The PostgreSQL key store through the real server (issue 14): backend choice and its
//! refusals, two nodes on one database (changes through one honoured by the other within the
//! staleness bound; racing creates, rotations and reservations), a database that stops under
//! load and comes back, and a node started before its database.
//!
//! Every test gets a database of its own on the binary's private cluster
//! (`tests/common/postgres.rs`), or a private cluster when it stops the server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::{PgCluster, fresh_database};
use common::*;
use tenant_kms::auth::{Role, TokenSpec, issue_token};
use tenant_kms::service::ServiceOptions;
use tenant_kms::store::postgres::{PgOptions, PgPool, PostgresKeyStore};
use tenant_kms::store::{StoreBackend, TenantStore};
use tonic::Code;

/// The staleness bound the multi-node tests run with.
const BOUND: Duration = Duration::from_secs(1);

/// Options of a node in `dir` on the database at `url` (the keyring and the shred ledger are
/// the shared files in `shared`, as every node holds the same keyring).
fn node_options(dir: &Path, shared: &Path, url: &str) -> ServiceOptions {
    let mut options = test_options(dir);
    options.store = StoreBackend::Postgres(PgOptions::new(url));
    options.master_keys = tenant_kms::keys::MasterKeySource::File(shared.join("master.keyring"));
    options.shred_ledger = Some(shared.join("shred.ledger"));
    options.staleness_bound = BOUND;
    options
}

/// Two nodes on one new database, each with its own data directory, sharing the keyring and
/// the shred ledger; node B uses node A's admin token (tokens live in the database).
struct TwoNodes {
    a: TestServer,
    b: TestServer,
    _dirs: tempfile::TempDir,
}

async fn two_nodes() -> TwoNodes {
    let dirs = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let shared = dirs.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let a = TestServer::start_with(node_options(&dirs.path().join("a"), &shared, &url)).await;
    let b_dir = dirs.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    std::fs::copy(a.data_dir.join("admin.token"), b_dir.join("admin.token")).unwrap();
    let b = TestServer::start_with(node_options(&b_dir, &shared, &url)).await;
    TwoNodes { a, b, _dirs: dirs }
}

/// Calls `call` on node B until it no longer succeeds; returns the time that took and the
/// refusal. Fails if B still honours the old state after `limit`.
async fn until_refused<F, Fut>(mut call: F, limit: Duration) -> (Duration, tonic::Status)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let started = Instant::now();
    loop {
        if let Err(status) = call().await {
            return (started.elapsed(), status);
        }
        assert!(
            started.elapsed() < limit,
            "node B still honoured the old state after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_password_on_the_command_line_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_cli(&[
        "serve",
        "--data-dir",
        dir.path().join("d").to_str().unwrap(),
        "--store",
        "postgres://kms:hunter2secret@127.0.0.1:1/kms",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("password"), "{stderr}");
    assert!(stderr.contains("--store-password-file"), "{stderr}");
    assert!(
        !stderr.contains("hunter2secret"),
        "the password was echoed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_newer_than_the_binary_is_refused() {
    let url = fresh_database();
    tenant_kms::store::postgres::off_runtime(|| {
        let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "CREATE TABLE kms_schema_version (version BIGINT NOT NULL); \
                 INSERT INTO kms_schema_version VALUES ({})",
                tenant_kms::store::postgres::schema_version() + 1
            ))
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let options = node_options(&dir.path().join("d"), dir.path(), &url);
    let err = tokio::task::spawn_blocking(move || tenant_kms::service::AppState::open(options))
        .await
        .unwrap()
        .err()
        .expect("a newer schema must be refused");
    assert!(err.to_string().contains("newer than this binary"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_another_master_key_is_refused() {
    let url = fresh_database();
    let dirs = tempfile::tempdir().unwrap();
    let shared = dirs.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let a = TestServer::start_with(node_options(&dirs.path().join("a"), &shared, &url)).await;
    // Node B brings a keyring of its own (created on its first start): the key check values
    // in the database refuse it before it serves anything.
    let other = dirs.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let options = node_options(&dirs.path().join("b"), &other, &url);
    let err = tokio::task::spawn_blocking(move || tenant_kms::service::AppState::open(options))
        .await
        .unwrap()
        .err()
        .expect("a node with another master key must be refused");
    let text = err.to_string();
    assert!(text.contains("master key"), "{text}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_through_one_node_are_honoured_by_the_other_within_the_bound() {
    let nodes = two_nodes().await;
    let (_, mut tenants_a, _) = nodes.a.clients().await;
    let (keys_b, _, _) = nodes.b.clients().await;
    for id in ["revoke", "suspend", "destroy", "disable"] {
        create_tenant(&mut tenants_a, id).await;
    }
    // A service token issued through node A's store, used on node B (its caches warm).
    let store = Arc::clone(nodes.a.state.keys.store());
    let clock = Arc::clone(&nodes.a.state.options.clock);
    let issued = tokio::task::spawn_blocking(move || {
        issue_token(
            store.as_ref(),
            &TokenSpec {
                name: "svc".into(),
                role: Role::Service,
                tenants: "*".into(),
                operations: "*".into(),
                ttl_seconds: None,
            },
            clock.as_ref(),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let (mut svc_b, _, _) = nodes.b.clients_with(Some(issued.secret.as_str())).await;
    let sealed = encrypt(&mut svc_b, "disable", "c", b"v", b"")
        .await
        .ciphertext;
    for id in ["revoke", "suspend", "destroy"] {
        encrypt(&mut svc_b, id, "c", b"v", b"").await;
    }

    // Revoked through A (as `token revoke` on a node does): B refuses the token.
    let store = Arc::clone(nodes.a.state.keys.store());
    let id = issued.record.id.clone();
    tokio::task::spawn_blocking(move || store.revoke_token(&id, 1).unwrap())
        .await
        .unwrap();
    let (took, status) = until_refused(
        || {
            let mut keys = svc_b.clone();
            async move {
                keys.encrypt(encrypt_request("revoke", "c", b"v", b""))
                    .await
                    .map(|_| ())
            }
        },
        BOUND * 3,
    )
    .await;
    assert!(
        matches!(status.code(), Code::Unauthenticated | Code::Unavailable),
        "{status:?}"
    );
    println!("revoked token refused by node B after {took:?} (bound {BOUND:?})");

    // Suspended, destroyed, a version disabled through A: B refuses the admin's calls.
    suspend_tenant(&mut tenants_a, "suspend").await.unwrap();
    let (took, status) = until_refused(
        || {
            let mut keys = keys_b.clone();
            async move {
                keys.encrypt(encrypt_request("suspend", "c", b"v", b""))
                    .await
                    .map(|_| ())
            }
        },
        BOUND * 3,
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    println!("suspended tenant refused by node B after {took:?}");

    schedule_deletion(&mut tenants_a, "destroy", Some(0))
        .await
        .unwrap();
    let (took, status) = until_refused(
        || {
            let mut keys = keys_b.clone();
            async move {
                keys.encrypt(encrypt_request("destroy", "c", b"v", b""))
                    .await
                    .map(|_| ())
            }
        },
        BOUND * 3,
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    println!("tenant scheduled for deletion refused by node B after {took:?}");

    // Version 1 stops being primary first (a primary cannot be disabled).
    rotate_tenant(&mut tenants_a, "disable").await.unwrap();
    disable_key_version(&mut tenants_a, "disable", 1)
        .await
        .unwrap();
    let (took, status) = until_refused(
        || {
            let mut keys = keys_b.clone();
            let sealed = sealed.clone();
            async move {
                decrypt(&mut keys, "disable", "c", &sealed, b"")
                    .await
                    .map(|_| ())
            }
        },
        BOUND * 3,
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    println!("disabled key version refused by node B after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_rotations_and_reservations_through_two_nodes() {
    let nodes = two_nodes().await;
    let (keys_a, mut tenants_a, _) = nodes.a.clients().await;
    let (keys_b, mut tenants_b, _) = nodes.b.clients().await;
    // The same ids created through both nodes at once: exactly one creation of each.
    let mut created = 0;
    for i in 0..8 {
        let id = format!("race-{i}");
        let (ra, rb) = tokio::join!(
            try_create_tenant(&mut tenants_a, &id),
            try_create_tenant(&mut tenants_b, &id)
        );
        let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "{id}: {ra:?} / {rb:?}");
        for refused in [ra, rb].into_iter().filter_map(Result::err) {
            assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
        }
        created += 1;
    }
    assert_eq!(list_tenants(&mut tenants_a).await.len(), created);
    // Rotations through both nodes at once: no version twice, none lost.
    let mut rotated = 0;
    for _ in 0..5 {
        let (ra, rb) = tokio::join!(
            rotate_tenant(&mut tenants_a, "race-0"),
            rotate_tenant(&mut tenants_b, "race-0")
        );
        rotated += [ra, rb].iter().filter(|r| r.is_ok()).count();
    }
    let versions: Vec<u32> = key_versions(&mut tenants_b, "race-0")
        .await
        .iter()
        .map(|v| v.version)
        .collect();
    let expected: Vec<u32> = (1..=u32::try_from(rotated + 1).unwrap()).collect();
    assert_eq!(
        versions, expected,
        "one new version per successful rotation"
    );
    // Encryptions through both nodes at once: the reserved count covers every one.
    let each = 200usize;
    let run = |mut keys: Keys| async move {
        for _ in 0..each {
            encrypt(&mut keys, "race-1", "c", b"v", b"").await;
        }
    };
    tokio::join!(run(keys_a.clone()), run(keys_b.clone()));
    let store = Arc::clone(nodes.a.state.keys.store());
    let reserved = tokio::task::spawn_blocking(move || {
        store
            .key_versions(&tenant_kms::domain::TenantId::parse("race-1").unwrap())
            .unwrap()[0]
            .encryptions
    })
    .await
    .unwrap();
    assert!(
        reserved >= 2 * each as u64,
        "{reserved} reserved for {} encryptions",
        2 * each
    );
}

#[test]
fn reservations_through_two_store_handles_add_up_exactly() {
    // Two nodes' key stores on one database, reserving the same version at once.
    let url = fresh_database();
    let open = || {
        let pool = PgPool::connect(&PgOptions::new(&url)).unwrap();
        let store = PostgresKeyStore::open(pool, "n", BOUND).unwrap();
        tenant_kms::store::contract::install_test_row_key(&store);
        store
    };
    let a = open();
    tenant_kms::store::contract::check_reserve_encryptions(&a);
    let b = open();
    let id = tenant_kms::domain::TenantId::parse("a").unwrap();
    let before = a.key_versions(&id).unwrap()[0].encryptions;
    std::thread::scope(|scope| {
        for store in [&a, &b] {
            for _ in 0..3 {
                let id = id.clone();
                scope.spawn(move || {
                    for _ in 0..20 {
                        store.reserve_encryptions(&id, 1, 3).unwrap();
                    }
                });
            }
        }
    });
    assert_eq!(
        b.key_versions(&id).unwrap()[0].encryptions,
        before + 2 * 3 * 20 * 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_fails_calls_closed_then_they_succeed_again() {
    let mut cluster = tokio::task::spawn_blocking(PgCluster::new).await.unwrap();
    let db = cluster.create_database();
    let dirs = tempfile::tempdir().unwrap();
    let mut options = node_options(&dirs.path().join("n"), dirs.path(), &cluster.url(&db));
    // Calls that wait for a pooled connection give up quickly while the database is gone.
    if let StoreBackend::Postgres(pg) = &mut options.store {
        pg.connect_timeout = Duration::from_secs(1);
    }
    let node = TestServer::start_with(options).await;
    let (mut keys, mut tenants, _) = node.clients().await;
    create_tenant(&mut tenants, "t").await;
    let mut acknowledged = Vec::new();
    for i in 0..20u32 {
        let sealed = encrypt(&mut keys, "t", "c", &i.to_be_bytes(), b"").await;
        acknowledged.push((i, sealed.ciphertext));
    }
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    // Past the staleness bound every call fails closed with UNAVAILABLE, cached keys or not.
    tokio::time::sleep(BOUND + Duration::from_millis(300)).await;
    for call in 0..5 {
        let status = keys
            .encrypt(encrypt_request("t", "c", b"x", b""))
            .await
            .expect_err("no call may succeed while the database is gone");
        assert_eq!(status.code(), Code::Unavailable, "call {call}: {status:?}");
        let status = get_tenant(&mut tenants, "t").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start();
        cluster
    })
    .await
    .unwrap();
    // The same node, not restarted, serves again once it reconnected.
    let started = Instant::now();
    loop {
        match keys.encrypt(encrypt_request("t", "c", b"after", b"")).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "the node did not recover"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!(
        "node served again {:?} after the database restarted",
        started.elapsed()
    );
    create_tenant(&mut tenants, "t2").await;
    for (i, ciphertext) in acknowledged {
        let plain = decrypt(&mut keys, "t", "c", &ciphertext, b"")
            .await
            .unwrap();
        assert_eq!(plain.plaintext, i.to_be_bytes(), "acknowledged value {i}");
    }
    node.stop().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_before_its_database_waits_and_says_so() {
    let mut cluster = tokio::task::spawn_blocking(PgCluster::new).await.unwrap();
    let db = cluster.create_database();
    let url = cluster.url_without_password(&db);
    let password = cluster.password().to_owned();
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    // The real binary: the password from PGPASSWORD, the URL from the command line.
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .args(["--store", &url])
        .env("PGPASSWORD", &password)
        .env("TENANT_KMS_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // It says what it waits for while the database is down.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said = String::new();
    while !said.contains("waiting for PostgreSQL") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines_rx
            .recv_timeout(left)
            .expect("the node says it waits for PostgreSQL");
        said.push_str(&line);
        said.push('\n');
    }
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start();
        cluster
    })
    .await
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
            .to_owned()
    })
    .await
    .unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let (_, mut tenants, _) = clients(&format!("http://{addr}"), Some(token.trim())).await;
    create_tenant(&mut tenants, "late").await;
    let _ = child.kill();
    let _ = child.wait();
    drop(cluster);
}

#[test]
fn a_row_recheck_that_cannot_run_refuses_rows_until_one_passes() {
    // Node B's re-check after node A's change fails for a reason other than integrity (here a
    // table it reads is gone); B must refuse rows (UNAVAILABLE) until a re-check passes,
    // never serve them unchecked.
    let url = fresh_database();
    let open = || {
        let pool = PgPool::connect(&PgOptions::new(&url)).unwrap();
        let store = PostgresKeyStore::open(pool, "n", BOUND).unwrap();
        tenant_kms::store::contract::install_test_row_key(&store);
        store
    };
    let a = open();
    tenant_kms::store::contract::check_reserve_encryptions(&a);
    let b = open();
    let id = tenant_kms::domain::TenantId::parse("a").unwrap();
    assert!(b.tenant(&id).unwrap().is_some());
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    admin
        .batch_execute("ALTER TABLE tokens RENAME TO tokens_away")
        .unwrap();
    a.set_rotation_policy(&id, 3600, 1000).unwrap();
    let started = Instant::now();
    let refused = loop {
        use tenant_kms::store::ChangeDetection;
        // Either B's follow thread or this poll re-checks after A's change.
        let _ = b.change_generation();
        match b.tenant(&id) {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "node B kept serving rows it could not re-check"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(
        matches!(refused, tenant_kms::error::Error::Unavailable(_)),
        "{refused}"
    );
    // Still refused on the next calls: the flag stays until a re-check passes.
    assert!(b.tenant(&id).is_err());
    admin
        .batch_execute("ALTER TABLE tokens_away RENAME TO tokens")
        .unwrap();
    // The follow thread retries at its next poll, with no new change to prompt it.
    let started = Instant::now();
    while b.tenant(&id).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node B never re-checked its rows again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        b.tenant(&id).unwrap().unwrap().rotation_period_seconds,
        3600
    );
}

#[test]
fn database_errors_map_by_cause_and_keep_row_values_out() {
    use tenant_kms::error::Error;
    use tenant_kms::store::postgres::map_error;
    let url = fresh_database();
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    // A NULL where a value is expected: a client-side conversion error, not a lost server.
    let row = client.query_one("SELECT NULL::bigint", &[]).unwrap();
    let null = row.try_get::<_, i64>(0).expect_err("NULL is no i64");
    assert!(matches!(map_error(null), Error::Internal(_)));
    // A wrongly typed column: the same.
    let row = client.query_one("SELECT 'text'::text", &[]).unwrap();
    let typed = row.try_get::<_, i64>(0).expect_err("text is no i64");
    assert!(matches!(map_error(typed), Error::Internal(_)));
    // A server error whose DETAIL quotes the row: only SQLSTATE and the primary message stay.
    client
        .batch_execute(
            "CREATE TABLE secrets (v TEXT PRIMARY KEY); \
             INSERT INTO secrets VALUES ('row-value-7f3a')",
        )
        .unwrap();
    let duplicate = client
        .execute("INSERT INTO secrets VALUES ('row-value-7f3a')", &[])
        .expect_err("a duplicate key");
    assert!(
        format!("{duplicate:?}").contains("row-value-7f3a"),
        "the server's error quotes the row in its DETAIL (the reason for the rule)"
    );
    let mapped = map_error(duplicate);
    let text = mapped.to_string();
    assert!(matches!(mapped, Error::Internal(_)), "{text}");
    assert!(text.contains("23505"), "{text}");
    assert!(text.contains("duplicate key"), "{text}");
    assert!(!text.contains("row-value-7f3a"), "{text}");
    // A lost connection stays UNAVAILABLE.
    drop(client);
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    let victim = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let mut victim = victim;
    let lost = victim.batch_execute("SELECT 1").expect_err("terminated");
    assert!(matches!(map_error(lost), Error::Unavailable(_)));
}
