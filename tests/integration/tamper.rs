//! A writer of keys.db without the master key, against the real binary (issue 13, item 5):
//! rows edited with rusqlite while `tenant-kms serve` runs and across a restart. Every forged,
//! widened, moved or rolled-back security-relevant row is refused (DATA_LOSS, nothing served
//! from it), a restart with such a row is refused, and putting the genuine row back restores
//! service. SECURITY.md, "A writer of the key store without the master key", cites these.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rusqlite::types::Value;
use tonic::Code;

/// keys.db as a second process opens it (the server keeps its own connection).
fn keys_db(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

/// The named columns of the row(s) `cond` selects in `table`.
fn read_cols(dir: &Path, table: &str, cond: &str, cols: &[&str]) -> Vec<Value> {
    keys_db(dir)
        .query_row(
            &format!("SELECT {} FROM {table} WHERE {cond}", cols.join(", ")),
            [],
            |row| (0..cols.len()).map(|i| row.get::<_, Value>(i)).collect(),
        )
        .unwrap()
}

/// Overwrites the named columns: a direct write, no MAC, no anchor.
fn write_cols(dir: &Path, table: &str, cond: &str, cols: &[&str], values: &[Value]) {
    let sets: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", i + 1))
        .collect();
    let changed = keys_db(dir)
        .execute(
            &format!("UPDATE {table} SET {} WHERE {cond}", sets.join(", ")),
            rusqlite::params_from_iter(values.iter()),
        )
        .unwrap();
    assert_eq!(changed, 1, "{table} {cond}");
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The call was refused as an integrity failure, and returned nothing.
/// (Responses carrying plaintext have no `Debug`, so an answer is not printed.)
fn assert_data_loss<T>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Err(status) => assert_eq!(status.code(), Code::DataLoss, "{what}: {status:?}"),
        Ok(_) => panic!("{what}: served from a tampered row"),
    }
}

/// `token create` on the data directory; returns (secret, id).
fn cli_token(dir: &Path, args: &[&str]) -> (String, String) {
    let mut all = vec!["token", "create", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_cli(&all);
    assert_eq!(code, 0, "{stderr}");
    let id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "token")
        .nth(1)
        .unwrap()
        .to_owned();
    (stdout.trim().to_owned(), id)
}

/// A restart with the store as it is now: refused, naming the integrity failure.
async fn assert_restart_refused(server: BinaryServer, dir: &Path) {
    server.terminate().await;
    let (code, stderr) = serve_refused(dir);
    assert_ne!(code, 0);
    assert!(stderr.contains("integrity"), "{stderr}");
}

