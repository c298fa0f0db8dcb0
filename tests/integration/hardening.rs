//! Issue 13, operator mistakes and absurd input: a restore under a live server, a destroyed
//! tenant's id after restoring an older backup, a lost keys.db or audit.db, a data directory
//! others may write, and durations no service should accept. Each test goes through the real
//! binary or a real server, and each failed before the fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tenant_kms::domain::TenantState;
use tenant_kms::pb;
use tonic::Code;

/// `restore --force` of `backup` into `data`: its exit code, stdout and stderr.
fn restore_forced(backup: &Path, data: &Path) -> (i32, String, String) {
    run_cli(&[
        "restore",
        "--from",
        s(backup),
        "--force",
        "--data-dir",
        s(data),
    ])
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Removes a SQLite database and its WAL and shared-memory files.
fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Moves a SQLite database and its WAL files to `to` (a directory).
fn move_db(path: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let name = from.file_name().unwrap().to_owned();
            std::fs::rename(&from, to.join(name)).unwrap();
        }
    }
}

async fn schedule_deletion(
    tenants: &mut Tenants,
    id: &str,
    waiting: u64,
) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest {
            tenant_id: id.into(),
            waiting_period_seconds: Some(waiting),
        })
        .await
        .map(|r| r.into_inner())
}

async fn try_encrypt(keys: &mut Keys, id: &str) -> Result<pb::EncryptResponse, tonic::Status> {
    keys.encrypt(pb::EncryptRequest {
        tenant_id: id.into(),
        context: "ctx".into(),
        plaintext: b"value".to_vec(),
        aad: Vec::new(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

// ---------------------------------------------------------------------------------------
// Item 2: restore --force while a server serves the data directory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_a_second_serve_are_refused_while_a_server_holds_the_directory() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let backup = temp.path().join("backup");
    let server = BinaryServer::start(&data, &[]).await;
    let pid = server.child.id();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    create_tenant(&mut tenants, "before").await;
    let (code, _, err) = run_cli(&["backup", "--out", s(&backup), "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{err}");
    create_tenant(&mut tenants, "after").await;
    let ct = encrypt(&mut keys, "after", "ctx", b"kept", b"")
        .await
        .ciphertext;

    // The restore is refused, naming the server's pid, and changes nothing.
    let before = names(&data);
    let (code, _, err) = restore_forced(&backup, &data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("in use by process {pid} (serve)")),
        "{err}"
    );
    assert_eq!(names(&data), before, "nothing moved aside");
    // So is starting a new audit log under it.
    let (code, _, err) = run_cli(&["audit", "recover", "--new-log", "--data-dir", s(&data)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("in use by process {pid} (serve)")),
        "{err}"
    );
    assert_eq!(names(&data), before, "nothing moved aside");
    // A second server on the same directory is refused the same way.
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("in use by process {pid} (serve)")),
        "{err}"
    );
    // The first server still serves what it acknowledged.
    assert_eq!(
        decrypt(&mut keys, "after", "ctx", &ct, b"")
            .await
            .unwrap()
            .plaintext,
        b"kept"
    );
    drop((keys, tenants));
    server.terminate().await;

    // Stopped: the restore goes through, and a server starts on the restored data.
    let (code, out, err) = restore_forced(&backup, &data);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("restored backup"), "{out}");
    let server = BinaryServer::start(&data, &[]).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    let get = |id: &str| pb::GetTenantRequest {
        tenant_id: id.into(),
    };
    assert!(tenants.get_tenant(get("before")).await.is_ok());
    assert_eq!(
        tenants.get_tenant(get("after")).await.status_err().code(),
        Code::NotFound
    );
    drop(tenants);
    server.terminate().await;
}

