//! Key rotation tied to the tenant lifecycle (issue 3), over real gRPC and the real binary:
//! rotation and re-wrap, key-version states, every lifecycle transition and refusal, cache
//! invalidation, crypto-shredding down to the bytes of every file, the nonce budget (also
//! across a crash), the `rotate` command (with and without a running server, dry runs, JSON,
//! exit codes, audit as `cli:<user>`), and a SIGKILLed master-key rotation over 10,000
//! tenants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tenant_kms::pb;
use tonic::Code;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The key version in a v1 ciphertext header (bytes 2..6, big-endian).
fn header_version(ciphertext: &[u8]) -> u32 {
    u32::from_be_bytes(ciphertext[2..6].try_into().unwrap())
}

/// The operator name the tests run the command as (audited as `cli:<user>`).
const OPERATOR: &str = "ops-alice";

/// Runs the binary as `OPERATOR` on the blocking pool (so an in-process server in this
/// runtime keeps serving); returns (exit code, stdout, stderr).
async fn cli(args: &[&str]) -> (i32, String, String) {
    cli_on(args, None).await
}

/// [`cli`], with the command's wall clock on `clock` if one is given.
async fn cli_on(args: &[&str], clock: Option<&ProcessClock>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("USER", OPERATOR)
        .env_remove("LOGNAME");
    if let Some(clock) = clock {
        clock.apply(&mut command);
    }
    tokio::task::spawn_blocking(move || run_command(&mut command))
        .await
        .unwrap()
}

/// `rotate … --json --data-dir DIR`: exit code, parsed summary, stderr.
async fn rotate_json(dir: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    rotate_json_on(dir, args, None).await
}

/// [`rotate_json`], with the command's wall clock on `clock` if one is given.
async fn rotate_json_on(
    dir: &Path,
    args: &[&str],
    clock: Option<&ProcessClock>,
) -> (i32, serde_json::Value, String) {
    let mut all = vec!["rotate", "--json", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = cli_on(&all, clock).await;
    let summary: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("rotate --json printed no JSON ({e}): {out:?} / {err}"));
    (code, summary, err)
}

async fn try_encrypt(
    keys: &mut Keys,
    id: &str,
    plaintext: &[u8],
) -> Result<pb::EncryptResponse, tonic::Status> {
    keys.encrypt(encrypt_request(id, "ctx", plaintext, b"row"))
        .await
        .map(|r| r.into_inner())
}

