//! Moving to PostgreSQL and living there (issue 14, items 1, 5 and 6), through the binary
//! against the binary's private PostgreSQL (`tests/common/postgres.rs`):
//!
//! - `migrate-store --from DIR --to postgres://…`: everything arrives (old ciphertexts
//!   decrypt on a node serving from PostgreSQL, tokens work, the destroyed version stays
//!   destroyed, every audit record is there in order and `audit verify --store` passes); a
//!   second run into the non-empty target is refused and changes nothing; a run killed before
//!   it publishes leaves the target empty, and running it again completes.
//! - `backup verify --store`: a database dumped with pg_dump and restored with pg_restore
//!   checks whole; a tampered wrapped-key row in the restore fails naming the tenant.
//! - `rotate`, `token`, `audit verify|export|prune` and `tenant export|import` on `--store`,
//!   and a tenant exported from SQLite imported into PostgreSQL and back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::process::Command;

use common::postgres::{BIN_DIR, fresh_database};
use common::*;
use tenant_kms::pb;
use tenant_kms::store::StoreBackend;
use tenant_kms::store::postgres::{PgOptions, off_runtime};

/// A database of the test server: its URL without the password (for the command line, which
/// refuses one) and the password (handed over in PGPASSWORD).
struct Target {
    /// With the password, for in-process nodes and SQL.
    full: String,
    /// Without it, for the command line.
    url: String,
    password: Option<String>,
}

impl Target {
    fn new(full: String) -> Self {
        let (scheme, rest) = full.split_once("://").unwrap();
        let (url, password) = match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, password)) => (
                    format!("{scheme}://{user}@{host}"),
                    Some(password.to_owned()),
                ),
                None => (full.clone(), None),
            },
            None => (full.clone(), None),
        };
        Self {
            full,
            url,
            password,
        }
    }

    fn fresh() -> Self {
        Self::new(fresh_database())
    }

    /// Runs the binary with `args`, the password in PGPASSWORD and `env` set.
    fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let mut command = Command::new(BIN);
        command.args(args).env_remove("TENANT_KMS_STORE");
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        run_command(&mut command)
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_env(args, &[])
    }

    /// Runs one SQL query returning one BIGINT.
    fn count(&self, sql: &str) -> i64 {
        let url = self.full.clone();
        let sql = sql.to_owned();
        off_runtime(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            client.query_one(&sql, &[]).unwrap().get(0)
        })
    }

    fn execute(&self, sql: &str) -> u64 {
        let url = self.full.clone();
        let sql = sql.to_owned();
        off_runtime(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            client.execute(&sql, &[]).unwrap()
        })
    }

    /// Tables in the role's default schema.
    fn tables(&self) -> i64 {
        self.count("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()")
    }

    /// Options of an in-process node on this database with its data directory `dir`.
    fn node_options(&self, dir: &Path) -> tenant_kms::service::ServiceOptions {
        let mut options = test_options(dir);
        options.store = StoreBackend::Postgres(PgOptions::new(&self.full));
        options
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `audit export` lines without their sequence numbers and node (which a migration renumbers).
fn exported(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| {
            let mut value: serde_json::Value = serde_json::from_str(line).unwrap();
            let object = value.as_object_mut().unwrap();
            object.remove("seq");
            object.remove("node_id");
            value
        })
        .collect()
}