#[tokio::test]
async fn token_rows_forged_widened_or_rolled_back_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let url = server.url();
    let admin = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&url, Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "other").await;
    let other_ct = encrypt(&mut keys, "other", "crm.email", b"other's secret", b"")
        .await
        .ciphertext;
    let (svc, svc_id) = cli_token(
        &dir,
        &[
            "--role",
            "service",
            "--tenants",
            "acme",
            "--operations",
            "encrypt",
        ],
    );
    let (mut svc_keys, _, _) = clients(&url, Some(&svc)).await;
    let acme_ct = encrypt(&mut svc_keys, "acme", "crm.email", b"acme", b"")
        .await
        .ciphertext;
    let denied = decrypt(&mut svc_keys, "other", "crm.email", &other_ct, b"").await;
    assert_eq!(denied.err().unwrap().code(), Code::PermissionDenied);
    let svc_row = format!("id = '{svc_id}'");

    // Widened scope, widened operations, a raised role: each refused while the server runs;
    // the genuine value back, the token works again.
    for (column, widened) in [("tenants", "*"), ("operations", "*"), ("role", "admin")] {
        let genuine = read_cols(&dir, "tokens", &svc_row, &[column]);
        write_cols(&dir, "tokens", &svc_row, &[column], &[text(widened)]);
        assert_data_loss(
            decrypt(&mut svc_keys, "other", "crm.email", &other_ct, b"").await,
            &format!("token {column} widened to {widened}"),
        );
        assert_data_loss(
            decrypt(&mut svc_keys, "acme", "crm.email", &acme_ct, b"").await,
            &format!("token {column} widened to {widened}"),
        );
        write_cols(&dir, "tokens", &svc_row, &[column], &genuine);
        encrypt(&mut svc_keys, "acme", "crm.email", b"again", b"").await;
    }

    // A forged admin token row, carrying the bootstrap admin row's genuine MAC and
    // generation: refused, and it cannot decrypt another tenant's data. The row set no
    // longer matches the anchor, so the whole store fails closed until the row is gone.
    let forged = "tkms_forged_by_a_database_writer";
    let hash = ring::digest::digest(&ring::digest::SHA256, forged.as_bytes());
    keys_db(&dir)
        .execute(
            "INSERT INTO tokens (id, name, hash, role, tenants, operations, created_at, \
             generation, mac) SELECT 'forged', 'forged', ?1, 'admin', '*', '*', created_at, \
             generation, mac FROM tokens WHERE name = 'bootstrap-admin'",
            [hash.as_ref()],
        )
        .unwrap();
    let (mut forged_keys, _, _) = clients(&url, Some(forged)).await;
    assert_data_loss(
        decrypt(&mut forged_keys, "other", "crm.email", &other_ct, b"").await,
        "forged admin token",
    );
    assert_data_loss(
        decrypt(&mut keys, "other", "crm.email", &other_ct, b"").await,
        "any call while a forged row is in the store",
    );
    keys_db(&dir)
        .execute("DELETE FROM tokens WHERE id = 'forged'", [])
        .unwrap();
    let plain = decrypt(&mut keys, "other", "crm.email", &other_ct, b"")
        .await
        .unwrap();
    assert_eq!(plain.plaintext, b"other's secret");

    // A revocation cleared by putting back the row's earlier genuine copy (its own MAC is
    // valid): caught by the anchor, live and at the next start.
    let cols = ["revoked_at", "generation", "mac"];
    let unrevoked = read_cols(&dir, "tokens", &svc_row, &cols);
    let (code, _, stderr) = run_cli(&[
        "token",
        "revoke",
        &svc_id,
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let revoked = encrypt_status(&mut svc_keys).await;
    assert_eq!(revoked.err().unwrap().code(), Code::Unauthenticated);
    let revoked_row = read_cols(&dir, "tokens", &svc_row, &cols);
    write_cols(&dir, "tokens", &svc_row, &cols, &unrevoked);
    assert_data_loss(
        encrypt_status(&mut svc_keys).await,
        "un-revoked token (rollback)",
    );
    drop((keys, tenants, svc_keys, forged_keys));
    assert_restart_refused(server, &dir).await;

    // The genuine (revoked) row back: the server starts, and the token stays revoked.
    write_cols(&dir, "tokens", &svc_row, &cols, &revoked_row);
    let server = BinaryServer::start(&dir, &[]).await;
    let (mut svc_keys, _, _) = clients(&server.url(), Some(&svc)).await;
    assert_eq!(
        encrypt_status(&mut svc_keys).await.err().unwrap().code(),
        Code::Unauthenticated
    );
    drop(svc_keys);
    server.terminate().await;
}

async fn encrypt_status(keys: &mut Keys) -> Result<tenant_kms::pb::EncryptResponse, tonic::Status> {
    keys.encrypt(encrypt_request("acme", "crm.email", b"x", b""))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn tenant_and_key_version_rows_edited_moved_or_rolled_back_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "other").await;
    let v1_ct = encrypt(&mut keys, "acme", "ctx", b"under v1", b"")
        .await
        .ciphertext;
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    disable_key_version(&mut tenants, "acme", 1).await.unwrap();
    encrypt(&mut keys, "acme", "ctx", b"under v2", b"").await;
    let acme = "tenant_id = 'acme'";
    let v1 = "tenant_id = 'acme' AND version = 1";
    let v2 = "tenant_id = 'acme' AND version = 2";

    // A disabled version re-enabled by an edit: nothing decrypts under it.
    write_cols(&dir, "key_versions", v1, &["state"], &[Value::Integer(1)]);
    assert_data_loss(
        decrypt(&mut keys, "acme", "ctx", &v1_ct, b"").await,
        "disabled version re-enabled",
    );
    write_cols(&dir, "key_versions", v1, &["state"], &[Value::Integer(2)]);
    let disabled = decrypt(&mut keys, "acme", "ctx", &v1_ct, b"").await;
    assert_eq!(disabled.err().unwrap().code(), Code::FailedPrecondition);

    // The primary rolled back by an edit, and the nonce-budget count reset by an edit.
    for (table, cond, column, value) in [
        ("tenants", acme, "primary_version", 1),
        ("key_versions", v2, "encryptions", 0),
    ] {
        let genuine = read_cols(&dir, table, cond, &[column]);
        assert_ne!(genuine, [Value::Integer(value)], "{column}");
        write_cols(&dir, table, cond, &[column], &[Value::Integer(value)]);
        assert_data_loss(
            keys.encrypt(encrypt_request("acme", "ctx", b"x", b""))
                .await,
            &format!("{column} set to {value}"),
        );
        write_cols(&dir, table, cond, &[column], &genuine);
        encrypt(&mut keys, "acme", "ctx", b"genuine again", b"").await;
    }

    // Another tenant's whole authenticated row (columns, generation, MAC) moved onto acme.
    let all = [
        "state",
        "primary_version",
        "created_at",
        "rotation_period_seconds",
        "max_encryptions",
        "deletion_time",
        "destroyed_at",
        "generation",
        "mac",
    ];
    let genuine = read_cols(&dir, "tenants", acme, &all);
    let other = read_cols(&dir, "tenants", "tenant_id = 'other'", &all);
    write_cols(&dir, "tenants", acme, &all, &other);
    assert_data_loss(
        keys.encrypt(encrypt_request("acme", "ctx", b"x", b""))
            .await,
        "MAC moved between tenant rows",
    );
    write_cols(&dir, "tenants", acme, &all, &genuine);
    encrypt(&mut keys, "acme", "ctx", b"genuine again", b"").await;

    // Suspended set back to ACTIVE, by an edit and by the row's earlier genuine copy; an
    // earlier primary brought back by an earlier genuine copy.
    let active_v2 = read_cols(&dir, "tenants", acme, &all);
    suspend_tenant(&mut tenants, "acme").await.unwrap();
    let suspended = read_cols(&dir, "tenants", acme, &all);
    write_cols(&dir, "tenants", acme, &["state"], &[Value::Integer(1)]);
    assert_data_loss(
        keys.encrypt(encrypt_request("acme", "ctx", b"x", b""))
            .await,
        "suspended tenant set ACTIVE by an edit",
    );
    write_cols(&dir, "tenants", acme, &all, &active_v2);
    assert_data_loss(
        keys.encrypt(encrypt_request("acme", "ctx", b"x", b""))
            .await,
        "suspended tenant rolled back to its ACTIVE copy",
    );
    write_cols(&dir, "tenants", acme, &all, &suspended);
    let refused = keys
        .encrypt(encrypt_request("acme", "ctx", b"x", b""))
        .await;
    assert_eq!(refused.err().unwrap().code(), Code::FailedPrecondition);
    resume_tenant(&mut tenants, "acme").await.unwrap();
    let primary_2 = read_cols(&dir, "tenants", acme, &all);
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let primary_3 = read_cols(&dir, "tenants", acme, &all);
    write_cols(&dir, "tenants", acme, &all, &primary_2);
    assert_data_loss(
        keys.encrypt(encrypt_request("acme", "ctx", b"x", b""))
            .await,
        "earlier primary brought back (rollback)",
    );

    // Across a restart: refused to start while the rolled-back row is there; the genuine row
    // back, it serves with primary 3.
    drop((keys, tenants));
    assert_restart_refused(server, &dir).await;
    write_cols(&dir, "tenants", acme, &all, &primary_3);
    let server = BinaryServer::start(&dir, &[]).await;
    let (mut keys, _, _) = clients(&server.url(), Some(&admin)).await;
    let sealed = encrypt(&mut keys, "acme", "ctx", b"after restart", b"").await;
    assert_eq!(sealed.key_version, 3);
    // An edit made while stopped is refused at the next start too.
    drop(keys);
    server.terminate().await;
    write_cols(&dir, "key_versions", v1, &["state"], &[Value::Integer(1)]);
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0);
    assert!(stderr.contains("integrity"), "{stderr}");
}