async fn rewrap(
    keys: &mut Keys,
    id: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<pb::RewrapResponse, tonic::Status> {
    keys.rewrap(pb::RewrapRequest {
        tenant_id: id.into(),
        context: "ctx".into(),
        ciphertext: ciphertext.to_vec(),
        aad: aad.to_vec(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn encrypt_batch(
    keys: &mut Keys,
    id: &str,
    n: usize,
) -> Result<Vec<pb::EncryptResponse>, tonic::Status> {
    let items = (0..n)
        .map(|i| pb::EncryptBatchItem {
            context: "ctx".into(),
            plaintext: format!("v{i}").into_bytes(),
            aad: vec![],
            ..Default::default()
        })
        .collect();
    let results = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: id.into(),
            items,
            ..Default::default()
        })
        .await?
        .into_inner()
        .results;
    Ok(results
        .into_iter()
        .map(|r| match r.result.unwrap() {
            pb::encrypt_batch_result::Result::Output(o) => o,
            pb::encrypt_batch_result::Result::Error(e) => panic!("item failed: {}", e.message),
        })
        .collect())
}

/// Every audit event (optionally of one tenant and operation), all pages.
async fn audit_events(audit: &mut Audit, tenant: &str, operation: &str) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant_id: tenant.into(),
                operation: operation.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// The wrapped key bytes of a tenant, read straight from keys.db: (version, master version,
/// bytes). The connection is closed before returning.
fn wrapped_keys(dir: &Path, tenant: &str) -> Vec<(u32, u32, Vec<u8>)> {
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT version, master_version, wrapped_key FROM wrapped_keys \
             WHERE tenant_id = ?1 ORDER BY version",
        )
        .unwrap();
    stmt.query_map([tenant], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// How many wrapped keys are under a master version, and whether it is retired.
fn master_state(dir: &Path, master: u32) -> (i64, bool) {
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    let count = conn
        .query_row(
            "SELECT COUNT(*) FROM wrapped_keys WHERE master_version = ?1",
            [master],
            |row| row.get(0),
        )
        .unwrap();
    let retired: Option<i64> = conn
        .query_row(
            "SELECT retired_at FROM master_keys WHERE version = ?1",
            [master],
            |row| row.get(0),
        )
        .unwrap();
    (count, retired.is_some())
}

/// The tenants with a key under a master version.
fn tenants_under(dir: &Path, master: u32) -> std::collections::HashSet<String> {
    let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT tenant_id FROM wrapped_keys WHERE master_version = ?1")
        .unwrap();
    stmt.query_map([master], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn assert_failed_precondition(status: &tonic::Status, naming: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(naming),
        "message {:?} does not name {naming:?}",
        status.message()
    );
}

// ---------------------------------------------------------------------------------------
// Rotation, old versions, Rewrap, version states
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rotation_keeps_old_versions_and_rewrap_moves_values_to_the_primary() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let v1 = encrypt(&mut keys, "acme", "ctx", b"alice@example.com", b"row-1").await;
    assert_eq!((v1.key_version, header_version(&v1.ciphertext)), (1, 1));

    let rotated = rotate_tenant(&mut tenants, "acme").await.unwrap();
    assert_eq!(rotated.primary_version, 2);
    let v2 = encrypt(&mut keys, "acme", "ctx", b"bob@example.com", b"row-2").await;
    assert_eq!((v2.key_version, header_version(&v2.ciphertext)), (2, 2));
    // The v1 value still decrypts, under v1.
    let back = decrypt(&mut keys, "acme", "ctx", &v1.ciphertext, b"row-1")
        .await
        .unwrap();
    assert_eq!(
        (back.plaintext.as_slice(), back.key_version),
        (&b"alice@example.com"[..], 1)
    );

    // Rewrap: v1 → v2, same plaintext, same AAD (the old AAD opens it, another does not).
    let moved = rewrap(&mut keys, "acme", &v1.ciphertext, b"row-1")
        .await
        .unwrap();
    assert_eq!(
        (moved.key_version, header_version(&moved.ciphertext)),
        (2, 2)
    );
    assert_ne!(moved.ciphertext, v1.ciphertext);
    let back = decrypt(&mut keys, "acme", "ctx", &moved.ciphertext, b"row-1")
        .await
        .unwrap();
    assert_eq!(
        (back.plaintext.as_slice(), back.key_version),
        (&b"alice@example.com"[..], 2)
    );
    let err = decrypt(&mut keys, "acme", "ctx", &moved.ciphertext, b"row-2")
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Rewrap with the wrong AAD is the generic decryption error and moves nothing.
    let err = rewrap(&mut keys, "acme", &v1.ciphertext, b"other")
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // RewrapBatch: per-item results; the bad item fails alone.
    let results = keys
        .rewrap_batch(pb::RewrapBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                pb::RewrapBatchItem {
                    context: "ctx".into(),
                    ciphertext: v1.ciphertext.clone(),
                    aad: b"row-1".to_vec(),
                    ..Default::default()
                },
                pb::RewrapBatchItem {
                    context: "ctx".into(),
                    ciphertext: v1.ciphertext[..20].to_vec(),
                    aad: b"row-1".to_vec(),
                    ..Default::default()
                },
                pb::RewrapBatchItem {
                    context: "ctx".into(),
                    ciphertext: v2.ciphertext.clone(),
                    aad: b"row-2".to_vec(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    let mut outputs = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.result.unwrap() {
            pb::rewrap_batch_result::Result::Output(o) => {
                assert_ne!(i, 1);
                assert_eq!((o.key_version, header_version(&o.ciphertext)), (2, 2));
                outputs.push(o.ciphertext);
            }
            pb::rewrap_batch_result::Result::Error(e) => {
                assert_eq!(i, 1);
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
    }
    for (ct, aad, plain) in [
        (&outputs[0], &b"row-1"[..], &b"alice@example.com"[..]),
        (&outputs[1], b"row-2", b"bob@example.com"),
    ] {
        let back = decrypt(&mut keys, "acme", "ctx", ct, aad).await.unwrap();
        assert_eq!(back.plaintext, plain);
    }

    // Metadata: v1 enabled and not primary, v2 enabled and primary; encryptions counted.
    let list = key_versions(&mut tenants, "acme").await;
    assert_eq!(list.len(), 2);
    assert_eq!(
        (list[0].version, list[0].state, list[0].primary),
        (1, pb::KeyVersionState::Enabled as i32, false)
    );
    assert_eq!(
        (list[1].version, list[1].state, list[1].primary),
        (2, pb::KeyVersionState::Enabled as i32, true)
    );
    assert!(list[0].encryptions >= 1 && list[1].encryptions >= 4);

    // Disable v1: its values fail (FAILED_PRECONDITION naming the state), v2 values work.
    let disabled = disable_key_version(&mut tenants, "acme", 1).await.unwrap();
    assert_eq!(disabled.state, pb::KeyVersionState::Disabled as i32);
    let err = decrypt(&mut keys, "acme", "ctx", &v1.ciphertext, b"row-1")
        .await
        .status_err();
    assert_failed_precondition(&err, "key version 1 is DISABLED");
    let err = rewrap(&mut keys, "acme", &v1.ciphertext, b"row-1")
        .await
        .status_err();
    assert_failed_precondition(&err, "DISABLED");
    assert!(
        decrypt(&mut keys, "acme", "ctx", &v2.ciphertext, b"row-2")
            .await
            .is_ok()
    );
    // Enable again: they work again.
    let enabled = enable_key_version(&mut tenants, "acme", 1).await.unwrap();
    assert_eq!(enabled.state, pb::KeyVersionState::Enabled as i32);
    let back = decrypt(&mut keys, "acme", "ctx", &v1.ciphertext, b"row-1")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"alice@example.com");

    // The primary can be neither disabled nor destroyed; bad versions are named.
    let err = disable_key_version(&mut tenants, "acme", 2)
        .await
        .status_err();
    assert_failed_precondition(&err, "primary");
    let err = destroy_key_version(&mut tenants, "acme", 2)
        .await
        .status_err();
    assert_failed_precondition(&err, "primary");
    let err = disable_key_version(&mut tenants, "acme", 0)
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = disable_key_version(&mut tenants, "acme", 9)
        .await
        .status_err();
    assert_eq!(err.code(), Code::NotFound);

    // Destroy v1: its values fail for good; it cannot be enabled or destroyed again.
    let destroyed = destroy_key_version(&mut tenants, "acme", 1).await.unwrap();
    assert_eq!(destroyed.state, pb::KeyVersionState::Destroyed as i32);
    let err = decrypt(&mut keys, "acme", "ctx", &v1.ciphertext, b"row-1")
        .await
        .status_err();
    assert_failed_precondition(&err, "key version 1 is DESTROYED");
    let err = enable_key_version(&mut tenants, "acme", 1)
        .await
        .status_err();
    assert_failed_precondition(&err, "DESTROYED");
    let err = destroy_key_version(&mut tenants, "acme", 1)
        .await
        .status_err();
    assert_failed_precondition(&err, "DESTROYED");
    // The rewrapped copies live on under v2.
    let back = decrypt(&mut keys, "acme", "ctx", &moved.ciphertext, b"row-1")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"alice@example.com");
}

// ---------------------------------------------------------------------------------------
// Lifecycle transitions
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum St {
    Active,
    Suspended,
    Pending,
    Destroyed,
}

const STATES: [St; 4] = [St::Active, St::Suspended, St::Pending, St::Destroyed];

#[derive(Clone, Copy, Debug)]
enum Op {
    Suspend,
    Resume,
    ScheduleDeletion,
    ScheduleDeletionNow,
    CancelDeletion,
    Rotate,
    SetPolicy,
    Get,
    ListVersions,
    Create,
    Encrypt,
    Decrypt,
    Rewrap,
    GenerateDataKey,
}

/// What an operation must do on a tenant in each of the four states.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Succeeds; the tenant ends in this state (checked with GetTenant unless destroyed).
    Ok(Option<St>),
    /// Fails with this code and a message containing this text.
    Fail(Code, &'static str),
}

const DESTROYED: Want = Want::Fail(Code::FailedPrecondition, "tenant destroyed");
const FP_ACTIVE: Want = Want::Fail(Code::FailedPrecondition, "tenant is ACTIVE");
const FP_SUSPENDED: Want = Want::Fail(Code::FailedPrecondition, "tenant is SUSPENDED");
const FP_PENDING: Want = Want::Fail(Code::FailedPrecondition, "tenant is PENDING_DELETION");

/// (operation, [ACTIVE, SUSPENDED, PENDING_DELETION, DESTROYED]).
const TABLE: &[(Op, [Want; 4])] = &[
    (
        Op::Suspend,
        [
            Want::Ok(Some(St::Suspended)),
            FP_SUSPENDED,
            FP_PENDING,
            DESTROYED,
        ],
    ),
    (
        Op::Resume,
        [FP_ACTIVE, Want::Ok(Some(St::Active)), FP_PENDING, DESTROYED],
    ),
    (
        Op::ScheduleDeletion,
        [
            Want::Ok(Some(St::Pending)),
            Want::Ok(Some(St::Pending)),
            FP_PENDING,
            DESTROYED,
        ],
    ),
    (
        Op::ScheduleDeletionNow,
        [
            Want::Ok(Some(St::Destroyed)),
            Want::Ok(Some(St::Destroyed)),
            FP_PENDING,
            DESTROYED,
        ],
    ),
    (
        Op::CancelDeletion,
        [
            FP_ACTIVE,
            FP_SUSPENDED,
            Want::Ok(Some(St::Active)),
            DESTROYED,
        ],
    ),
    (
        Op::Rotate,
        [
            Want::Ok(Some(St::Active)),
            Want::Ok(Some(St::Suspended)),
            FP_PENDING,
            DESTROYED,
        ],
    ),
    (
        Op::SetPolicy,
        [
            Want::Ok(Some(St::Active)),
            Want::Ok(Some(St::Suspended)),
            Want::Ok(Some(St::Pending)),
            DESTROYED,
        ],
    ),
    (
        Op::Get,
        [
            Want::Ok(Some(St::Active)),
            Want::Ok(Some(St::Suspended)),
            Want::Ok(Some(St::Pending)),
            DESTROYED,
        ],
    ),
    (
        Op::ListVersions,
        [Want::Ok(None), Want::Ok(None), Want::Ok(None), DESTROYED],
    ),
    (
        Op::Create,
        [
            Want::Fail(Code::AlreadyExists, "already exists"),
            Want::Fail(Code::AlreadyExists, "already exists"),
            Want::Fail(Code::AlreadyExists, "already exists"),
            DESTROYED,
        ],
    ),
    (
        Op::Encrypt,
        [Want::Ok(None), FP_SUSPENDED, FP_PENDING, DESTROYED],
    ),
    (
        Op::Decrypt,
        [Want::Ok(None), FP_SUSPENDED, FP_PENDING, DESTROYED],
    ),
    (
        Op::Rewrap,
        [Want::Ok(None), FP_SUSPENDED, FP_PENDING, DESTROYED],
    ),
    (
        Op::GenerateDataKey,
        [Want::Ok(None), FP_SUSPENDED, FP_PENDING, DESTROYED],
    ),
];

/// Creates `id`, encrypts a value while it is active (its key is now cached), and moves it
/// to `state`. Returns the ciphertext.
async fn tenant_in(keys: &mut Keys, tenants: &mut Tenants, id: &str, state: St) -> Vec<u8> {
    create_tenant(tenants, id).await;
    let ct = try_encrypt(keys, id, b"value").await.unwrap().ciphertext;
    let moved = match state {
        St::Active => None,
        St::Suspended => Some(suspend_tenant(tenants, id).await.unwrap()),
        St::Pending => Some(schedule_deletion(tenants, id, Some(86_400)).await.unwrap()),
        St::Destroyed => Some(schedule_deletion(tenants, id, Some(0)).await.unwrap()),
    };
    if let Some(t) = moved {
        assert_eq!(t.state, pb_state(state) as i32, "{id}");
    }
    ct
}

fn pb_state(state: St) -> pb::TenantState {
    match state {
        St::Active => pb::TenantState::Active,
        St::Suspended => pb::TenantState::Suspended,
        St::Pending => pb::TenantState::PendingDeletion,
        St::Destroyed => pb::TenantState::Destroyed,
    }
}

/// Applies `op`; on success returns the tenant state the response reports, if it has one.
async fn apply(
    op: Op,
    keys: &mut Keys,
    tenants: &mut Tenants,
    id: &str,
    ct: &[u8],
) -> Result<Option<i32>, tonic::Status> {
    let state = |t: pb::Tenant| Some(t.state);
    match op {
        Op::Suspend => suspend_tenant(tenants, id).await.map(state),
        Op::Resume => resume_tenant(tenants, id).await.map(state),
        Op::ScheduleDeletion => schedule_deletion(tenants, id, Some(86_400))
            .await
            .map(state),
        Op::ScheduleDeletionNow => schedule_deletion(tenants, id, Some(0)).await.map(state),
        Op::CancelDeletion => cancel_deletion(tenants, id).await.map(state),
        Op::Rotate => rotate_tenant(tenants, id).await.map(state),
        Op::SetPolicy => set_rotation_policy(tenants, id, 3600, 5000)
            .await
            .map(state),
        Op::Get => get_tenant(tenants, id).await.map(state),
        Op::ListVersions => tenants
            .list_key_versions(pb::ListKeyVersionsRequest {
                tenant_id: id.into(),
            })
            .await
            .map(|_| None),
        Op::Create => try_create_tenant(tenants, id).await.map(state),
        Op::Encrypt => try_encrypt(keys, id, b"more").await.map(|_| None),
        Op::Decrypt => decrypt(keys, id, "ctx", ct, b"row").await.map(|_| None),
        Op::Rewrap => rewrap(keys, id, ct, b"row").await.map(|_| None),
        Op::GenerateDataKey => keys
            .generate_data_key(pb::GenerateDataKeyRequest {
                tenant_id: id.into(),
                context: "ctx".into(),
            })
            .await
            .map(|_| None),
    }
}

#[tokio::test]
async fn every_lifecycle_transition_and_refusal_has_its_status() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    for (row, (op, wants)) in TABLE.iter().enumerate() {
        for (state, want) in STATES.iter().zip(wants) {
            let id = format!("t{row}-{}", format!("{state:?}").to_lowercase());
            let ct = tenant_in(&mut keys, &mut tenants, &id, *state).await;
            let result = apply(*op, &mut keys, &mut tenants, &id, &ct).await;
            let case = format!("{op:?} on {state:?}");
            match (want, result) {
                (Want::Ok(end), Ok(reported)) => {
                    if let (Some(end), Some(reported)) = (end, reported) {
                        assert_eq!(reported, pb_state(*end) as i32, "{case}");
                    }
                    if let Some(end) = end {
                        match end {
                            St::Destroyed => {
                                let err = get_tenant(&mut tenants, &id).await.status_err();
                                assert_failed_precondition(&err, "tenant destroyed");
                            }
                            other => assert_eq!(
                                get_tenant(&mut tenants, &id).await.unwrap().state,
                                pb_state(*other) as i32,
                                "{case}"
                            ),
                        }
                    }
                }
                (Want::Fail(code, text), Err(status)) => {
                    assert_eq!(status.code(), *code, "{case}: {status:?}");
                    assert!(
                        status.message().contains(text),
                        "{case}: {:?} does not contain {text:?}",
                        status.message()
                    );
                    if *text == "tenant destroyed" {
                        assert_eq!(status.message(), "tenant destroyed", "{case}");
                    }
                }
                (want, Ok(_)) => panic!("{case}: succeeded, wanted {want:?}"),
                (want, Err(status)) => panic!("{case}: failed with {status:?}, wanted {want:?}"),
            }
        }
    }
    // An unknown tenant is NOT_FOUND, not a state.
    for op in [Op::Suspend, Op::CancelDeletion, Op::Rotate, Op::Encrypt] {
        let err = apply(op, &mut keys, &mut tenants, "ghost", b"x")
            .await
            .status_err();
        assert_eq!(err.code(), Code::NotFound, "{op:?}");
    }
    // Every change and every refusal was audited, refusals with their outcome.
    let events = audit_events(&mut audit, "t0-suspended", "SuspendTenant").await;
    assert_eq!(events.len(), 2, "the setup suspend and the refused one");
    assert_eq!(events[0].outcome, "ok");
    assert_eq!(events[1].outcome, "failed_precondition");
    assert!(events[1].detail.contains("SUSPENDED"));
    // The tombstone stays listed, with its destruction time.
    let listed = list_tenants(&mut tenants).await;
    let tomb = listed
        .iter()
        .find(|t| t.tenant_id == "t0-destroyed")
        .unwrap();
    assert_eq!(tomb.state, pb::TenantState::Destroyed as i32);
    assert!(tomb.destroyed_at.is_some());
}

#[tokio::test]
async fn cancel_within_the_window_restores_service() {
    let clock = ManualClock::starting_now();
    let server = TestServer::start_on_clock(&clock).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let before = try_encrypt(&mut keys, "acme", b"kept").await.unwrap();
    suspend_tenant(&mut tenants, "acme").await.unwrap();
    // From SUSPENDED too; the default window is 7 days.
    let pending = schedule_deletion(&mut tenants, "acme", None).await.unwrap();
    assert_eq!(pending.state, pb::TenantState::PendingDeletion as i32);
    let at = pending.deletion_time.unwrap().seconds;
    assert_eq!(at, clock.now_unix() + 7 * 86_400);
    let err = decrypt(&mut keys, "acme", "ctx", &before.ciphertext, b"row")
        .await
        .status_err();
    assert_failed_precondition(&err, "PENDING_DELETION");
    let back = cancel_deletion(&mut tenants, "acme").await.unwrap();
    assert_eq!(back.state, pb::TenantState::Active as i32);
    assert!(back.deletion_time.is_none());
    let plain = decrypt(&mut keys, "acme", "ctx", &before.ciphertext, b"row")
        .await
        .unwrap()
        .plaintext;
    assert_eq!(plain, b"kept");
    assert!(try_encrypt(&mut keys, "acme", b"new").await.is_ok());
}

#[tokio::test]
async fn deletion_window_closes_at_its_second_on_the_injected_clock() {
    let clock = ManualClock::starting_now();
    let server = TestServer::start_on_clock(&clock).await;
    let (_, mut tenants, _) = server.clients().await;
    for id in ["early", "late"] {
        create_tenant(&mut tenants, id).await;
        schedule_deletion(&mut tenants, id, Some(3600))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(3599));
    let back = cancel_deletion(&mut tenants, "early").await.unwrap();
    assert_eq!(back.state, pb::TenantState::Active as i32);
    clock.advance(Duration::from_secs(1));
    let err = cancel_deletion(&mut tenants, "late").await.status_err();
    assert_failed_precondition(&err, "window has passed");
}

#[tokio::test]
async fn reaper_destroys_what_the_injected_clock_says_is_due() {
    let clock = ManualClock::starting_now();
    let shared: SharedClock = clock.clone();
    let server = TestServer::start_on_clock(&clock).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    for id in ["leaving", "staying"] {
        create_tenant(&mut tenants, id).await;
    }
    let ct = try_encrypt(&mut keys, "leaving", b"bye").await.unwrap();
    schedule_deletion(&mut tenants, "leaving", Some(3600))
        .await
        .unwrap();
    schedule_deletion(&mut tenants, "staying", Some(86_400))
        .await
        .unwrap();
    let dir = server.data_dir.clone();
    let temp = server.stop().await;
    // An hour later the server starts again; its reaper looks at once.
    clock.advance(Duration::from_secs(3600));
    let mut options = test_options(&dir);
    options.clock = shared;
    let server = TestServer::start_with(options).await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    // The reaper is another task: wait (bounded) for its audit record, written after the
    // destruction.
    let mut records = Vec::new();
    for _ in 0..400 {
        records = audit_events(&mut audit, "leaving", "DestroyTenant").await;
        if !records.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(records.len(), 1, "the reaper left a due tenant");
    assert_eq!(records[0].caller, "server:reaper");
    assert_eq!(records[0].outcome, "ok");
    assert_failed_precondition(
        &get_tenant(&mut tenants, "leaving").await.status_err(),
        "tenant destroyed",
    );
    let err = decrypt(&mut keys, "leaving", "ctx", &ct.ciphertext, b"row")
        .await
        .status_err();
    assert_failed_precondition(&err, "tenant destroyed");
    assert!(wrapped_keys(&dir, "leaving").is_empty());
    assert_eq!(
        get_tenant(&mut tenants, "staying").await.unwrap().state,
        pb::TenantState::PendingDeletion as i32
    );
    server.stop().await;
    drop(temp);
}

#[tokio::test]
async fn deletion_window_is_never_below_the_server_minimum() {
    let temp = tempfile::tempdir().unwrap();
    let mut options = test_options(&temp.path().join("data"));
    options.min_deletion_window_seconds = 86_400;
    let server = TestServer::start_with(options).await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    for waiting in [0, 3600, 86_399] {
        let err = schedule_deletion(&mut tenants, "acme", Some(waiting))
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("--min-deletion-window"), "{err:?}");
    }
    assert_eq!(
        get_tenant(&mut tenants, "acme").await.unwrap().state,
        pb::TenantState::Active as i32
    );
    let t = schedule_deletion(&mut tenants, "acme", Some(86_400))
        .await
        .unwrap();
    assert_eq!(t.state, pb::TenantState::PendingDeletion as i32);
}

#[tokio::test]
async fn a_key_cached_before_a_change_never_serves_a_call_after_it() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    // Warm the cache: key loaded, value keys derived, budget reserved.
    let ct = try_encrypt(&mut keys, "acme", b"v")
        .await
        .unwrap()
        .ciphertext;
    decrypt(&mut keys, "acme", "ctx", &ct, b"row")
        .await
        .unwrap();
    assert!(server.state.keys.cached(&"acme".parse_tenant()).is_some());
    suspend_tenant(&mut tenants, "acme").await.unwrap();
    // The very next calls are refused.
    assert_failed_precondition(
        &try_encrypt(&mut keys, "acme", b"v").await.status_err(),
        "SUSPENDED",
    );
    assert_failed_precondition(
        &decrypt(&mut keys, "acme", "ctx", &ct, b"row")
            .await
            .status_err(),
        "SUSPENDED",
    );
    resume_tenant(&mut tenants, "acme").await.unwrap();
    assert!(try_encrypt(&mut keys, "acme", b"v").await.is_ok());

    // Same for a version: warm v1, rotate, disable v1: the next decrypt of v1 is refused.
    decrypt(&mut keys, "acme", "ctx", &ct, b"row")
        .await
        .unwrap();
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let next = try_encrypt(&mut keys, "acme", b"v").await.unwrap();
    assert_eq!(next.key_version, 2, "the rotation is seen at once");
    disable_key_version(&mut tenants, "acme", 1).await.unwrap();
    assert_failed_precondition(
        &decrypt(&mut keys, "acme", "ctx", &ct, b"row")
            .await
            .status_err(),
        "DISABLED",
    );
    // And a destruction.
    schedule_deletion(&mut tenants, "acme", Some(0))
        .await
        .unwrap();
    let err = try_encrypt(&mut keys, "acme", b"v").await.status_err();
    assert_failed_precondition(&err, "tenant destroyed");
}

trait ParseTenant {
    fn parse_tenant(&self) -> tenant_kms::domain::TenantId;
}

impl ParseTenant for &str {
    fn parse_tenant(&self) -> tenant_kms::domain::TenantId {
        tenant_kms::domain::TenantId::parse(self).unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// Crypto-shredding
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shredding_leaves_no_key_byte_in_any_file_and_the_id_is_never_reused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "doomed").await;
    create_tenant(&mut tenants, "keeper").await;
    let mut doomed_cts = Vec::new();
    for i in 0..20 {
        doomed_cts.push(
            try_encrypt(&mut keys, "doomed", format!("secret {i}").as_bytes())
                .await
                .unwrap()
                .ciphertext,
        );
        if i == 9 {
            rotate_tenant(&mut tenants, "doomed").await.unwrap();
        }
    }
    let keeper_v1 = try_encrypt(&mut keys, "keeper", b"k1").await.unwrap();
    rotate_tenant(&mut tenants, "keeper").await.unwrap();
    let keeper_v2 = try_encrypt(&mut keys, "keeper", b"k2").await.unwrap();

    // Capture every wrapping the doomed keys ever had: under master v1, then (after a
    // master rotation by the command, while this server runs) under master v2.
    let mut needles: Vec<Vec<u8>> = Vec::new();
    let before = wrapped_keys(&dir, "doomed");
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|(_, master, _)| *master == 1));
    needles.extend(before.iter().map(|(_, _, bytes)| bytes.clone()));
    let (code, summary, err) = rotate_json(&dir, &["--master"]).await;
    assert_eq!(code, 0, "{summary} {err}");
    let after = wrapped_keys(&dir, "doomed");
    assert!(after.iter().all(|(_, master, _)| *master == 2));
    needles.extend(after.iter().map(|(_, _, bytes)| bytes.clone()));
    // The running server follows the master rotation: old values still decrypt, and keys
    // it creates now are wrapped under the new master version.
    let back = decrypt(&mut keys, "doomed", "ctx", &doomed_cts[0], b"row")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"secret 0");
    create_tenant(&mut tenants, "newcomer").await;
    assert_eq!(wrapped_keys(&dir, "newcomer")[0].1, 2);
    assert_eq!(server.state.keys.primary_master_version(), 2);

    // Destroying one version of another tenant shreds just that version.
    let keeper_keys = wrapped_keys(&dir, "keeper");
    destroy_key_version(&mut tenants, "keeper", 1)
        .await
        .unwrap();
    let keeper_v1_bytes = &keeper_keys[0].2;
    assert_eq!(
        files_containing(&dir, keeper_v1_bytes),
        Vec::<std::path::PathBuf>::new(),
        "a destroyed key version left bytes behind"
    );
    assert_eq!(wrapped_keys(&dir, "keeper").len(), 1);

    // The needles are really findable before destruction (the scan is not vacuous).
    assert!(!files_containing(&dir, &needles[2]).is_empty());

    // Destroy the tenant (a zero window: the test server's minimum is 0s).
    let destroyed = schedule_deletion(&mut tenants, "doomed", Some(0))
        .await
        .unwrap();
    assert_eq!(destroyed.state, pb::TenantState::Destroyed as i32);
    assert!(destroyed.destroyed_at.is_some());
    let scan = |dir: &Path| {
        for needle in &needles {
            // The whole wrapped key, and its sealed middle alone.
            for part in [&needle[..], &needle[12..44]] {
                assert_eq!(
                    files_containing(dir, part),
                    Vec::<std::path::PathBuf>::new(),
                    "wrapped key bytes survive destruction"
                );
            }
        }
    };
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().any(|f| f == "keys.db-wal"), "{files:?}");
    scan(&dir);
    assert!(wrapped_keys(&dir, "doomed").is_empty());

    // Old ciphertexts fail, the id cannot come back, every call says "tenant destroyed".
    for ct in &doomed_cts {
        let err = decrypt(&mut keys, "doomed", "ctx", ct, b"row")
            .await
            .status_err();
        assert_failed_precondition(&err, "tenant destroyed");
    }
    let err = try_create_tenant(&mut tenants, "doomed").await.status_err();
    assert_failed_precondition(&err, "tenant destroyed");
    let versions_err = tenants
        .list_key_versions(pb::ListKeyVersionsRequest {
            tenant_id: "doomed".into(),
        })
        .await
        .status_err();
    assert_failed_precondition(&versions_err, "tenant destroyed");
    // Its audit history stays whole and readable.
    let history = audit_events(&mut audit, "doomed", "").await;
    assert!(history.iter().any(|e| e.operation == "CreateTenant"));
    assert!(history.iter().filter(|e| e.operation == "Encrypt").count() >= 20);
    assert!(
        history
            .iter()
            .any(|e| e.operation == "ScheduleTenantDeletion")
    );
    let verified = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok);

    // The other tenant is untouched: its surviving version decrypts.
    let back = decrypt(&mut keys, "keeper", "ctx", &keeper_v2.ciphertext, b"row")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"k2");
    let err = decrypt(&mut keys, "keeper", "ctx", &keeper_v1.ciphertext, b"row")
        .await
        .status_err();
    assert_failed_precondition(&err, "DESTROYED");

    // Forever: after a restart nothing has come back.
    drop((keys, tenants, audit));
    server.stop().await;
    scan(&dir);
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, _, _) = server.clients().await;
    let err = decrypt(&mut keys, "doomed", "ctx", &doomed_cts[15], b"row")
        .await
        .status_err();
    assert_failed_precondition(&err, "tenant destroyed");
    server.stop().await;
    scan(&dir);
}