// ---------------------------------------------------------------------------------------
// Item 3: a destroyed tenant's id after restoring an older backup

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_destroyed_after_a_backup_stays_destroyed_after_restoring_it() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let backup = temp.path().join("backup");
    let server = TestServer::start_with(test_options(&data)).await;
    let (_, mut tenants, _) = server.clients().await;
    // "alive" is in the backup and destroyed after it; "absent" is created and destroyed
    // after it, so the backup does not know it at all.
    create_tenant(&mut tenants, "alive").await;
    let (code, _, err) = run_cli(&["backup", "--out", s(&backup), "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{err}");
    create_tenant(&mut tenants, "absent").await;
    for id in ["alive", "absent"] {
        let t = schedule_deletion(&mut tenants, id, 0).await.unwrap();
        assert_eq!(t.state, pb::TenantState::Destroyed as i32);
    }
    drop(tenants);
    server.stop().await;

    let (code, _, err) = restore_forced(&backup, &data);
    assert_eq!(code, 0, "{err}");
    for restart in 0..2 {
        let server = TestServer::start_with(test_options(&data)).await;
        let (mut keys, mut tenants, _) = server.clients().await;
        for id in ["alive", "absent"] {
            let err = tenants
                .create_tenant(pb::CreateTenantRequest {
                    tenant_id: id.into(),
                })
                .await
                .status_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{id} ({restart})");
            assert_eq!(err.message(), "tenant destroyed", "{id} ({restart})");
            let err = try_encrypt(&mut keys, id).await.status_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{id} ({restart})");
            let t = tenants
                .get_tenant(pb::GetTenantRequest {
                    tenant_id: id.into(),
                })
                .await
                .status_err();
            assert_eq!(t.code(), Code::FailedPrecondition, "{id} ({restart})");
        }
        drop((keys, tenants));
        server.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// Item 4: a missing keys.db or a missing, re-created or swapped audit.db

/// A data directory that served (a tenant, an encryption), stopped; with its admin token.
async fn served_directory(root: &Path, name: &str) -> (PathBuf, String) {
    let data = root.join(name);
    let server = BinaryServer::start(&data, &[]).await;
    let token = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    drop((keys, tenants));
    server.terminate().await;
    (data, token)
}

/// Starts the binary on `data`, expects it to serve with `token`, and stops it.
async fn serves_with(data: &Path, token: &str) {
    let server = BinaryServer::start(data, &[]).await;
    let (mut keys, _, _) = clients(&server.url(), Some(token)).await;
    encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    drop(keys);
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_keys_db_is_not_taken_for_a_first_start() {
    let temp = tempfile::tempdir().unwrap();
    let (data, token) = served_directory(temp.path(), "data").await;
    let aside = temp.path().join("aside");
    move_db(&data.join("keys.db"), &aside);
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("keys.db is missing") && err.contains("docs/OPERATIONS.md"),
        "{err}"
    );
    assert!(
        err.contains("audit.db") && err.contains("admin.token"),
        "{err}"
    );
    assert!(!data.join("keys.db").exists(), "no empty key store created");
    let kept = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(kept.trim(), token, "admin.token untouched");
    // Put back, it serves as before.
    move_db(&aside.join("keys.db"), &data);
    serves_with(&data, &token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_re_created_audit_db_is_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let (data, token) = served_directory(temp.path(), "data").await;
    let aside = temp.path().join("aside");
    move_db(&data.join("audit.db"), &aside);
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("audit.db is missing") && err.contains("docs/OPERATIONS.md"),
        "{err}"
    );
    assert!(!data.join("audit.db").exists(), "not re-created");
    // Re-created as an empty file: refused as well.
    std::fs::write(data.join("audit.db"), b"").unwrap();
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("holds no audit log of this data directory"),
        "{err}"
    );
    let kept = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(kept.trim(), token, "admin.token untouched");
    remove_db(&data.join("audit.db"));
    move_db(&aside.join("audit.db"), &data);
    serves_with(&data, &token).await;
    let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{out}{err}");

    // Lost for good: the operator begins a new log deliberately; it says so in its first
    // record, the old file (here: a re-created empty one) is kept, and the service starts.
    remove_db(&data.join("audit.db"));
    std::fs::write(data.join("audit.db"), b"").unwrap();
    let (code, out, err) = run_cli(&["audit", "recover", "--new-log", "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("NEW LOG") && out.contains("audit-replaced-"),
        "{out}"
    );
    serves_with(&data, &token).await;
    let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_cli(&["audit", "export", "--data-dir", s(&data)]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    assert!(first.contains("\"operation\":\"AuditNewLog\""), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_directorys_audit_db_is_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let (data, token) = served_directory(temp.path(), "data").await;
    let (other, _) = served_directory(temp.path(), "other").await;
    let aside = temp.path().join("aside");
    move_db(&data.join("audit.db"), &aside);
    for suffix in ["", "-wal", "-shm"] {
        let from = other.join(format!("audit.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, data.join(format!("audit.db{suffix}"))).unwrap();
        }
    }
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is not this data directory's audit log"),
        "{err}"
    );
    let kept = std::fs::read_to_string(data.join("admin.token")).unwrap();
    assert_eq!(kept.trim(), token, "admin.token untouched");
    remove_db(&data.join("audit.db"));
    move_db(&aside.join("audit.db"), &data);
    serves_with(&data, &token).await;
}

// ---------------------------------------------------------------------------------------
// Half-held: a data directory others may write

#[test]
fn a_data_directory_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = serve_refused(&data);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has mode 777") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(names(&data).is_empty(), "nothing created in it");
    let (code, _, err) = run_cli(&["rotate", "--due", "--data-dir", s(&data)]);
    assert_ne!(code, 0);
    assert!(err.contains("has mode 777"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Item 6: absurd durations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_are_refused_and_stored_ones_never_panic() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = BinaryServer::start(&data, &[]).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    create_tenant(&mut tenants, "acme").await;
    for waiting in [100_000_000_000 * 86_400, 1 << 63, u64::MAX, 3651 * 86_400] {
        let err = schedule_deletion(&mut tenants, "acme", waiting)
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{waiting}");
        assert!(err.message().contains("waiting_period_seconds"), "{err:?}");
    }
    for period in [u64::MAX, 1 << 63, 3651 * 86_400] {
        let err = tenants
            .set_rotation_policy(pb::SetRotationPolicyRequest {
                tenant_id: "acme".into(),
                rotation_period_seconds: period,
                max_encryptions: 0,
            })
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{period}");
        assert!(err.message().contains("rotation_period_seconds"), "{err:?}");
    }
    let t = tenants
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, pb::TenantState::Active as i32, "nothing stored");
    // The bound itself is accepted.
    let t = schedule_deletion(&mut tenants, "acme", 3650 * 86_400)
        .await
        .unwrap();
    assert_eq!(t.state, pb::TenantState::PendingDeletion as i32);

    // Through the binary: refused with a clear message, no panic (checked by the CLI).
    let token_file = data.join("admin.token");
    let client = ["--addr", &server.url(), "--token-file", s(&token_file)];
    let mut args = vec!["tenant", "delete", "acme", "--window", "100000000000d"];
    args.extend(client);
    let (code, _, err) = run_cli(&args);
    assert_eq!(code, 2, "a bad --window is a usage error: {err}");
    assert!(err.contains("at most"), "{err}");

    // Values an older version stored read back without a panic: the timestamps saturate at
    // the end of year 9999. (A writer of keys.db can no longer put them there: its edit
    // fails the row's MAC, tests/integration/tamper.rs. An older version's keys.db has no row MACs and
    // is MAC'd as it stands when upgraded, which is emulated here across a restart.)
    drop(tenants);
    server.terminate().await;
    {
        let conn = rusqlite::Connection::open(data.join("keys.db")).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute(
            "UPDATE tenants SET deletion_time = ?1, rotation_period_seconds = ?1 \
             WHERE tenant_id = 'acme' AND state = ?2",
            rusqlite::params![i64::MAX, TenantState::PendingDeletion.code()],
        )
        .unwrap();
        conn.execute_batch(
            "UPDATE tenants SET mac = NULL; UPDATE key_versions SET mac = NULL; \
             UPDATE tokens SET mac = NULL; DELETE FROM row_anchor; \
             INSERT INTO row_mac_upgrade (id) VALUES (1);",
        )
        .unwrap();
    }
    let server = BinaryServer::start(&data, &[]).await;
    let client = ["--addr", &server.url(), "--token-file", s(&token_file)];
    for verb in [
        vec!["tenant", "get", "acme"],
        vec!["tenant", "list"],
        vec!["tenant", "cancel-delete", "acme"],
    ] {
        let mut args = verb.clone();
        args.extend(client);
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, 0, "{verb:?}: {err}");
        if verb[1] != "cancel-delete" {
            assert!(out.contains("9999-12-31T23:59:59Z"), "{verb:?}: {out}");
        }
    }
    server.terminate().await;
}

#[test]
fn absurd_configuration_values_are_refused_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let config = temp.path().join("kms.toml");
    for (setting, name) in [
        (
            "default_deletion_window = \"100000000000d\"",
            "100000000000d",
        ),
        ("min_deletion_window = \"3651d\"", "3651d"),
        ("request_timeout = \"3651d\"", "3651d"),
        ("request_body_timeout = \"3651d\"", "3651d"),
        (
            "default_max_encryptions = 18446744073709551615",
            "default_max_encryptions",
        ),
        (
            "max_concurrent_requests = 18446744073709551615",
            "max_concurrent_requests",
        ),
        (
            "max_message_bytes = 18446744073709551615",
            "max_message_bytes",
        ),
        ("response_send_timeout = \"3651d\"", "3651d"),
        ("handshake_timeout = \"3651d\"", "3651d"),
        ("refusal_audit_window = \"3651d\"", "3651d"),
        (
            "max_requests_awaiting_body = 18446744073709551615",
            "max_requests_awaiting_body",
        ),
        (
            "max_unestablished_connections = 18446744073709551615",
            "max_unestablished_connections",
        ),
    ] {
        std::fs::write(&config, format!("{setting}\n")).unwrap();
        let (code, err) = serve_refused_with(&data, &["--config", s(&config)]);
        assert_eq!(code, 1, "{setting}: {err}");
        assert!(
            err.contains(name) && err.contains("most"),
            "{setting}: {err}"
        );
        assert!(!data.exists(), "{setting}: nothing created");
    }
}

// ---------------------------------------------------------------------------------------
// Half-held: status codes of malformed request bodies

/// Sends `body` as an Encrypt request over a bare HTTP/2 client (so nothing frames it for us)
/// and returns the gRPC status code and message, from the headers (trailers-only) or the
/// trailers.
async fn raw_encrypt_body(
    addr: std::net::SocketAddr,
    token: &str,
    body: Vec<u8>,
) -> (String, String) {
    use http_body_util::{BodyExt, Full};
    use prost::bytes::Bytes;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/tenantkms.v1.KeyService/Encrypt"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"));
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let trailers = body.collect().await.unwrap().trailers().cloned();
    let headers = match parts.headers.get("grpc-status") {
        Some(_) => parts.headers,
        None => trailers.expect("a grpc-status in headers or trailers"),
    };
    let status = tonic::Status::from_header_map(&headers).unwrap();
    (
        headers["grpc-status"].to_str().unwrap().to_owned(),
        status.message().to_owned(),
    )
}