/// The upgrade to row MACs trusts the rows it finds, once: a store whose rows carry no MAC
/// and that asks for the upgrade (what migration 5 leaves in a keys.db from before row MACs;
/// emulated here) is MAC'd at the next start and the audit chain records it; a store
/// rewritten into that form again afterwards is refused, since the chain says it was done.
#[tokio::test]
async fn the_row_mac_upgrade_happens_once_and_is_audited() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    drop(tenants);
    server.terminate().await;
    let pre_upgrade = "UPDATE tenants SET mac = NULL; UPDATE key_versions SET mac = NULL; \
                       UPDATE tokens SET mac = NULL; DELETE FROM row_anchor; \
                       INSERT INTO row_mac_upgrade (id) VALUES (1);";
    keys_db(&dir).execute_batch(pre_upgrade).unwrap();
    let server = BinaryServer::start(&dir, &[]).await;
    let (_, mut tenants, mut audit) = clients(&server.url(), Some(&admin)).await;
    assert_eq!(
        get_tenant(&mut tenants, "acme").await.unwrap().tenant_id,
        "acme"
    );
    let events = audit
        .list_audit_events(tenant_kms::pb::ListAuditEventsRequest {
            operation: "RowMacUpgrade".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(events.events.len(), 1, "the upgrade is audited once");
    drop((tenants, audit));
    server.terminate().await;
    // Rewritten into the pre-upgrade form again, with a widened token: refused at start.
    keys_db(&dir)
        .execute_batch(&format!("UPDATE tokens SET tenants = '*'; {pre_upgrade}"))
        .unwrap();
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0);
    assert!(stderr.contains("upgraded before"), "{stderr}");
}