// ---------------------------------------------------------------------------------------
// Nonce budget
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_budget_rotates_the_key_at_max_encryptions() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let t = set_rotation_policy(&mut tenants, "acme", 0, 1000)
        .await
        .unwrap();
    assert_eq!(t.rotation_policy.unwrap().max_encryptions, 1000);
    // 990 in a batch and 10 one by one: all under v1.
    let batch = encrypt_batch(&mut keys, "acme", 990).await.unwrap();
    assert!(batch.iter().all(|o| o.key_version == 1));
    for _ in 0..10 {
        let out = try_encrypt(&mut keys, "acme", b"v").await.unwrap();
        assert_eq!(header_version(&out.ciphertext), 1);
    }
    // The 1,001st is under a new version.
    let out = try_encrypt(&mut keys, "acme", b"v").await.unwrap();
    assert_eq!((out.key_version, header_version(&out.ciphertext)), (2, 2));
    let list = key_versions(&mut tenants, "acme").await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].encryptions, 1000, "exactly the budget, never more");
    assert!(list[1].primary);
    // v1 values still decrypt.
    decrypt(&mut keys, "acme", "ctx", &batch[0].ciphertext, b"")
        .await
        .unwrap();
    // The automatic rotation is audited.
    let rotations = audit_events(&mut audit, "acme", "RotateTenantKey").await;
    assert_eq!(rotations.len(), 1);
    assert_eq!(rotations[0].caller, "server:nonce-budget");
    assert_eq!(rotations[0].key_versions, vec![1, 2]);

    // Batches that straddle the budget go whole under the next version (one version per
    // batch), the old version never passes its budget, and a batch larger than the whole
    // budget is refused.
    create_tenant(&mut tenants, "straddle").await;
    set_rotation_policy(&mut tenants, "straddle", 0, 1000)
        .await
        .unwrap();
    let first = encrypt_batch(&mut keys, "straddle", 600).await.unwrap();
    assert!(first.iter().all(|o| o.key_version == 1));
    let second = encrypt_batch(&mut keys, "straddle", 600).await.unwrap();
    assert!(second.iter().all(|o| o.key_version == 2));
    let list = key_versions(&mut tenants, "straddle").await;
    assert!(list[0].encryptions <= 1000);
    let err = encrypt_batch(&mut keys, "straddle", 1001)
        .await
        .status_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("max_encryptions"), "{err:?}");
    // Policy bounds: above 2^32 is refused (NIST SP 800-38D); 0 means the server default.
    let err = set_rotation_policy(&mut tenants, "straddle", 0, (1 << 32) + 1)
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let t = set_rotation_policy(&mut tenants, "straddle", 0, 0)
        .await
        .unwrap();
    assert_eq!(t.rotation_policy.unwrap().max_encryptions, 1 << 30);
}

