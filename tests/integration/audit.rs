//! The audit store (issue 4) end to end: tamper detection by `audit verify` and the
//! VerifyAuditChain RPC, fail-closed writes and recovery without a restart, acknowledged calls
//! surviving SIGKILL under load, no secret in the audit files, queries, export, retention and
//! appends from another process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use common::*;
use rusqlite::Connection;
use tenant_kms::pb;
use tonic::Code;

// ---------------------------------------------------------------------------------------
// Helpers

/// A plain SQL connection to a data directory's `audit.db`, as an intruder would open it.
fn audit_db(dir: &Path) -> Connection {
    let conn = Connection::open(dir.join("audit.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

/// `tenant-kms audit verify` on `dir`: (exit code, stdout).
fn cli_verify(dir: &Path) -> (i32, String) {
    let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    assert!(code == 0 || code == 1, "verify failed to run: {err}");
    (code, out)
}

/// Asserts that the CLI names `seq` as the first bad record, with a non-zero exit.
fn assert_cli_names(dir: &Path, seq: u64, why: &str) {
    let (code, out) = cli_verify(dir);
    assert_eq!(code, 1, "{why}: {out}");
    assert!(
        out.starts_with(&format!("FAILED: first bad record {seq}:")),
        "{why}: expected record {seq} to be named: {out}"
    );
}

async fn rpc_verify(audit: &mut Audit) -> pb::VerifyAuditChainResponse {
    audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A running server with tenant `acme` and eight encryptions: records 1 (CreateTenant) to 11
/// (the creation and the first encryption's nonce reservation each change the key store, so
/// each is followed by a `KeyStoreAnchor` record: records 2 and 4).
async fn server_with_records() -> (TestServer, Keys, Audit) {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    for i in 0..8 {
        encrypt(&mut keys, "acme", "ctx", format!("v{i}").as_bytes(), b"").await;
    }
    assert_eq!(server.audit_count(), 11);
    (server, keys, audit)
}

/// The request id a reply carried.
fn request_id<T>(response: &tonic::Response<T>) -> String {
    response
        .metadata()
        .get("x-request-id")
        .expect("every reply names its request id")
        .to_str()
        .unwrap()
        .to_owned()
}

fn rfc3339_micros(micros: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_micros(micros as u64);
    humantime::format_rfc3339_micros(time).to_string()
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// (seq, tenant, operation, time) of one record.
type Row = (u64, String, String, i64);

/// (seq, tenant, operation, time) of every record, straight from the database.
fn rows(dir: &Path) -> Vec<Row> {
    let conn = audit_db(dir);
    let mut stmt = conn
        .prepare("SELECT seq, tenant_id, operation, time_us FROM audit_events ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every page of a listing, following next_page_token (bounded).
async fn list_all(
    audit: &mut Audit,
    mut request: pb::ListAuditEventsRequest,
) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    for _ in 0..1000 {
        let page = audit
            .list_audit_events(request.clone())
            .await
            .unwrap()
            .into_inner();
        if request.page_size > 0 {
            assert!(page.events.len() <= request.page_size as usize);
            if !page.next_page_token.is_empty() {
                assert_eq!(page.events.len(), request.page_size as usize);
            }
        }
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        request.page_token = page.next_page_token;
    }
    panic!("paging did not end");
}

// ---------------------------------------------------------------------------------------
// Tamper evidence: plain SQL edits, `audit verify` names the first bad record, the RPC agrees

#[tokio::test]
async fn an_untouched_log_verifies() {
    let (server, _keys, mut audit) = server_with_records().await;
    let (code, out) = cli_verify(&server.data_dir);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("OK: 11 records verified (head 11, anchor 11:"),
        "{out}"
    );
    let report = rpc_verify(&mut audit).await;
    assert!(report.ok);
    assert_eq!((report.records_checked, report.first_bad_seq), (11, 0));
}

/// Applies `sql` to a running server's log, then checks that the CLI and the RPC both name
/// `bad` as the first bad record.
async fn tamper_and_check(sql: &str, bad: u64) -> (TestServer, Keys, Audit) {
    let (server, keys, mut audit) = server_with_records().await;
    audit_db(&server.data_dir).execute_batch(sql).unwrap();
    assert_cli_names(&server.data_dir, bad, sql);
    let report = rpc_verify(&mut audit).await;
    assert!(!report.ok, "{sql}");
    assert_eq!(report.first_bad_seq, bad, "{sql}");
    // Still named after the RPC's own record (and any evidence record) was appended.
    assert_cli_names(&server.data_dir, bad, sql);
    (server, keys, audit)
}

#[tokio::test]
async fn an_edited_record_is_named() {
    tamper_and_check(
        "UPDATE audit_events SET tenant_id = 'other' WHERE seq = 5",
        5,
    )
    .await;
    tamper_and_check(
        "UPDATE audit_events SET outcome = 'denied' WHERE seq = 7",
        7,
    )
    .await;
    tamper_and_check(
        "UPDATE audit_events SET time_us = time_us + 1 WHERE seq = 1",
        1,
    )
    .await;
    // A MAC copied from another record does not help.
    tamper_and_check(
        "UPDATE audit_events SET mac = (SELECT mac FROM audit_events WHERE seq = 3) \
         WHERE seq = 4",
        4,
    )
    .await;
}

#[tokio::test]
async fn a_deleted_record_is_named() {
    tamper_and_check("DELETE FROM audit_events WHERE seq = 6", 6).await;
    tamper_and_check("DELETE FROM audit_events WHERE seq = 1", 1).await;
    tamper_and_check("DELETE FROM audit_events WHERE seq BETWEEN 3 AND 5", 3).await;
}

#[tokio::test]
async fn an_inserted_record_is_named() {
    // A forged record slipped in at 5, later ones renumbered to make room.
    tamper_and_check(
        "UPDATE audit_events SET seq = -seq WHERE seq >= 5; \
         UPDATE audit_events SET seq = 1 - seq WHERE seq < 0; \
         INSERT INTO audit_events SELECT 5, time_us, request_id, caller, peer, tenant_id, \
           operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, \
           mac, trace_parent FROM audit_events WHERE seq = 4",
        5,
    )
    .await;
    // A forged record appended at the end.
    tamper_and_check(
        "INSERT INTO audit_events SELECT 12, time_us, request_id, caller, peer, tenant_id, \
           operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, \
           mac, trace_parent FROM audit_events WHERE seq = 11",
        12,
    )
    .await;
}

#[tokio::test]
async fn swapped_records_are_named() {
    tamper_and_check(
        "UPDATE audit_events SET seq = -4 WHERE seq = 4; \
         UPDATE audit_events SET seq = 4 WHERE seq = 8; \
         UPDATE audit_events SET seq = 8 WHERE seq = -4",
        4,
    )
    .await;
}

#[tokio::test]
async fn a_cut_tail_is_named_recorded_and_recovered_without_deleting() {
    // The last two records removed: the chain alone is whole, the signed head is not.
    let (server, mut keys, mut audit) =
        tamper_and_check("DELETE FROM audit_events WHERE seq >= 10", 10).await;
    let (_, out) = cli_verify(&server.data_dir);
    assert!(
        out.contains("the signed head is at record 11 but the log ends at record 9"),
        "{out}"
    );
    // The service kept answering: the writer recorded the cut as evidence (record 10)
    // before the VerifyAuditChain call's own record.
    let evidence = rows(&server.data_dir);
    assert_eq!(evidence[9].2, "AuditTailMismatch");
    encrypt(&mut keys, "acme", "ctx", b"after", b"").await;
    let before = server.audit_count();

    // The audited recovery step: acknowledges, deletes nothing.
    let dir = server.data_dir.to_str().unwrap().to_owned();
    let (code, out, err) = run_cli(&["audit", "recover", "--data-dir", &dir]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("RECOVERED: record"), "{out}");
    assert_eq!(server.audit_count(), before + 1);
    let (code, out) = cli_verify(&server.data_dir);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acknowledged by recovery record"), "{out}");
    assert!(rpc_verify(&mut audit).await.ok);
    let recover = list_all(
        &mut audit,
        pb::ListAuditEventsRequest {
            operation: "AuditRecover".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recover.len(), 1);
    assert!(
        recover[0].caller.starts_with("cli:"),
        "{:?}",
        recover[0].caller
    );
    assert!(
        recover[0].detail.contains("first at record 10"),
        "{}",
        recover[0].detail
    );

    // A later edit is a new, unacknowledged break.
    audit_db(&server.data_dir)
        .execute("UPDATE audit_events SET detail = 'x' WHERE seq = 2", [])
        .unwrap();
    assert_cli_names(&server.data_dir, 2, "edit after recovery");
    assert_eq!(rpc_verify(&mut audit).await.first_bad_seq, 2);
}

#[tokio::test]
async fn a_removed_or_forged_head_is_named() {
    tamper_and_check("DELETE FROM audit_meta WHERE name = 'head'", 12).await;
    tamper_and_check(
        "UPDATE audit_meta SET value = zeroblob(72) WHERE name = 'head'",
        12,
    )
    .await;
    tamper_and_check(
        "UPDATE audit_meta SET value = 'text' WHERE name = 'head'",
        12,
    )
    .await;
}

#[tokio::test]
async fn a_cut_tail_found_at_start_is_recorded_before_serving() {
    let (server, _keys, _audit) = server_with_records().await;
    let dir = server.data_dir.clone();
    let _temp = server.stop().await;
    audit_db(&dir)
        .execute("DELETE FROM audit_events WHERE seq = 11", [])
        .unwrap();
    let server = TestServer::start_with(test_options(&dir)).await;
    let last = rows(&dir).pop().unwrap();
    assert_eq!((last.0, last.2.as_str()), (11, "AuditTailMismatch"));
    assert_cli_names(&dir, 11, "cut before start");
    server.stop().await;
}

/// The `SEQ:MAC` anchor an OK verify prints.
fn anchor_of(out: &str) -> String {
    out.split("anchor ")
        .nth(1)
        .unwrap()
        .trim_end()
        .trim_end_matches(')')
        .to_owned()
}

/// Copies `audit.db` and its WAL (if any) from one directory to another.
fn copy_audit_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["audit.db", "audit.db-wal", "audit.db-shm"] {
        let _ = std::fs::remove_file(to.join(name));
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }
}

#[tokio::test]
async fn a_rollback_to_an_old_copy_is_caught_by_a_kept_anchor() {
    let (server, _keys, _audit) = server_with_records().await;
    let dir = server.data_dir.clone();
    let temp = server.stop().await;
    let old_copy = temp.as_ref().unwrap().path().join("old");
    copy_audit_files(&dir, &old_copy);
    // More records, then an anchor taken (and, in real life, kept off the machine).
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, _, _) = server.clients().await;
    for i in 0..5 {
        encrypt(
            &mut keys,
            "acme",
            "ctx",
            format!("later {i}").as_bytes(),
            b"",
        )
        .await;
    }
    server.stop().await;
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");
    let anchor = anchor_of(&out);
    // Eleven records, five encryptions and the `KeyStoreAnchor` of the new process's first
    // nonce reservation.
    assert!(anchor.starts_with("17:"), "{anchor}");
    let d = dir.to_str().unwrap();
    let (code, _, err) = run_cli(&["audit", "verify", "--data-dir", d, "--anchor", &anchor]);
    assert_eq!(code, 0, "{err}");

    // The intruder puts the old copy back: chain and signed head are both valid (they were
    // once), so only the anchor shows the rollback.
    copy_audit_files(&old_copy, &dir);
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "a rollback alone verifies: {out}");
    let (code, out, _) = run_cli(&["audit", "verify", "--data-dir", d, "--anchor", &anchor]);
    assert_eq!(code, 1);
    assert!(
        out.starts_with("FAILED: first bad record 17: record 17, which the anchor names, is gone"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------
// Fail closed and recover without a restart

#[tokio::test]
async fn calls_fail_closed_while_the_audit_cannot_write_and_resume_after() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let mut options = test_options(&dir);
    options.audit_busy_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(options).await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let ct = encrypt(&mut keys, "acme", "ctx", b"before", b"")
        .await
        .ciphertext;
    let records_before = server.audit_count();

    // The fault: another process holds audit.db's write lock past the writer's busy timeout,
    // so no commit can happen (what a read-only file, a full disk or an I/O error look like
    // to the writer: the commit fails). Chmod would not do: the writer's file is open, and
    // tests may run as root.
    let blocker = audit_db(&dir);
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut keys = keys.clone();
        let ct = ct.clone();
        calls.spawn(async move {
            match i % 3 {
                0 => keys
                    .encrypt(encrypt_request("acme", "ctx", b"during", b""))
                    .await
                    .map(|r| (request_id(&r), r.into_inner().ciphertext.len())),
                1 => keys
                    .decrypt(pb::DecryptRequest {
                        tenant_id: "acme".into(),
                        context: "ctx".into(),
                        ciphertext: ct,
                        aad: vec![],
                    })
                    .await
                    .map(|r| (request_id(&r), r.into_inner().plaintext.len())),
                _ => keys
                    .generate_data_key(pb::GenerateDataKeyRequest {
                        tenant_id: "acme".into(),
                        context: "files".into(),
                    })
                    .await
                    .map(|r| (request_id(&r), r.into_inner().plaintext_key.len())),
            }
        });
    }
    let mut failed_ids = Vec::new();
    while let Some(result) = calls.join_next().await {
        // No successful reply during the fault: every call is refused, with no result.
        let status = result.unwrap().status_err();
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(status.message().contains("no result was returned"));
        failed_ids.push(
            status
                .metadata()
                .get("x-request-id")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Reading the audit is refused too: its own record cannot be written either.
    let status = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .status_err();
    assert_eq!(status.code(), Code::Unavailable);
    failed_ids.push(
        status
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned(),
    );
    // A control-plane call changes state before its record is due: refused all the same.
    let status = try_create_tenant(&mut tenants, "beta").await.status_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.audit_count(), records_before, "nothing was written");

    // The fault clears: the very next calls succeed, with no restart.
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    let ct2 = encrypt(&mut keys, "acme", "ctx", b"after", b"")
        .await
        .ciphertext;
    assert_eq!(
        decrypt(&mut keys, "acme", "ctx", &ct2, b"")
            .await
            .unwrap()
            .plaintext,
        b"after"
    );
    // The refused calls are on the trail after all, as what the callers saw: unavailable,
    // written late by the first commit that succeeded (before the calls above), with the
    // `KeyStoreAnchor` of the refused creation's key-store change.
    assert_eq!(server.audit_count(), records_before + 26 + 2 + 1);
    let (outcome, detail): (String, String) = audit_db(&dir)
        .query_row(
            "SELECT outcome, detail FROM audit_events WHERE operation = 'CreateTenant' \
             AND tenant_id = 'beta'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome, "unavailable");
    assert!(detail.contains("when the call ended (ok)"), "{detail}");
    let conn = audit_db(&dir);
    for id in &failed_ids {
        let (outcome, detail): (String, String) = conn
            .query_row(
                "SELECT outcome, detail FROM audit_events WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(outcome, "unavailable");
        assert!(detail.starts_with("recorded late"), "{detail}");
    }
    assert!(rpc_verify(&mut audit).await.ok);
}

// ---------------------------------------------------------------------------------------
// Crash safety: SIGKILL under load

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_calls_survive_sigkill_under_load() {
    sigkill_under_load(&[]).await;
}

/// `process` durability (records handed to the OS, no fsync) promises to survive a crash of
/// the process: a SIGKILL under load loses no acknowledged call's record either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_calls_survive_sigkill_under_load_with_process_durability() {
    sigkill_under_load(&["--audit-durability", "process"]).await;
}

/// Runs `serve` with `flags` under load from 64 clients, SIGKILLs it after 3,000
/// acknowledged calls, restarts it with the same flags, and checks that every acknowledged
/// call has its record and that the chain verifies.
async fn sigkill_under_load(flags: &[&str]) {
    const CLIENTS: usize = 64;
    const KILL_AFTER: usize = 3000;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, flags).await;
    let token = server.admin_token();
    let (_, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    for t in 0..4 {
        create_tenant(&mut tenants, &format!("t{t}")).await;
    }
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    // Eight connections, eight clients multiplexed on each.
    for conn in 0..CLIENTS / 8 {
        let (keys, _, _) = clients(&server.url(), Some(&token)).await;
        for k in 0..8 {
            let mut keys = keys.clone();
            let (acked, count, killed) = (acked.clone(), count.clone(), killed.clone());
            let tenant = format!("t{}", (conn + k) % 4);
            tasks.spawn(async move {
                for i in 0..10_000 {
                    let reply = keys
                        .encrypt(encrypt_request(
                            &tenant,
                            "load",
                            format!("value {conn}.{k}.{i}").as_bytes(),
                            b"",
                        ))
                        .await;
                    match reply {
                        Ok(r) => {
                            acked.lock().unwrap().push(request_id(&r));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(status) => {
                            // Only the kill may end a client.
                            assert!(
                                killed.load(Ordering::SeqCst),
                                "a call failed under load: {status}"
                            );
                            return;
                        }
                    }
                }
                panic!("the server was never killed");
            });
        }
    }
    for _ in 0..6000 {
        if count.load(Ordering::SeqCst) >= KILL_AFTER {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(count.load(Ordering::SeqCst) >= KILL_AFTER, "too slow");
    killed.store(true, Ordering::SeqCst);
    server.kill9();
    // Every client ends with a failed call: the kill came mid-load.
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(acked.len() >= KILL_AFTER);
    eprintln!("{} calls acknowledged before the SIGKILL", acked.len());

    // Restart: every acknowledged call has its record, and the chain verifies.
    let server = BinaryServer::start(&dir, flags).await;
    let conn = audit_db(&dir);
    let mut stmt = conn
        .prepare(
            "SELECT request_id FROM audit_events WHERE operation = 'Encrypt' AND outcome = 'ok'",
        )
        .unwrap();
    let recorded: HashSet<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged calls have no record",
        missing.len()
    );
    assert!(recorded.len() >= acked.len());
    let (_, _, mut audit) = clients(&server.url(), Some(&token)).await;
    let report = rpc_verify(&mut audit).await;
    assert!(report.ok, "first bad {}", report.first_bad_seq);
    server.terminate().await;
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");
}

// ---------------------------------------------------------------------------------------
// Privacy

#[tokio::test]
async fn no_plaintext_aad_ciphertext_or_key_reaches_the_audit_files() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let plaintext = |i: usize| format!("PLAINTEXT-{i}-alice-{}@example.com", i * 7919).into_bytes();
    let aad = |i: usize| format!("AAD-row-{i}-{}", i * 104_729).into_bytes();
    let mut ciphertexts = Vec::new();
    for i in 0..6 {
        let out = encrypt(&mut keys, "acme", "crm.email", &plaintext(i), &aad(i)).await;
        decrypt(&mut keys, "acme", "crm.email", &out.ciphertext, &aad(i))
            .await
            .unwrap();
        let rewrapped = keys
            .rewrap(pb::RewrapRequest {
                tenant_id: "acme".into(),
                context: "crm.email".into(),
                ciphertext: out.ciphertext.clone(),
                aad: aad(i),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        secrets.push(plaintext(i));
        secrets.push(aad(i));
        ciphertexts.push(out.ciphertext);
        ciphertexts.push(rewrapped.ciphertext);
    }
    let batch = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (10..14)
                .map(|i| pb::EncryptBatchItem {
                    context: "crm.phone".into(),
                    plaintext: plaintext(i),
                    aad: aad(i),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for i in 10..14 {
        secrets.push(plaintext(i));
        secrets.push(aad(i));
    }
    for result in batch.results {
        if let Some(pb::encrypt_batch_result::Result::Output(out)) = result.result {
            ciphertexts.push(out.ciphertext);
        }
    }
    for _ in 0..3 {
        let dk = generate_data_key(&mut keys, "acme", "files").await;
        let again = decrypt_data_key(&mut keys, "acme", "files", &dk.wrapped_key)
            .await
            .unwrap();
        assert_eq!(again.plaintext_key, dk.plaintext_key);
        secrets.push(dk.plaintext_key);
        ciphertexts.push(dk.wrapped_key);
    }
    // Refused calls carry their input too.
    let _ = decrypt(
        &mut keys,
        "acme",
        "crm.email",
        &ciphertexts[0],
        b"AAD-wrong-guess-42",
    )
    .await
    .status_err();
    secrets.push(b"AAD-wrong-guess-42".to_vec());

    // Keys: every master key, every tenant key, the audit secret, the admin token.
    let keyring = std::fs::read_to_string(server.data_dir.join("master.keyring")).unwrap();
    let ring = tenant_kms::keys::MasterKeyring::load(
        &tenant_kms::keys::MasterKeySource::File(server.data_dir.join("master.keyring")),
        false,
    )
    .unwrap();
    for line in keyring
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let hex_key = line.split_whitespace().nth(1).unwrap();
        secrets.push(hex::decode(hex_key).unwrap());
    }
    let tenant = tenant_kms::domain::TenantId::parse("acme").unwrap();
    for version in server.state.keys.store().key_versions(&tenant).unwrap() {
        let wrapped = version.wrapped.unwrap();
        let wrapping = tenant_kms::crypto::envelope::master_wrapping_key(
            ring.get(wrapped.master_version).unwrap(),
            tenant_kms::crypto::labels::TENANT_KEY_WRAP,
            wrapped.master_version,
        )
        .unwrap();
        let key = tenant_kms::crypto::envelope::unwrap_tenant_key(
            &wrapping,
            wrapped.master_version,
            "acme",
            version.version,
            &wrapped.bytes,
        )
        .unwrap();
        secrets.push(key.expose_secret().to_vec());
        secrets.push(wrapped.bytes);
    }
    secrets.push(
        server
            .state
            .keys
            .audit_secret()
            .unwrap()
            .expose_secret()
            .to_vec(),
    );
    secrets.push(server.admin_token.as_bytes().to_vec());
    // Ciphertext bodies (the header bytes are not secret and too short to search).
    secrets.extend(ciphertexts.iter().map(|c| c[18..].to_vec()));

    // The AAD is there only as a keyed fingerprint: matchable, not readable.
    let events = list_all(
        &mut audit,
        pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            operation: "Encrypt".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 6);
    let fingerprints: HashSet<&str> = events.iter().map(|e| e.aad_fingerprint.as_str()).collect();
    assert_eq!(
        fingerprints.len(),
        6,
        "different AADs, different fingerprints"
    );
    assert_eq!(
        events[0].aad_fingerprint,
        server.state.audit.keys().aad_fingerprint(&aad(0))
    );
    assert_eq!(events[0].aad_fingerprint.len(), 32);

    let check = |when: &str| {
        for secret in &secrets {
            let encodings = [
                secret.clone(),
                hex::encode(secret).into_bytes(),
                hex::encode_upper(secret).into_bytes(),
                base64::engine::general_purpose::STANDARD
                    .encode(secret)
                    .into_bytes(),
            ];
            for needle in encodings {
                let hits: Vec<_> = files_containing(&server.data_dir, &needle)
                    .into_iter()
                    .filter(|p| {
                        p.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with("audit.db")
                    })
                    .collect();
                assert!(hits.is_empty(), "{when}: a secret is in {hits:?}");
            }
        }
    };
    // While running (the WAL holds the recent records) and after a clean stop.
    check("running");
    let dir = server.data_dir.clone();
    let secrets_len = secrets.len();
    let _temp = server.stop().await;
    assert!(secrets_len > 40);
    for secret in &secrets {
        for needle in [secret.clone(), hex::encode(secret).into_bytes()] {
            let hits: Vec<_> = files_containing(&dir, &needle)
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("audit.db")
                })
                .collect();
            assert!(hits.is_empty(), "stopped: a secret is in {hits:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Queries and export

/// A log with two tenants: `a` gets 8 Encrypts and 3 Decrypts, `b` 4 Encrypts.
async fn two_tenant_log() -> (TestServer, Audit) {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, audit) = server.clients().await;
    create_tenant(&mut tenants, "a").await;
    create_tenant(&mut tenants, "b").await;
    let mut cts = Vec::new();
    for i in 0..8 {
        cts.push(
            encrypt(&mut keys, "a", "ctx", format!("a{i}").as_bytes(), b"")
                .await
                .ciphertext,
        );
        if i % 2 == 0 {
            encrypt(&mut keys, "b", "ctx", format!("b{i}").as_bytes(), b"").await;
        }
    }
    for ct in &cts[..3] {
        decrypt(&mut keys, "a", "ctx", ct, b"").await.unwrap();
    }
    (server, audit)
}

#[tokio::test]
async fn list_audit_events_pages_and_filters() {
    let (server, mut audit) = two_tenant_log().await;
    let snapshot = rows(&server.data_dir);
    let top = snapshot.last().unwrap().0;
    // Listing is audited too: compare only what existed at the snapshot.
    let upto = |events: Vec<pb::AuditEvent>| -> Vec<u64> {
        events
            .into_iter()
            .map(|e| e.seq)
            .filter(|s| *s <= top)
            .collect()
    };
    let expect = |f: &dyn Fn(&Row) -> bool| -> Vec<u64> {
        snapshot.iter().filter(|r| f(r)).map(|r| r.0).collect()
    };

    // Everything, three at a time, in sequence order.
    let all = upto(
        list_all(
            &mut audit,
            pb::ListAuditEventsRequest {
                page_size: 3,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(all, (1..=top).collect::<Vec<_>>());

    // One tenant.
    let a = upto(
        list_all(
            &mut audit,
            pb::ListAuditEventsRequest {
                tenant_id: "a".into(),
                page_size: 2,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(a, expect(&|r| r.1 == "a"));
    assert_eq!(a.len(), 12, "CreateTenant, 8 Encrypt, 3 Decrypt");

    // One operation.
    let decrypts = list_all(
        &mut audit,
        pb::ListAuditEventsRequest {
            tenant_id: "a".into(),
            operation: "Decrypt".into(),
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(decrypts.len(), 3);
    assert!(
        decrypts
            .iter()
            .all(|e| e.operation == "Decrypt" && e.tenant_id == "a")
    );
    assert!(
        decrypts
            .iter()
            .all(|e| e.outcome == "ok" && e.key_versions == [1])
    );
    assert!(
        decrypts
            .iter()
            .all(|e| e.contexts == ["ctx"] && e.caller.starts_with("token:"))
    );

    // A time range: since inclusive, until exclusive.
    let encrypts_a: Vec<&Row> = snapshot
        .iter()
        .filter(|r| r.1 == "a" && r.2 == "Encrypt")
        .collect();
    let (since, until) = (encrypts_a[2].3, encrypts_a[6].3);
    let ranged = upto(
        list_all(
            &mut audit,
            pb::ListAuditEventsRequest {
                tenant_id: "a".into(),
                since: Some(timestamp(since)),
                until: Some(timestamp(until)),
                operation: "Encrypt".into(),
                page_size: 1,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(
        ranged,
        expect(&|r| r.1 == "a" && r.2 == "Encrypt" && r.3 >= since && r.3 < until)
    );
    assert!(ranged.len() >= 4 && ranged.contains(&encrypts_a[2].0));
    assert!(!ranged.contains(&encrypts_a[6].0));

    // Bad paging input is refused.
    for request in [
        pb::ListAuditEventsRequest {
            page_size: -1,
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        },
    ] {
        let err = audit.list_audit_events(request).await.status_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    // An auditor scoped to tenant a sees a, and nothing else.
    let dir = server.data_dir.to_str().unwrap().to_owned();
    let (code, token, err) = run_cli(&[
        "token",
        "create",
        "--role",
        "auditor",
        "--tenants",
        "a",
        "--data-dir",
        &dir,
    ]);
    assert_eq!(code, 0, "{err}");
    let (mut auditor_keys, _, mut auditor) = server.clients_with(Some(token.trim())).await;
    let seen = list_all(
        &mut auditor,
        pb::ListAuditEventsRequest {
            tenant_id: "a".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(seen.iter().all(|e| e.tenant_id == "a"));
    for tenant in ["b", ""] {
        let err = auditor
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            })
            .await
            .status_err();
        assert_eq!(err.code(), Code::PermissionDenied, "tenant '{tenant}'");
    }
    let err = auditor_keys
        .encrypt(encrypt_request("a", "ctx", b"x", b""))
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn export_writes_json_lines_filtered_by_tenant_and_time() {
    let (server, _audit) = two_tenant_log().await;
    let dir = server.data_dir.clone();
    let _temp = server.stop().await;
    let snapshot = rows(&dir);
    let d = dir.to_str().unwrap();
    let parse = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    };

    let (code, out, err) = run_cli(&["audit", "export", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let all = parse(&out);
    assert_eq!(all.len(), snapshot.len());
    for (line, row) in all.iter().zip(&snapshot) {
        assert_eq!(line["seq"].as_u64(), Some(row.0));
        assert_eq!(line["tenant_id"], row.1.as_str());
        assert_eq!(line["operation"], row.2.as_str());
        assert_eq!(line["time_us"].as_i64(), Some(row.3));
        assert_eq!(line["time"], rfc3339_micros(row.3).as_str());
        for field in [
            "request_id",
            "caller",
            "peer",
            "contexts",
            "key_versions",
            "item_count",
            "outcome",
            "aad_fingerprint",
            "detail",
        ] {
            assert!(line.get(field).is_some(), "{field}");
        }
    }

    let (code, out, _) = run_cli(&["audit", "export", "--data-dir", d, "--tenant", "b"]);
    assert_eq!(code, 0);
    let b = parse(&out);
    assert_eq!(b.len(), 5, "CreateTenant and 4 Encrypts");
    assert!(b.iter().all(|l| l["tenant_id"] == "b"));

    let encrypts_a: Vec<&Row> = snapshot
        .iter()
        .filter(|r| r.1 == "a" && r.2 == "Encrypt")
        .collect();
    let (since, until) = (encrypts_a[1].3, encrypts_a[5].3);
    let (code, out, err) = run_cli(&[
        "audit",
        "export",
        "--data-dir",
        d,
        "--tenant",
        "a",
        "--since",
        &rfc3339_micros(since),
        "--until",
        &rfc3339_micros(until),
    ]);
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> = parse(&out)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = snapshot
        .iter()
        .filter(|r| r.1 == "a" && r.3 >= since && r.3 < until)
        .map(|r| r.0)
        .collect();
    assert_eq!(seqs, expected);
    assert!(seqs.contains(&encrypts_a[1].0) && !seqs.contains(&encrypts_a[5].0));

    // Plain dates work; a future --since gives nothing; a bad time is refused.
    let (code, out, _) = run_cli(&["audit", "export", "--data-dir", d, "--since", "2000-01-01"]);
    assert_eq!((code, parse(&out).len()), (0, snapshot.len()));
    let (code, out, _) = run_cli(&["audit", "export", "--data-dir", d, "--since", "2999-01-01"]);
    assert_eq!((code, out.as_str()), (0, ""));
    let (code, _, err) = run_cli(&["audit", "export", "--data-dir", d, "--until", "yesterday"]);
    assert_eq!(code, 1);
    assert!(err.contains("RFC 3339"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Retention

#[tokio::test]
async fn prune_leaves_a_signed_checkpoint_and_tampering_with_it_is_named() {
    let (server, _keys, mut audit) = server_with_records().await;
    let dir = server.data_dir.clone();
    let d = dir.to_str().unwrap().to_owned();
    let before = rows(&dir);
    let cut = before[5].3; // the time of record 6
    let keep_from = before.iter().find(|r| r.3 >= cut).unwrap().0;
    assert!(keep_from > 1);

    let (code, _, err) = run_cli(&[
        "audit",
        "prune",
        "--before",
        &rfc3339_micros(cut),
        "--data-dir",
        &d,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("removed {} record(s)", keep_from - 1)),
        "{err}"
    );
    let after = rows(&dir);
    assert_eq!(after[0].0, keep_from);
    assert_eq!(after.last().unwrap().2, "AuditPrune");
    // The rest still verifies, by CLI and RPC.
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");
    let report = rpc_verify(&mut audit).await;
    assert!(report.ok);
    assert_eq!(report.records_checked, after.len() as u64);

    // The checkpoint cannot be moved, forged or dropped.
    let conn = audit_db(&dir);
    let original: Vec<u8> = conn
        .query_row(
            "SELECT value FROM audit_meta WHERE name = 'checkpoint'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(original.len(), 8 + 32 + 32);
    let mut tampered = Vec::new();
    let mut moved = original.clone();
    moved[7] = moved[7].wrapping_add(1); // seq + 1, old signature
    tampered.push((moved, keep_from));
    let mut forged = original.clone();
    forged[70] ^= 1; // signature
    tampered.push((forged, keep_from));
    tampered.push((original[..40].to_vec(), keep_from)); // truncated
    for (value, bad) in tampered {
        conn.execute(
            "UPDATE audit_meta SET value = ?1 WHERE name = 'checkpoint'",
            [&value],
        )
        .unwrap();
        assert_cli_names(&dir, bad, "checkpoint edited");
        let (_, out) = cli_verify(&dir);
        assert!(out.contains("checkpoint is invalid"), "{out}");
        assert_eq!(rpc_verify(&mut audit).await.first_bad_seq, bad);
    }
    conn.execute("DELETE FROM audit_meta WHERE name = 'checkpoint'", [])
        .unwrap();
    assert_cli_names(&dir, 1, "checkpoint removed");
    conn.execute(
        "INSERT INTO audit_meta (name, value) VALUES ('checkpoint', ?1)",
        [&original],
    )
    .unwrap();
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");

    // A row slipped in before the checkpoint is not part of the chain.
    conn.execute(
        "INSERT INTO audit_events SELECT 1, time_us, request_id, caller, peer, tenant_id, \
         operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, mac, \
         trace_parent FROM audit_events WHERE seq = ?1",
        [keep_from as i64],
    )
    .unwrap();
    assert_cli_names(&dir, 1, "row before the checkpoint");
    let (_, out) = cli_verify(&dir);
    assert!(out.contains("lies before the start of the chain"), "{out}");
    conn.execute("DELETE FROM audit_events WHERE seq = 1", [])
        .unwrap();

    // Pruning refuses a log that does not verify.
    conn.execute(
        "UPDATE audit_events SET detail = 'x' WHERE seq = ?1",
        [after[2].0 as i64],
    )
    .unwrap();
    let (code, _, err) = run_cli(&["audit", "prune", "--before", "2999-01-01", "--data-dir", &d]);
    assert_eq!(code, 1);
    assert!(err.contains("does not verify"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Another process appending: the rotate command, tenant and master rotation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_from_another_process_interleave_and_keep_the_chain_whole() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let d = dir.to_str().unwrap().to_owned();
    let server = BinaryServer::start(&dir, &[]).await;
    let token = server.admin_token();
    let (keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for c in 0..16 {
        let mut keys = keys.clone();
        let (stop, served) = (stop.clone(), served.clone());
        load.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && i < 100_000 {
                let ct = encrypt(&mut keys, "acme", "ctx", format!("{c}.{i}").as_bytes(), b"")
                    .await
                    .ciphertext;
                decrypt(&mut keys, "acme", "ctx", &ct, b"").await.unwrap();
                served.fetch_add(2, Ordering::SeqCst);
                i += 1;
            }
        });
    }
    for _ in 0..3000 {
        if served.load(Ordering::SeqCst) >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While the server appends, the rotate command appends from its own process.
    let d2 = d.clone();
    let rotations = tokio::task::spawn_blocking(move || {
        for _ in 0..4 {
            let (code, _, err) = run_cli(&["rotate", "--tenant", "acme", "--data-dir", &d2]);
            assert_eq!(code, 0, "{err}");
        }
        let (code, _, err) = run_cli(&["rotate", "--master", "--data-dir", &d2]);
        assert_eq!(code, 0, "{err}");
    });
    rotations.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    while let Some(task) = load.join_next().await {
        task.unwrap();
    }
    assert!(served.load(Ordering::SeqCst) > 0);
    server.terminate().await;

    // The master rotation re-wrapped the audit secret under master version 2, and the log
    // (written before and after, by two processes) verifies with it.
    let keys_db = Connection::open(dir.join("keys.db")).unwrap();
    let audit_master: u32 = keys_db
        .query_row(
            "SELECT master_version FROM audit_key WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audit_master, 2);
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");
    let all = rows(&dir);
    let rotate_records = all.iter().filter(|r| r.2 == "RotateTenantKey").count();
    let master_records = all.iter().filter(|r| r.2 == "RotateMasterKey").count();
    assert_eq!((rotate_records, master_records), (4, 1));
    assert_eq!(all.len() as u64, all.last().unwrap().0, "no gaps");
    // The two processes' records really interleave.
    let cli_seqs: Vec<u64> = all
        .iter()
        .filter(|r| r.2.starts_with("Rotate"))
        .map(|r| r.0)
        .collect();
    let between = all
        .iter()
        .filter(|r| r.0 > cli_seqs[0] && r.0 < cli_seqs[4] && r.2 == "Encrypt")
        .count();
    assert!(between > 0, "no server record between the rotations");

    // And a restarted server keeps extending the same chain.
    let server = BinaryServer::start(&dir, &[]).await;
    let (mut keys, _, mut audit) = clients(&server.url(), Some(&token)).await;
    encrypt(&mut keys, "acme", "ctx", b"after", b"").await;
    assert!(rpc_verify(&mut audit).await.ok);
    server.terminate().await;
    let (code, out) = cli_verify(&dir);
    assert_eq!(code, 0, "{out}");
}