/// keys.db put back as a whole to an earlier consistent state (every row and the anchor, as
/// a backup restore would): a running server has seen a higher anchor counter and refuses
/// it; a server started afterwards refuses it too, since the audit chain recorded the
/// counter the revocation reached (a `KeyStoreAnchor` record).
#[tokio::test]
async fn a_whole_store_rollback_is_refused_by_a_running_server() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    let (svc, svc_id) = cli_token(&dir, &["--role", "service", "--tenants", "acme"]);
    let (mut svc_keys, _, _) = clients(&server.url(), Some(&svc)).await;
    encrypt_status(&mut svc_keys).await.unwrap();
    let snapshot = temp.path().join("earlier.db");
    let conn = keys_db(&dir);
    conn.execute("ATTACH ?1 AS earlier", [snapshot.to_str().unwrap()])
        .unwrap();
    // The tenant and key-version rows do not change between the copy and the rollback (no
    // call in between reserves or rotates), so the token rows and the anchor are the whole
    // difference: putting them back is putting keys.db back.
    for table in ["tokens", "row_anchor"] {
        conn.execute_batch(&format!(
            "CREATE TABLE earlier.{table} AS SELECT * FROM main.{table}"
        ))
        .unwrap();
    }
    let (code, _, stderr) = run_cli(&[
        "token",
        "revoke",
        &svc_id,
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        encrypt_status(&mut svc_keys).await.err().unwrap().code(),
        Code::Unauthenticated
    );
    let mut restore = String::from("BEGIN;");
    for table in ["tokens", "row_anchor"] {
        restore.push_str(&format!(
            "DELETE FROM main.{table}; INSERT INTO main.{table} SELECT * FROM earlier.{table};"
        ));
    }
    restore.push_str("COMMIT;");
    conn.execute_batch(&restore).unwrap();
    drop(conn);
    assert_data_loss(
        encrypt_status(&mut svc_keys).await,
        "whole-store rollback, live",
    );
    drop((tenants, svc_keys));
    server.terminate().await;
    assert_refused_as_rollback(
        &dir,
        "whole-store rollback under a running server, restarted",
    );
}

/// keys.db with its WAL and shared-memory files: copied as files, with no server running
/// (a stopped server leaves no WAL content behind, but a copy must not depend on that).
const KEY_STORE_FILES: [&str; 3] = ["keys.db", "keys.db-wal", "keys.db-shm"];

/// Copies the key-store files of `from` over those of `to` (a file `from` lacks is removed
/// from `to`).
fn copy_key_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in KEY_STORE_FILES {
        let _ = std::fs::remove_file(to.join(name));
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }
}