#[tokio::test]
async fn the_budget_count_never_goes_back_across_a_crash() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let token = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    set_rotation_policy(&mut tenants, "acme", 0, 1000)
        .await
        .unwrap();
    for _ in 0..5 {
        try_encrypt(&mut keys, "acme", b"v").await.unwrap();
    }
    // Reserved ahead: the store already counts a whole reservation (64), not 5.
    let reserved = key_versions(&mut tenants, "acme").await[0].encryptions;
    assert_eq!(reserved, 64);
    server.kill9();

    let server = BinaryServer::start(&dir, &[]).await;
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    assert_eq!(
        key_versions(&mut tenants, "acme").await[0].encryptions,
        64,
        "the count did not go back"
    );
    // Rounded up: the 59 seals reserved but unused before the crash count as used, so v1
    // has exactly 1000 - 64 seals left.
    let batch = encrypt_batch(&mut keys, "acme", 936).await.unwrap();
    assert!(batch.iter().all(|o| o.key_version == 1));
    assert_eq!(
        key_versions(&mut tenants, "acme").await[0].encryptions,
        1000
    );
    let out = try_encrypt(&mut keys, "acme", b"v").await.unwrap();
    assert_eq!(out.key_version, 2);
    server.terminate().await;
}

// ---------------------------------------------------------------------------------------
// The rotate command
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rotate_tenant_from_the_command_line_reaches_a_running_server() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let token = server.admin_token();
    let (mut keys, mut tenants, mut audit) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    // Warm the server's cache with v1.
    let v1 = try_encrypt(&mut keys, "acme", b"one").await.unwrap();
    assert_eq!(v1.key_version, 1);

    // --dry-run changes nothing.
    let (code, summary, _) = rotate_json(&dir, &["--tenant", "acme", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert_eq!(summary["dry_run"], true);
    assert_eq!(summary["actions"][0]["ok"], true);
    assert!(
        summary["actions"][0]["result"]
            .as_str()
            .unwrap()
            .contains("v2")
    );
    assert_eq!(key_versions(&mut tenants, "acme").await.len(), 1);
    assert_eq!(
        try_encrypt(&mut keys, "acme", b"x")
            .await
            .unwrap()
            .key_version,
        1
    );

    // The real thing: the server's next Encrypt uses v2, without a restart.
    let (code, summary, err) = rotate_json(&dir, &["--tenant", "acme"]).await;
    assert_eq!(code, 0, "{summary} {err}");
    assert_eq!(summary["failures"], 0);
    assert_eq!(summary["actions"][0]["action"], "rotate");
    assert_eq!(summary["actions"][0]["target"], "acme");
    let v2 = try_encrypt(&mut keys, "acme", b"two").await.unwrap();
    assert_eq!((v2.key_version, header_version(&v2.ciphertext)), (2, 2));
    let back = decrypt(&mut keys, "acme", "ctx", &v1.ciphertext, b"row")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"one");

    // The table output, again through the running server.
    let (code, out, _) = cli(&[
        "rotate",
        "--tenant",
        "acme",
        "--data-dir",
        dir.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0);
    assert!(out.starts_with("ACTION"), "{out}");
    assert!(out.contains("primary is now v3"), "{out}");
    assert_eq!(
        try_encrypt(&mut keys, "acme", b"x")
            .await
            .unwrap()
            .key_version,
        3
    );
    // And through the server's own RPC (client command).
    let url = server.url();
    let token_file = dir.join("admin.token");
    let client = [
        "--addr",
        url.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let (code, out, err) = cli(&[&["tenant", "rotate", "acme"][..], &client].concat()).await;
    assert_eq!(code, 0, "{err}");
    let t: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(t["primary_version"], 4);

    // Failures are named and make the exit code non-zero; usage errors are 2.
    let (code, summary, err) = rotate_json(&dir, &["--tenant", "ghost"]).await;
    assert_eq!(code, 1);
    assert_eq!(summary["failures"], 1);
    assert_eq!(summary["actions"][0]["ok"], false);
    assert!(
        summary["actions"][0]["result"]
            .as_str()
            .unwrap()
            .contains("not found")
    );
    assert!(err.contains("ghost"), "{err}");
    let (code, summary, _) = rotate_json(&dir, &["--tenant", "ghost", "--dry-run"]).await;
    assert_eq!((code, summary["failures"].as_u64()), (1, Some(1)));
    let (code, _, _) = cli(&["rotate", "--data-dir", dir.to_str().unwrap()]).await;
    assert_eq!(code, 2, "no --tenant/--due/--master");
    let (code, _, _) = cli(&[
        "rotate",
        "--due",
        "--master",
        "--data-dir",
        dir.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 2, "conflicting modes");
    let missing = temp.path().join("nowhere");
    let (code, summary, _) = rotate_json(&missing, &["--due"]).await;
    assert_eq!(code, 1);
    assert!(
        summary["actions"][0]["result"]
            .as_str()
            .unwrap()
            .contains("no keys.db")
    );

    // Audited as cli:<user>, in the same chain as the server's records.
    let rotations = audit_events(&mut audit, "acme", "RotateTenantKey").await;
    let callers: Vec<&str> = rotations.iter().map(|e| e.caller.as_str()).collect();
    let cli_caller = format!("cli:{OPERATOR}");
    assert_eq!(
        callers.iter().filter(|c| **c == cli_caller).count(),
        2,
        "{callers:?}"
    );
    let cli_ok = rotations.iter().find(|e| e.caller == cli_caller).unwrap();
    assert_eq!(
        (cli_ok.outcome.as_str(), cli_ok.key_versions.as_slice()),
        ("ok", &[2][..])
    );
    let failed = audit_events(&mut audit, "ghost", "RotateTenantKey").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].outcome, "not_found");
    server.terminate().await;
    let (code, out, err) = cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out} {err}");
}