/// A gRPC frame: flag, big-endian length, message.
fn frame(flag: u8, length: u32, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_bodies_are_invalid_argument() {
    let server = TestServer::start().await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let message = prost::Message::encode_to_vec(&pb::EncryptRequest {
        tenant_id: "acme".into(),
        context: "ctx".into(),
        plaintext: b"value".to_vec(),
        aad: Vec::new(),
        ..Default::default()
    });
    let len = u32::try_from(message.len()).unwrap();
    let token = server.admin_token.clone();
    // The client itself is sound: a well-formed frame is answered OK.
    let (code, msg) = raw_encrypt_body(server.addr, &token, frame(0, len, &message)).await;
    assert_eq!(code, "0", "{msg}");

    let invalid = (Code::InvalidArgument as i32).to_string();
    for (what, body) in [
        ("empty body", Vec::new()),
        ("cut inside the prefix", vec![0, 0, 0]),
        ("cut inside the message", frame(0, len, &message[..4])),
        ("length prefix too long", frame(0, len + 7, &message)),
        ("length prefix too short", frame(0, len - 3, &message)),
        ("compression flag 2", frame(2, len, &message)),
    ] {
        let (code, msg) = raw_encrypt_body(server.addr, &token, body).await;
        assert_eq!(code, invalid, "{what}: {msg}");
    }
    // A compressed flag without grpc-encoding stays INTERNAL, as the gRPC compression spec
    // requires (documented in SECURITY.md).
    let (code, msg) = raw_encrypt_body(server.addr, &token, frame(1, len, &message)).await;
    assert_eq!(code, (Code::Internal as i32).to_string(), "{msg}");
    assert!(msg.contains("compressed-flag"), "{msg}");
    server.stop().await;
}
