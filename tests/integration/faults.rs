//! Issue 13, crashes and environment faults through the real binary: a kill -9 in the middle
//! of a destruction, and a key store whose disk is full. Each test drives a `test-seams`
//! knob of the binary cargo builds for these tests (a failpoint that aborts the process like
//! kill -9, a size cap on keys.db); a production build ignores both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::*;
use tenant_kms::store::{
    FAILPOINT_AFTER_KEY_COMMIT, FAILPOINT_BEFORE_SHRED_SEQUENCE, TEST_FAILPOINT_ENV,
    TEST_MAX_PAGES_ENV,
};
use tonic::Code;

/// Every wrapped key of a tenant, read straight from keys.db.
fn wrapped_keys(dir: &Path, tenant: &str) -> Vec<Vec<u8>> {
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT wrapped_key FROM wrapped_keys WHERE tenant_id = ?1")
        .unwrap();
    stmt.query_map([tenant], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The files of the data directory holding the whole wrapped key or its sealed middle.
fn holding(dir: &Path, wrapped: &[Vec<u8>]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    for bytes in wrapped {
        for part in [&bytes[..], &bytes[12..44]] {
            hits.extend(files_containing(dir, part));
        }
    }
    hits
}

/// A kill -9 after a destruction's commit and before its WAL checkpoint left the destroyed
/// key's bytes in keys.db-wal (and in keys.db's old pages) until a graceful stop. The next
/// open now finishes the shred sequence, so after the restart no file holds them.
#[tokio::test]
async fn a_destruction_cut_by_a_crash_is_finished_when_the_store_opens() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start_with_env(
        &dir,
        &[],
        &[(TEST_FAILPOINT_ENV, FAILPOINT_BEFORE_SHRED_SEQUENCE)],
    )
    .await;
    let token = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "doomed").await;
    create_tenant(&mut tenants, "keeper").await;
    let ct = encrypt(&mut keys, "keeper", "ctx", b"kept", b"").await;
    rotate_tenant(&mut tenants, "doomed").await.unwrap();
    let doomed = wrapped_keys(&dir, "doomed");
    assert_eq!(doomed.len(), 2);
    // The scan is not vacuous: the bytes are found while the tenant lives.
    assert!(!holding(&dir, &doomed).is_empty());

    // The process dies between the destruction's commit and its shred sequence.
    let cut = schedule_deletion(&mut tenants, "doomed", Some(0)).await;
    assert!(cut.is_err(), "the failpoint did not fire");
    // SIGABRT (6) from the failpoint, not this test's SIGKILL (9).
    let exit = server.kill9_status();
    assert_eq!(
        exit.signal(),
        Some(6),
        "the failpoint did not end the server: {exit:?}"
    );

    // Restart (no failpoint): the open finishes the shred before serving.
    let server = BinaryServer::start(&dir, &[]).await;
    assert_eq!(
        holding(&dir, &doomed),
        Vec::<std::path::PathBuf>::new(),
        "a destroyed key's bytes survive a crash and a restart"
    );
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    let gone = get_tenant(&mut tenants, "doomed").await.unwrap_err();
    assert_eq!(gone.message(), "tenant destroyed", "{gone:?}");
    // The other tenant's key is untouched.
    let back = decrypt(&mut keys, "keeper", "ctx", &ct.ciphertext, b"")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"kept");
    server.terminate().await;
}