#[tokio::test]
async fn rotate_due_rotates_by_age_and_budget_and_completes_due_deletions() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    // The server and every command run on one clock the test moves: an hour passes in an
    // instant.
    let clock = ProcessClock::new();
    let server = BinaryServer::start_on_clock(&dir, &[], &clock).await;
    let token = server.admin_token();
    let (mut keys, mut tenants, mut audit) = clients(&server.url(), Some(&token)).await;
    for id in ["aged", "budget", "fresh", "leaving", "staying", "late"] {
        create_tenant(&mut tenants, id).await;
    }
    set_rotation_policy(&mut tenants, "aged", 3600, 0)
        .await
        .unwrap();
    set_rotation_policy(&mut tenants, "fresh", 86_400, 0)
        .await
        .unwrap();
    // One seal reserves 64 of a budget of 64: past the 90% mark.
    set_rotation_policy(&mut tenants, "budget", 0, 64)
        .await
        .unwrap();
    try_encrypt(&mut keys, "budget", b"v").await.unwrap();
    let leaving_ct = try_encrypt(&mut keys, "leaving", b"bye").await.unwrap();
    schedule_deletion(&mut tenants, "leaving", Some(3600))
        .await
        .unwrap();
    schedule_deletion(&mut tenants, "late", Some(3600))
        .await
        .unwrap();
    schedule_deletion(&mut tenants, "staying", Some(86_400))
        .await
        .unwrap();
    // Before the hour is up only the budget is due, and a deletion can still be cancelled
    // (and scheduled again).
    let (code, summary, _) = rotate_json_on(&dir, &["--due", "--dry-run"], Some(&clock)).await;
    assert_eq!(code, 0);
    let actions = summary["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "{summary}");
    assert_eq!(actions[0]["target"], "budget", "{summary}");
    cancel_deletion(&mut tenants, "late").await.unwrap();
    schedule_deletion(&mut tenants, "late", Some(3600))
        .await
        .unwrap();
    // The hour-long period and windows pass.
    clock.advance(3600);

    // A deletion whose window has passed can no longer be cancelled.
    let err = cancel_deletion(&mut tenants, "late").await.status_err();
    assert_failed_precondition(&err, "window has passed");

    // Dry run: the plan, and nothing changes.
    let (code, summary, _) = rotate_json_on(&dir, &["--due", "--dry-run"], Some(&clock)).await;
    assert_eq!(code, 0);
    let plan: Vec<(String, String)> = summary["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_owned(),
                a["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("rotate", "aged"),
        ("rotate", "budget"),
        ("destroy", "late"),
        ("destroy", "leaving"),
    ]
    .iter()
    .map(|(a, t)| (a.to_string(), t.to_string()))
    .collect();
    assert_eq!(plan, expected);
    assert_eq!(key_versions(&mut tenants, "aged").await.len(), 1);
    assert_eq!(
        get_tenant(&mut tenants, "leaving").await.unwrap().state,
        pb::TenantState::PendingDeletion as i32
    );

    let (code, summary, err) = rotate_json_on(&dir, &["--due"], Some(&clock)).await;
    assert_eq!(code, 0, "{summary} {err}");
    assert_eq!(summary["failures"], 0);
    assert_eq!(summary["actions"].as_array().unwrap().len(), 4);
    // The running server sees all of it on its next calls.
    assert_eq!(
        try_encrypt(&mut keys, "aged", b"v")
            .await
            .unwrap()
            .key_version,
        2
    );
    assert_eq!(
        try_encrypt(&mut keys, "budget", b"v")
            .await
            .unwrap()
            .key_version,
        2
    );
    assert_eq!(
        try_encrypt(&mut keys, "fresh", b"v")
            .await
            .unwrap()
            .key_version,
        1
    );
    for id in ["leaving", "late"] {
        assert_failed_precondition(
            &get_tenant(&mut tenants, id).await.status_err(),
            "tenant destroyed",
        );
    }
    let err = decrypt(&mut keys, "leaving", "ctx", &leaving_ct.ciphertext, b"row")
        .await
        .status_err();
    assert_failed_precondition(&err, "tenant destroyed");
    assert!(wrapped_keys(&dir, "leaving").is_empty());
    assert_eq!(
        get_tenant(&mut tenants, "staying").await.unwrap().state,
        pb::TenantState::PendingDeletion as i32
    );
    // Audited as the operator.
    let destroyed = audit_events(&mut audit, "leaving", "DestroyTenant").await;
    assert_eq!(destroyed.len(), 1);
    assert_eq!(destroyed[0].caller, format!("cli:{OPERATOR}"));
    assert_eq!(destroyed[0].outcome, "ok");
    let rotated = audit_events(&mut audit, "budget", "RotateTenantKey").await;
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0].caller, format!("cli:{OPERATOR}"));
    server.terminate().await;

    // Without a server too (cron on a stopped service). "budget" is due again (one seal
    // reserved 64 of its new version's 64); the destroyed and the fresh are not touched.
    let (code, summary, _) = rotate_json_on(&dir, &["--due"], Some(&clock)).await;
    assert_eq!(code, 0);
    let targets: Vec<&str> = summary["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].as_str().unwrap())
        .collect();
    assert!(targets.contains(&"budget"), "{targets:?}");
    for id in ["leaving", "late", "fresh", "staying"] {
        assert!(!targets.contains(&id), "{targets:?}");
    }
    assert_eq!(wrapped_keys(&dir, "budget").len(), 3);
}