/// A SQLite data directory in `dir` with three tenants, rotations, a destroyed version, a
/// service token and a revoked one, blind-index definitions and audit records. Returns the
/// ciphertexts (tenant, plaintext, ciphertext), the service token and the revoked one.
async fn populated(dir: &Path) -> (Vec<(String, Vec<u8>, Vec<u8>)>, String, String) {
    let server = TestServer::start_with(test_options(dir)).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    let mut sealed = Vec::new();
    for id in ["acme", "globex", "initech"] {
        create_tenant(&mut tenants, id).await;
        let plain = format!("{id}-v1").into_bytes();
        let c = encrypt(&mut keys, id, "crm.email", &plain, b"").await;
        sealed.push((id.to_owned(), plain, c.ciphertext));
    }
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let c = encrypt(&mut keys, "acme", "crm.email", b"acme-v2", b"").await;
    sealed.push(("acme".into(), b"acme-v2".to_vec(), c.ciphertext));
    rotate_tenant(&mut tenants, "globex").await.unwrap();
    disable_key_version(&mut tenants, "globex", 1)
        .await
        .unwrap();
    destroy_key_version(&mut tenants, "globex", 1)
        .await
        .unwrap();
    tenants
        .declare_blind_index(pb::DeclareBlindIndexRequest {
            tenant_id: "acme".into(),
            name: "email".into(),
            bits: 32,
            normalization: "casefold_trim".into(),
        })
        .await
        .unwrap();
    server.stop().await;
    let (code, token, stderr) = run_cli(&[
        "token",
        "create",
        "--role",
        "service",
        "--tenants",
        "acme",
        "--data-dir",
        path(dir),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, revoked, stderr) = run_cli(&[
        "token",
        "create",
        "--role",
        "service",
        "--tenants",
        "acme",
        "--name",
        "gone",
        "--data-dir",
        path(dir),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (_, list, _) = run_cli(&["token", "list", "--data-dir", path(dir)]);
    let gone = list
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|t| t["name"] == "gone")
        .unwrap();
    let (code, _, stderr) = run_cli(&[
        "token",
        "revoke",
        gone["id"].as_str().unwrap(),
        "--data-dir",
        path(dir),
    ]);
    assert_eq!(code, 0, "{stderr}");
    (sealed, token.trim().to_owned(), revoked.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_directory_migrates_whole_and_a_node_serves_it_from_postgres() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (sealed, token, revoked) = populated(&dir).await;
    let (code, before, stderr) = run_cli(&["audit", "export", "--data-dir", path(&dir)]);
    assert_eq!(code, 0, "{stderr}");
    let before = exported(&before);
    let target = Target::fresh();

    let (code, stdout, stderr) = target.cli(&[
        "migrate-store",
        "--from",
        path(&dir),
        "--to",
        &target.url,
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["copied"]["tenants"], 3, "{summary}");
    assert_eq!(summary["copied"]["key_versions"], 5, "{summary}");
    assert_eq!(summary["copied"]["wrapped_keys"], 4, "{summary}");
    assert_eq!(summary["copied"]["index_definitions"], 1, "{summary}");
    // The bootstrap admin token and the two made here.
    assert_eq!(summary["copied"]["tokens"], 3, "{summary}");
    assert_eq!(
        summary["copied"]["audit_records"],
        before.len() as u64,
        "{summary}"
    );

    // A second run into the now non-empty target is refused and changes nothing.
    let tenants_before = target.count("SELECT count(*) FROM tenants");
    let records_before = target.count("SELECT count(*) FROM audit_records");
    let (code, _, stderr) =
        target.cli(&["migrate-store", "--from", path(&dir), "--to", &target.url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not empty"), "{stderr}");
    assert_eq!(target.count("SELECT count(*) FROM tenants"), tenants_before);
    assert_eq!(
        target.count("SELECT count(*) FROM audit_records"),
        records_before
    );

    // Every record is there, in order, unchanged, and the chain verifies.
    let (code, after, stderr) = target.cli(&[
        "audit",
        "export",
        "--data-dir",
        path(&dir),
        "--store",
        &target.url,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let after = exported(&after);
    assert_eq!(
        after.len(),
        before.len() + 1,
        "the records and the closing one"
    );
    assert_eq!(after[..before.len()], before[..]);
    let closing = &after[before.len()];
    assert_eq!(closing["operation"], "Restore");
    assert!(
        closing["detail"]
            .as_str()
            .unwrap()
            .starts_with("migrate-store from"),
        "{closing}"
    );
    let (code, stdout, stderr) = target.cli(&[
        "audit",
        "verify",
        "--data-dir",
        path(&dir),
        "--store",
        &target.url,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // A node on PostgreSQL with the same keyring serves it all.
    let node = TestServer::start_with(target.node_options(&dir)).await;
    let (mut keys, mut tenants, _) = node.clients().await;
    for (tenant, plain, ciphertext) in &sealed {
        let result = decrypt(&mut keys, tenant, "crm.email", ciphertext, b"").await;
        if tenant == "globex" {
            // Sealed under the destroyed version 1.
            assert!(result.is_err(), "a destroyed version came back");
        } else {
            assert_eq!(&result.unwrap().plaintext, plain);
        }
    }
    let versions = key_versions(&mut tenants, "globex").await;
    assert_eq!(versions[0].state, pb::KeyVersionState::Destroyed as i32);
    assert_eq!(key_versions(&mut tenants, "acme").await.len(), 2);
    let (mut service, _, _) = node.clients_with(Some(token.as_str())).await;
    let (_, _, ciphertext) = &sealed[0];
    assert!(
        decrypt(&mut service, "acme", "crm.email", ciphertext, b"")
            .await
            .is_ok()
    );
    let (mut refused, _, _) = node.clients_with(Some(revoked.as_str())).await;
    assert!(
        decrypt(&mut refused, "acme", "crm.email", ciphertext, b"")
            .await
            .is_err(),
        "a revoked token works again"
    );
    let served = tenants
        .list_blind_indexes(pb::ListBlindIndexesRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.definitions.len(), 1);
    node.stop().await;

    let (code, stdout, stderr) = target.cli(&[
        "audit",
        "verify",
        "--data-dir",
        path(&dir),
        "--store",
        &target.url,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = target.cli(&[
        "backup",
        "verify",
        "--data-dir",
        path(&dir),
        "--store",
        &target.url,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("OK: store"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_killed_before_it_publishes_leaves_the_target_empty_and_runs_again() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    populated(&dir).await;
    let target = Target::fresh();
    let (code, _, stderr) = target.cli_env(
        &["migrate-store", "--from", path(&dir), "--to", &target.url],
        &[(
            tenant_kms::store::TEST_FAILPOINT_ENV,
            tenant_kms::store::FAILPOINT_MIGRATE_BEFORE_PUBLISH,
        )],
    );
    assert_ne!(code, 0, "the failpoint did not stop it: {stderr}");
    // Everything was copied into the staging schema; the target schema has not a table.
    assert_eq!(target.tables(), 0);
    assert_eq!(
        target.count(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_kms_migration' \
             AND tablename = 'tenants'"
        ),
        1
    );
    // A node started now finds nothing of the copy (it would make a new, empty store).
    let (code, stdout, stderr) =
        target.cli(&["migrate-store", "--from", path(&dir), "--to", &target.url]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("3 tenants"), "{stdout}");
    assert_eq!(
        target.count("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_kms_migration'"),
        0,
        "the staging schema is gone"
    );
    assert_eq!(target.count("SELECT count(*) FROM tenants"), 3);
    let (code, stdout, stderr) = target.cli(&[
        "audit",
        "verify",
        "--data-dir",
        path(&dir),
        "--store",
        &target.url,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_refuses_a_served_source_and_a_broken_audit_chain() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    populated(&dir).await;
    let server = BinaryServer::start(&dir, &[]).await;
    let target = Target::fresh();
    let (code, _, stderr) =
        target.cli(&["migrate-store", "--from", path(&dir), "--to", &target.url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("in use by"), "{stderr}");
    assert_eq!(target.tables(), 0);
    drop(server);

    // A source whose audit chain does not verify is refused too: never laundered into a
    // fresh chain.
    rusqlite::Connection::open(dir.join("audit.db"))
        .unwrap()
        .execute(
            "UPDATE audit_events SET tenant_id = 'other' WHERE seq = 3",
            [],
        )
        .unwrap();
    let (code, _, stderr) =
        target.cli(&["migrate-store", "--from", path(&dir), "--to", &target.url]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("record 3"), "{stderr}");
    assert_eq!(target.tables(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restored_dump_checks_whole_and_a_tampered_key_row_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let source = Target::fresh();
    let node = TestServer::start_with(source.node_options(&dir)).await;
    let (mut keys, mut tenants, _) = node.clients().await;
    for id in ["acme", "globex"] {
        create_tenant(&mut tenants, id).await;
        encrypt(&mut keys, id, "crm.email", b"x", b"").await;
    }
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    node.stop().await;

    let dump = temp.path().join("kms.dump");
    let env_password = source.password.clone().unwrap_or_default();
    let (code, _, stderr) = run_command(
        Command::new(Path::new(BIN_DIR).join("pg_dump"))
            .args(["-Fc", "-f", path(&dump), "-d", &source.url])
            .env("PGPASSWORD", &env_password),
    );
    assert_eq!(code, 0, "pg_dump: {stderr}");
    let restored = Target::fresh();
    let (code, _, stderr) = run_command(
        Command::new(Path::new(BIN_DIR).join("pg_restore"))
            .args([
                "--no-owner",
                "--exit-on-error",
                "-d",
                &restored.url,
                path(&dump),
            ])
            .env("PGPASSWORD", restored.password.clone().unwrap_or_default()),
    );
    assert_eq!(code, 0, "pg_restore: {stderr}");

    let check = |target: &Target| {
        target.cli(&[
            "backup",
            "verify",
            "--json",
            "--data-dir",
            path(&dir),
            "--store",
            &target.url,
        ])
    };
    let (code, stdout, stderr) = check(&restored);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["tenants"], 2, "{report}");
    assert_eq!(report["wrapped_keys_unwrapped"], 3, "{report}");

    // One flipped bit in one wrapped key of the restore.
    let changed = restored.execute(
        "UPDATE wrapped_keys SET wrapped_key = \
         set_byte(wrapped_key, 20, get_byte(wrapped_key, 20) # 1) \
         WHERE tenant_id = 'acme' AND version = 1",
    );
    assert_eq!(changed, 1);
    let (code, stdout, stderr) = check(&restored);
    assert_eq!(code, 1, "a tampered restore passed: {stdout}");
    assert!(
        stderr.contains("acme"),
        "the failure names the tenant: {stderr}"
    );
    // The source is untouched and still passes.
    let (code, stdout, stderr) = check(&source);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_directory_commands_work_on_store_and_tenants_move_between_backends() {
    let temp = tempfile::tempdir().unwrap();
    let sqlite_dir = temp.path().join("sqlite");
    let pg_dir = temp.path().join("pg");
    let keyring = sqlite_dir.join("master.keyring");
    let target = Target::fresh();

    // One tenant on SQLite; a PostgreSQL node on the same keyring (and shred ledger).
    let server = TestServer::start_with(test_options(&sqlite_dir)).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "moving").await;
    let v1 = encrypt(&mut keys, "moving", "crm.email", b"on sqlite", b"").await;
    server.stop().await;
    let mut options = target.node_options(&pg_dir);
    options.master_keys = tenant_kms::keys::MasterKeySource::File(keyring.clone());
    let node = TestServer::start_with(options.clone()).await;
    node.stop().await;

    let pg = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "--data-dir",
            path(&pg_dir),
            "--keyring",
            path(&keyring),
            "--store",
            &target.url,
        ]);
        let (code, stdout, stderr) = target.cli(&all);
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        stdout
    };

    // tenant export from SQLite, import into PostgreSQL.
    let export = temp.path().join("moving.export");
    let (code, _, stderr) = run_cli(&[
        "tenant",
        "export",
        "moving",
        "--out",
        path(&export),
        "--data-dir",
        path(&sqlite_dir),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let imported = pg(&["tenant", "import", path(&export)]);
    assert!(imported.contains("\"imported\""), "{imported}");

    // rotate and token on --store.
    let rotated = pg(&["rotate", "--tenant", "moving", "--json"]);
    assert!(rotated.contains("moving"), "{rotated}");
    let token = pg(&[
        "token",
        "create",
        "--role",
        "service",
        "--tenants",
        "moving",
    ]);
    let listed = pg(&["token", "list"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");

    let node = TestServer::start_with(options.clone()).await;
    let (mut service, _, _) = node.clients_with(Some(token.trim())).await;
    let plain = decrypt(&mut service, "moving", "crm.email", &v1.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(plain.plaintext, b"on sqlite");
    let v2 = encrypt(&mut service, "moving", "crm.email", b"on postgres", b"").await;
    let (_, mut tenants, _) = node.clients().await;
    assert_eq!(key_versions(&mut tenants, "moving").await.len(), 2);
    node.stop().await;

    // audit verify, export and prune on --store.
    let verified = pg(&["audit", "verify", "--json"]);
    assert!(verified.contains("\"ok\":true"), "{verified}");
    let records = pg(&["audit", "export"]);
    assert!(records.contains("TenantImport"), "{records}");
    assert!(records.contains("TokenCreate"), "{records}");
    pg(&["audit", "prune", "--before", "2000-01-01"]);
    let verified = pg(&["audit", "verify", "--json"]);
    assert!(verified.contains("\"ok\":true"), "{verified}");

    // And back: export from PostgreSQL, import into SQLite, where v2's value now decrypts.
    let back = temp.path().join("moving-back.export");
    pg(&["tenant", "export", "moving", "--out", path(&back)]);
    let (code, stdout, stderr) = run_cli(&[
        "tenant",
        "import",
        path(&back),
        "--data-dir",
        path(&sqlite_dir),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let server = TestServer::start_with(test_options(&sqlite_dir)).await;
    let (mut keys, _, _) = server.clients().await;
    let plain = decrypt(&mut keys, "moving", "crm.email", &v2.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(plain.plaintext, b"on postgres");
    server.stop().await;
}