/// A key-store write that fails because the disk is full was answered INTERNAL ("the service
/// is broken"); it is UNAVAILABLE now (retry later), audited as such, and the store serves
/// again once there is room.
#[tokio::test]
async fn a_full_key_store_answers_unavailable_and_recovers() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    // A cap of a few pages above what a fresh store needs.
    let server = BinaryServer::start_with_env(&dir, &[], &[(TEST_MAX_PAGES_ENV, "40")]).await;
    let token = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    let mut refused = None;
    for i in 0..5000 {
        match try_create_tenant(&mut tenants, &format!("tenant-with-a-long-name-{i:05}")).await {
            Ok(_) => {}
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the capped store never filled");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("storage full"), "{status:?}");
    assert!(!status.message().contains("keys.db"), "{status:?}");
    server.terminate().await;

    // The refusal is audited as unavailable.
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    let audited: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM audit_events WHERE operation = 'CreateTenant' \
             AND outcome = 'unavailable'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(audited, 1);
    drop(conn);

    // Room again (no cap): the same call succeeds.
    let server = BinaryServer::start(&dir, &[]).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    try_create_tenant(&mut tenants, "after-the-disk-was-freed")
        .await
        .unwrap();
    server.terminate().await;
}

/// A kill -9 between a tenant's commit in the key store and its audit record's left a tenant
/// that no audit record showed, while `audit verify` passed. The server now reconciles at
/// start: the tenant gets a `ReconciledTenantCreate` record, and the chain verifies.
#[tokio::test]
async fn a_key_change_cut_from_its_audit_record_by_a_crash_is_recorded_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start_with_env(
        &dir,
        &[],
        &[(TEST_FAILPOINT_ENV, FAILPOINT_AFTER_KEY_COMMIT)],
    )
    .await;
    let token = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    let cut = try_create_tenant(&mut tenants, "orphan").await;
    assert!(cut.is_err(), "the failpoint did not fire");
    let exit = server.kill9_status();
    assert_eq!(
        exit.signal(),
        Some(6),
        "the failpoint did not end the server: {exit:?}"
    );
    // The tenant is in the key store, and no record names it.
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    let stored: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM tenants WHERE tenant_id = 'orphan'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1);
    drop(conn);
    assert!(audit_rows(&dir, "orphan").is_empty());

    let server = BinaryServer::start(&dir, &[]).await;
    assert_eq!(
        audit_rows(&dir, "orphan"),
        vec![(
            "ReconciledTenantCreate".to_owned(),
            "ok".to_owned(),
            "system:reconcile".to_owned()
        )]
    );
    // A tenant created normally afterwards is not reconciled again at the next start.
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "normal").await;
    rotate_tenant(&mut tenants, "normal").await.unwrap();
    server.terminate().await;
    let server = BinaryServer::start(&dir, &[]).await;
    server.terminate().await;
    assert_eq!(audit_rows(&dir, "orphan").len(), 1);
    let normal: Vec<String> = audit_rows(&dir, "normal")
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(normal, vec!["CreateTenant", "RotateTenantKey"]);
    let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out} {err}");
}

/// The (operation, outcome, caller) of every audit record naming `tenant`, in order.
fn audit_rows(dir: &Path, tenant: &str) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT operation, outcome, caller FROM audit_events WHERE tenant_id = ?1 \
             ORDER BY seq",
        )
        .unwrap();
    stmt.query_map([tenant], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// An EncryptBatch whose answer would exceed the message limit was sealed, audited `ok` and
/// spent its nonces, then failed to encode (the caller got nothing). It is refused before
/// any work now: RESOURCE_EXHAUSTED saying to split the batch, audited as exhausted, and no
/// encryption counted against the key.
#[tokio::test]
async fn a_batch_whose_answer_would_be_too_large_is_refused_before_any_work() {
    let server = TestServer::start_configured(|o| o.limits.max_message_bytes = 64 * 1024).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    // `count` items of 40 bytes each.
    let request = |count: usize| tenant_kms::pb::EncryptBatchRequest {
        tenant_id: "acme".into(),
        items: (0..count)
            .map(|i| tenant_kms::pb::EncryptBatchItem {
                context: "c".into(),
                plaintext: format!("{i:040}").into_bytes(),
                aad: Vec::new(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    // About 45 KiB of request; the ciphertexts would make about 80 KiB of answer.
    let status = keys.encrypt_batch(request(1000)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("split the batch"), "{status:?}");
    let versions = key_versions(&mut tenants, "acme").await;
    assert_eq!(
        versions[0].encryptions, 0,
        "nonces were spent on a refused batch"
    );
    let rows = audit_rows(&server.data_dir, "acme");
    let batch: Vec<&(String, String, String)> =
        rows.iter().filter(|r| r.0 == "EncryptBatch").collect();
    assert_eq!(batch.len(), 1, "{rows:?}");
    assert_eq!(batch[0].1, "exhausted", "{rows:?}");

    // A batch that fits still works.
    let ok = keys.encrypt_batch(request(100)).await.unwrap().into_inner();
    assert_eq!(ok.results.len(), 100);
    server.stop().await;
}