#[tokio::test]
async fn lifecycle_client_commands() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let url = server.url();
    let token_file = dir.join("admin.token");
    let client = [
        "--addr",
        url.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let run = |args: &[&str]| {
        let all: Vec<String> = args
            .iter()
            .chain(client.iter())
            .map(|s| s.to_string())
            .collect();
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            cli(&refs).await
        }
    };
    let state_of = |out: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["state"].as_str().unwrap().to_owned()
    };
    let (code, _, err) = run(&["tenant", "create", "acme"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&["tenant", "suspend", "acme"]).await;
    assert_eq!(
        (code, state_of(&out).as_str()),
        (0, "TENANT_STATE_SUSPENDED")
    );
    let (code, _, err) = run(&["tenant", "suspend", "acme"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("FailedPrecondition") && err.contains("SUSPENDED"),
        "{err}"
    );
    let (code, out, _) = run(&["tenant", "resume", "acme"]).await;
    assert_eq!((code, state_of(&out).as_str()), (0, "TENANT_STATE_ACTIVE"));
    let (code, out, _) = run(&["tenant", "delete", "acme", "--window", "7d"]).await;
    assert_eq!(
        (code, state_of(&out).as_str()),
        (0, "TENANT_STATE_PENDING_DELETION")
    );
    let (code, out, _) = run(&["tenant", "cancel-delete", "acme"]).await;
    assert_eq!((code, state_of(&out).as_str()), (0, "TENANT_STATE_ACTIVE"));
    let (code, _, _) = run(&["tenant", "rotate", "acme"]).await;
    assert_eq!(code, 0);
    let (code, out, _) = run(&["tenant", "versions", "acme"]).await;
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["state"], "KEY_VERSION_STATE_ENABLED");
    assert_eq!(lines[1]["primary"], true);
    let (code, out, _) = run(&["tenant", "delete", "acme", "--window", "0s"]).await;
    assert_eq!(
        (code, state_of(&out).as_str()),
        (0, "TENANT_STATE_DESTROYED")
    );
    let (code, _, err) = run(&["tenant", "resume", "acme"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("tenant destroyed"), "{err}");
    let (code, _, err) = run(&["tenant", "create", "acme"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("tenant destroyed"), "{err}");
    // Each change is in the audit, with its caller.
    let token = server.admin_token();
    let (_, _, mut audit) = clients(&url, Some(&token)).await;
    let ops: Vec<String> = audit_events(&mut audit, "acme", "")
        .await
        .into_iter()
        .filter(|e| e.outcome == "ok")
        .map(|e| e.operation)
        .collect();
    for op in [
        "CreateTenant",
        "SuspendTenant",
        "ResumeTenant",
        "ScheduleTenantDeletion",
        "CancelTenantDeletion",
        "RotateTenantKey",
        "ListKeyVersions",
    ] {
        assert!(ops.iter().any(|o| o == op), "{op} not audited: {ops:?}");
    }
    server.terminate().await;
}

// ---------------------------------------------------------------------------------------
// Master-key rotation: 10,000 tenants, SIGKILL mid-way, resume
// ---------------------------------------------------------------------------------------

const MANY: usize = 10_000;

/// Decrypts every (tenant, ciphertext, plaintext) through `url`, 32 calls in flight.
async fn decrypt_all(url: &str, token: &str, items: &[(String, Vec<u8>, Vec<u8>)]) {
    let (keys, _, _) = clients(url, Some(token)).await;
    let mut tasks = Vec::new();
    for chunk in items.chunks(items.len().div_ceil(32)) {
        let chunk = chunk.to_vec();
        let mut keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for (tenant, ct, plain) in chunk {
                let back = decrypt(&mut keys, &tenant, "ctx", &ct, b"row")
                    .await
                    .unwrap_or_else(|e| panic!("{tenant}: {e:?}"));
                assert_eq!(back.plaintext, plain, "{tenant}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Creates `MANY` tenants and one ciphertext each, fast, in a setup step outside the
/// server: one store transaction for all tenants (`KeyManager::create_tenants`, one fsync
/// instead of 10,000) and values sealed in-process with the tenant's own derived key (the
/// code path of `Encrypt`, minus an audited RPC and a budget reservation per tenant, which
/// would cost two fsyncs each). A hundred more values are encrypted through the server.
async fn many_tenants(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    use tenant_kms::crypto::envelope::{self, Purpose};
    use tenant_kms::service::ServiceOptions;
    use tenant_kms::service::state::DataDir;
    let options = ServiceOptions::new(dir);
    let items = tokio::task::spawn_blocking(move || {
        let data = DataDir::open(&options, true).unwrap();
        let ids: Vec<tenant_kms::domain::TenantId> = (0..MANY)
            .map(|i| format!("tenant-{i:05}").as_str().parse_tenant())
            .collect();
        data.keys.create_tenants(&ids).unwrap();
        ids.iter()
            .map(|id| {
                let entry = data.keys.tenant(id).unwrap();
                let key = entry.value_key(1, Purpose::Field, "ctx").unwrap();
                let plain = format!("value of {id}").into_bytes();
                let ct = envelope::seal_value(
                    &key,
                    Purpose::Field,
                    1,
                    id.as_str(),
                    "ctx",
                    b"row",
                    &plain,
                )
                .unwrap();
                (id.as_str().to_owned(), ct, plain)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let server = BinaryServer::start(dir, &[]).await;
    let (mut keys, _, _) = clients(&server.url(), Some(&server.admin_token())).await;
    let mut items = items;
    for i in (0..MANY).step_by(MANY / 100) {
        let tenant = format!("tenant-{i:05}");
        let plain = format!("through the server {i}").into_bytes();
        let ct = try_encrypt(&mut keys, &tenant, &plain)
            .await
            .unwrap()
            .ciphertext;
        items.push((tenant, ct, plain));
    }
    server.terminate().await;
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_rotation_killed_midway_resumes_and_everything_decrypts() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let items = many_tenants(&dir).await;
    assert_eq!(items.len(), MANY + 100);
    assert_eq!(master_state(&dir, 1).0, MANY as i64);

    // Start the rotation throttled (20 batches of 500, 100 ms apart) and SIGKILL it as soon
    // as its first batch is committed.
    let mut child = Command::new(BIN)
        .args([
            "rotate",
            "--master",
            "--batch",
            "500",
            "--batch-pause",
            "100ms",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .env("USER", OPERATOR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("rotate --master showed no progress");
        if line.starts_with("re-wrapped") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (under_old, retired) = master_state(&dir, 1);
    let (under_new, _) = master_state(&dir, 2);
    assert!(
        under_old > 0 && under_new > 0,
        "the kill must land mid-way: {under_old} under v1, {under_new} under v2"
    );
    assert!(!retired);
    assert_eq!(under_old + under_new, MANY as i64);

    // Half-way, nothing is unreadable: a server on the directory decrypts values whose keys
    // are under either master version.
    let server = BinaryServer::start(&dir, &[]).await;
    let token = server.admin_token();
    let sample: Vec<_> = items.iter().step_by(37).cloned().collect();
    let moved = tenants_under(&dir, 2);
    assert!(sample.iter().any(|(t, _, _)| moved.contains(t)));
    assert!(sample.iter().any(|(t, _, _)| !moved.contains(t)));
    decrypt_all(&server.url(), &token, &sample).await;
    server.terminate().await;

    // Run again: it resumes (no third master version), finishes and retires v1.
    let (code, summary, err) = rotate_json(&dir, &["--master"]).await;
    assert_eq!(code, 0, "{summary} {err}");
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(summary["master"]["primary_master_version"], 2);
    assert_eq!(summary["master"]["retired"], serde_json::json!([1]));
    assert_eq!(summary["master"]["rewrapped"], under_old);
    assert_eq!(master_state(&dir, 1), (0, true));
    assert_eq!(master_state(&dir, 2).0, MANY as i64);
    let keyring = std::fs::read_to_string(dir.join("master.keyring")).unwrap();
    assert_eq!(
        keyring.lines().filter(|l| !l.starts_with('#')).count(),
        2,
        "resumed, not restarted"
    );

    // Every tenant's old ciphertexts decrypt through a restarted server.
    let server = BinaryServer::start(&dir, &[]).await;
    decrypt_all(&server.url(), &token, &items).await;
    server.terminate().await;

    // Audited: the new version, each batch, the retirement; the chain verifies.
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    let count = |op: &str| -> i64 {
        conn.query_row(
            "SELECT COUNT(*) FROM audit_events WHERE operation = ?1 AND caller = ?2",
            [op, &format!("cli:{OPERATOR}")],
            |row| row.get(0),
        )
        .unwrap()
    };
    assert_eq!(count("RotateMasterKey"), 1);
    assert!(count("RewrapTenantKeys") >= 2);
    assert_eq!(count("RetireMasterKey"), 1);
    drop(conn);
    let (code, out, _) = cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}");
    // A kill after the last batch but before the retirement: the next run only retires.
    {
        let conn = rusqlite::Connection::open(dir.join("keys.db")).unwrap();
        conn.execute(
            "UPDATE master_keys SET retired_at = NULL WHERE version = 1",
            [],
        )
        .unwrap();
    }
    let (code, summary, err) = rotate_json(&dir, &["--master"]).await;
    assert_eq!(code, 0, "{summary} {err}");
    assert_eq!(summary["master"]["rewrapped"], 0);
    assert_eq!(summary["master"]["retired"], serde_json::json!([1]));
    assert_eq!(master_state(&dir, 1), (0, true));

    // A further dry run plans a fresh rotation; a full, uninterrupted one then moves all
    // 10,000 keys (its rate is printed for the docs: run with --nocapture).
    let (code, summary, _) = rotate_json(&dir, &["--master", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(
        summary["actions"][0]["result"]
            .as_str()
            .unwrap()
            .contains("would create master v3")
    );
    let (code, summary, err) = rotate_json(&dir, &["--master"]).await;
    assert_eq!(code, 0, "{summary} {err}");
    assert_eq!(summary["master"]["rewrapped"], MANY as u64);
    assert_eq!(summary["master"]["retired"], serde_json::json!([2]));
    println!(
        "rotate --master over {MANY} tenants: {}",
        summary["actions"][0]["result"]
    );
    let server = BinaryServer::start(&dir, &[]).await;
    let sample: Vec<_> = items.iter().step_by(101).cloned().collect();
    decrypt_all(&server.url(), &token, &sample).await;
    server.terminate().await;
}