/// A start on the data directory as it is is refused as a key-store rollback, with the
/// message saying what to do; so is a command on it (`token list`).
fn assert_refused_as_rollback(dir: &Path, what: &str) {
    let (code, stderr) = serve_refused(dir);
    assert_ne!(code, 0, "{what}");
    assert!(
        stderr.contains("keys.db is older than the audit log"),
        "{what}: {stderr}"
    );
    assert!(
        stderr.contains("tenant-kms restore --from"),
        "{what}: the message says what to do: {stderr}"
    );
    let (code, _, stderr) = run_cli(&["token", "list", "--data-dir", dir.to_str().unwrap()]);
    assert_ne!(code, 0, "{what}: token list");
    assert!(
        stderr.contains("keys.db is older than the audit log"),
        "{what}: token list: {stderr}"
    );
}

/// Puts `earlier` back as keys.db (the server stopped), asserts the start is refused, then
/// puts the current store back.
fn assert_put_back_refused(dir: &Path, earlier: &Path, what: &str) {
    let current = dir.with_extension("current-key-store");
    copy_key_store(dir, &current);
    copy_key_store(earlier, dir);
    assert_refused_as_rollback(dir, what);
    copy_key_store(&current, dir);
}

/// The gap rowmac left: the whole keys.db (rows and anchor together) put back to an earlier
/// consistent copy while no server runs. The audit chain now records the key store's anchor
/// counter after every change, so each start (and each command) on the earlier copy is
/// refused: a revoked token, a suspended tenant and a nonce-budget reservation cannot be
/// undone this way. The current store put back, the directory serves as before.
#[tokio::test]
async fn a_whole_key_store_put_back_while_stopped_is_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let earlier = temp.path().join("earlier");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    let (svc, svc_id) = cli_token(&dir, &["--role", "service", "--tenants", "acme"]);
    let (mut svc_keys, _, _) = clients(&server.url(), Some(&svc)).await;
    encrypt_status(&mut svc_keys).await.unwrap();
    drop((tenants, svc_keys));
    server.terminate().await;

    // A token revoked (by the command, no server running) after the copy.
    copy_key_store(&dir, &earlier);
    let (code, _, stderr) = run_cli(&[
        "token",
        "revoke",
        &svc_id,
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_put_back_refused(&dir, &earlier, "token revoked after the copy");

    // A tenant suspended after the copy.
    copy_key_store(&dir, &earlier);
    let server = BinaryServer::start(&dir, &[]).await;
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    suspend_tenant(&mut tenants, "acme").await.unwrap();
    drop((keys, tenants));
    server.terminate().await;
    assert_put_back_refused(&dir, &earlier, "tenant suspended after the copy");

    // Encryptions reserved (the nonce-budget count) after the copy: a new process reserves
    // a new chunk at its first encryption.
    let server = BinaryServer::start(&dir, &[]).await;
    (keys, tenants, _) = clients(&server.url(), Some(&admin)).await;
    resume_tenant(&mut tenants, "acme").await.unwrap();
    drop((keys, tenants));
    server.terminate().await;
    copy_key_store(&dir, &earlier);
    let reserved =
        |dir: &Path| read_cols(dir, "key_versions", "tenant_id = 'acme'", &["encryptions"]);
    let before = reserved(&dir);
    let server = BinaryServer::start(&dir, &[]).await;
    (keys, _, _) = clients(&server.url(), Some(&admin)).await;
    encrypt(&mut keys, "acme", "ctx", b"reserves", b"").await;
    drop(keys);
    server.terminate().await;
    assert_ne!(
        reserved(&dir),
        before,
        "the encryption reserved a new chunk"
    );
    assert_put_back_refused(&dir, &earlier, "encryptions reserved after the copy");

    // The current store back: it serves, the revocation holds.
    let server = BinaryServer::start(&dir, &[]).await;
    let (mut svc_keys, _, _) = clients(&server.url(), Some(&svc)).await;
    assert_eq!(
        encrypt_status(&mut svc_keys).await.err().unwrap().code(),
        Code::Unauthenticated
    );
    drop(svc_keys);
    server.terminate().await;
}

/// Operations (and, in order, the sequence numbers) of every record in audit.db.
fn audit_operations(dir: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT operation FROM audit_events ORDER BY seq")
        .unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A legitimate restore of a backup pair is not a rollback: `restore` names the restored
/// key store's anchor counter in its Restore record, the server starts on it, and from then
/// on a rollback within the restored line is refused again.
#[tokio::test]
async fn a_restored_backup_pair_starts_and_anchors_its_key_store() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let backup = temp.path().join("backup");
    let earlier = temp.path().join("earlier");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    create_tenant(&mut tenants, "acme").await;
    let (svc, svc_id) = cli_token(&dir, &["--role", "service", "--tenants", "acme"]);
    let data = dir.to_str().unwrap();
    let (code, _, stderr) = run_cli(&[
        "backup",
        "--out",
        backup.to_str().unwrap(),
        "--data-dir",
        data,
    ]);
    assert_eq!(code, 0, "{stderr}");
    // Changes after the backup: the chain's anchor is now above the backup's keys.db.
    let (code, _, stderr) = run_cli(&["token", "revoke", &svc_id, "--data-dir", data]);
    assert_eq!(code, 0, "{stderr}");
    create_tenant(&mut tenants, "later").await;
    drop(tenants);
    server.terminate().await;

    let (code, _, stderr) = run_cli(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--force",
        "--data-dir",
        data,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let detail: String = rusqlite::Connection::open(dir.join("audit.db"))
        .unwrap()
        .query_row(
            "SELECT detail FROM audit_events WHERE operation = 'Restore' ORDER BY seq DESC",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(
        detail.contains("; key-store row-anchor write counter "),
        "the Restore record names the restored counter: {detail}"
    );
    let server = BinaryServer::start(&dir, &[]).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    assert_eq!(
        get_tenant(&mut tenants, "later")
            .await
            .err()
            .unwrap()
            .code(),
        Code::NotFound,
        "the backup's state is served"
    );
    let (mut svc_keys, _, _) = clients(&server.url(), Some(&svc)).await;
    encrypt_status(&mut svc_keys).await.unwrap();
    drop((tenants, svc_keys));
    server.terminate().await;

    // Within the restored line, a rollback is refused again.
    copy_key_store(&dir, &earlier);
    let (code, _, stderr) = run_cli(&["token", "revoke", &svc_id, "--data-dir", data]);
    assert_eq!(code, 0, "{stderr}");
    assert_put_back_refused(
        &dir,
        &earlier,
        "token revoked after the restore, then put back",
    );
}

/// A kill -9 between a key-store commit and its audit record leaves the store ahead of the
/// chain's anchor: the next start is not refused; reconciliation records the change and the
/// start anchors the store's counter, so a rollback past it is refused afterwards.
#[tokio::test]
async fn a_crash_between_a_key_store_commit_and_its_audit_record_still_starts() {
    use std::os::unix::process::ExitStatusExt;
    use tenant_kms::store::{FAILPOINT_AFTER_KEY_COMMIT, TEST_FAILPOINT_ENV};

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let earlier = temp.path().join("earlier");
    let server = BinaryServer::start(&dir, &[]).await;
    let admin = server.admin_token();
    server.terminate().await;
    copy_key_store(&dir, &earlier);
    let server = BinaryServer::start_with_env(
        &dir,
        &[],
        &[(TEST_FAILPOINT_ENV, FAILPOINT_AFTER_KEY_COMMIT)],
    )
    .await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    assert!(try_create_tenant(&mut tenants, "orphan").await.is_err());
    drop(tenants);
    let exit = server.kill9_status();
    assert_eq!(
        exit.signal(),
        Some(6),
        "the failpoint did not fire: {exit:?}"
    );

    let server = BinaryServer::start(&dir, &[]).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    assert_eq!(
        get_tenant(&mut tenants, "orphan").await.unwrap().tenant_id,
        "orphan"
    );
    drop(tenants);
    server.terminate().await;
    let operations = audit_operations(&dir);
    let reconciled = operations
        .iter()
        .position(|op| op == "ReconciledTenantCreate")
        .unwrap();
    assert!(
        operations[reconciled..]
            .iter()
            .any(|op| op == "KeyStoreAnchor"),
        "{operations:?}"
    );
    assert_put_back_refused(&dir, &earlier, "the crashed creation put back out");
}
