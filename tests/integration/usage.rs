//! Usage accounting (issue 16, item 1) through the real server: `GetUsage` per tenant over a
//! time range, its authorization and audit, persistence across a restart, bounded labels in
//! `/metrics`, and the `usage` command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tenant_kms::auth::{Role, TokenSpec, issue_token};
use tenant_kms::clock::{ManualClock, SharedClock};
use tenant_kms::pb;
use tonic::Code;

/// 2027-01-15T08:00:00Z, a whole minute.
const START_MICROS: i64 = 1_800_000_000 / 60 * 60 * 1_000_000;

fn issue(server: &TestServer, role: Role, tenants: &str) -> (String, String) {
    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "usage-test".into(),
            role,
            tenants: tenants.into(),
            operations: "*".into(),
            ttl_seconds: None,
        },
        server.state.options.clock.as_ref(),
    )
    .unwrap();
    (
        issued.secret.as_str().to_owned(),
        format!("token:{}", issued.record.id),
    )
}

fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

async fn usage(
    audit: &mut Audit,
    tenant: &str,
    since: Option<prost_types::Timestamp>,
    until: Option<prost_types::Timestamp>,
) -> Result<pb::GetUsageResponse, tonic::Status> {
    audit
        .get_usage(pb::GetUsageRequest {
            tenant_id: tenant.into(),
            since,
            until,
        })
        .await
        .map(|r| r.into_inner())
}

fn entry<'a>(
    u: &'a pb::GetUsageResponse,
    caller: &str,
    operation: &str,
    outcome: &str,
) -> &'a pb::UsageEntry {
    u.entries
        .iter()
        .find(|e| e.caller == caller && e.operation == operation && e.outcome == outcome)
        .unwrap_or_else(|| panic!("no {caller} {operation} {outcome} in {u:?}"))
}

/// Calls of `caller` in `u`.
fn calls_of(u: &pb::GetUsageResponse, caller: &str) -> u64 {
    u.entries
        .iter()
        .filter(|e| e.caller == caller)
        .map(|e| e.calls)
        .sum()
}

#[tokio::test]
async fn usage_is_counted_per_caller_operation_and_outcome_and_survives_a_restart() {
    let clock = ManualClock::at_micros(START_MICROS);
    let shared: SharedClock = clock.clone();
    let temp = tempfile::tempdir().unwrap();
    let mut options = test_options(&temp.path().join("data"));
    options.clock = Arc::clone(&shared);
    let server = TestServer::start_with(options.clone()).await;
    let (keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "globex").await;
    let (svc, svc_name) = issue(&server, Role::Service, "acme");
    let (auditor, _) = issue(&server, Role::Auditor, "*");
    let (mut svc_keys, _, mut svc_audit) = server.clients_with(Some(&svc)).await;

    let sealed = encrypt(
        &mut svc_keys,
        "acme",
        "users.email",
        b"alice@example.com",
        b"",
    )
    .await;
    encrypt(
        &mut svc_keys,
        "acme",
        "users.email",
        b"bob@example.com",
        b"",
    )
    .await;
    let opened = decrypt(
        &mut svc_keys,
        "acme",
        "users.email",
        &sealed.ciphertext,
        b"",
    )
    .await;
    assert_eq!(opened.unwrap().plaintext, b"alice@example.com");
    let mut tampered = sealed.ciphertext.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let refused = decrypt(&mut svc_keys, "acme", "users.email", &tampered, b"").await;
    assert_eq!(
        refused.err().map(|status| status.code()),
        Some(Code::InvalidArgument)
    );
    let denied = svc_keys
        .encrypt(encrypt_request("globex", "c", b"x", b""))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    let u = usage(&mut audit, "acme", None, None).await.unwrap();
    let sealed_ok = entry(&u, &svc_name, "Encrypt", "ok");
    assert_eq!((sealed_ok.calls, sealed_ok.items), (2, 2));
    assert!(sealed_ok.request_bytes > 0 && sealed_ok.response_bytes > 0);
    assert_eq!(entry(&u, &svc_name, "Decrypt", "ok").calls, 1);
    let bad = entry(&u, &svc_name, "Decrypt", "invalid");
    assert_eq!((bad.calls, bad.response_bytes), (1, 0));
    assert_eq!(u.decrypt_failures, 1);
    assert_eq!(u.denials, 0);
    assert_eq!(calls_of(&u, &svc_name), 4);
    // The admin's CreateTenant is acme's usage too; the totals sum every caller.
    assert_eq!(u.calls, u.entries.iter().map(|e| e.calls).sum::<u64>());
    assert!(u.calls > 4);
    let g = usage(&mut audit, "globex", None, None).await.unwrap();
    assert_eq!(g.denials, 1);
    assert_eq!(entry(&g, &svc_name, "Encrypt", "denied").calls, 1);

    // A later minute, and a range that holds only it.
    clock.advance(Duration::from_secs(120));
    encrypt(
        &mut svc_keys,
        "acme",
        "users.email",
        b"carol@example.com",
        b"",
    )
    .await;
    let later_minute = START_MICROS / 1_000_000 + 120;
    let later = usage(&mut audit, "acme", at(later_minute + 30), None)
        .await
        .unwrap();
    assert_eq!(later.calls, 1);
    assert_eq!(calls_of(&later, &svc_name), 1);
    assert_eq!(later.since, at(later_minute));
    let earlier = usage(&mut audit, "acme", None, at(later_minute))
        .await
        .unwrap();
    assert_eq!(calls_of(&earlier, &svc_name), 4);

    // Bad input: a clear status.
    let reversed = usage(&mut audit, "acme", at(later_minute), at(later_minute - 60)).await;
    assert_eq!(reversed.unwrap_err().code(), Code::InvalidArgument);
    let bad_time = usage(
        &mut audit,
        "acme",
        Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -5,
        }),
        None,
    )
    .await;
    assert_eq!(bad_time.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        usage(&mut audit, "not a tenant!", None, None)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Authorization like the other audit reads: auditors yes, a service token no.
    let (_, _, mut auditor_audit) = server.clients_with(Some(&auditor)).await;
    let seen = usage(&mut auditor_audit, "acme", None, None).await.unwrap();
    assert_eq!(calls_of(&seen, &svc_name), 5);
    let refused = usage(&mut svc_audit, "acme", None, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Every GetUsage is audited.
    let events = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            operation: "GetUsage".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.iter().any(|e| e.outcome == "denied"), "{events:?}");
    assert!(events.iter().filter(|e| e.outcome == "ok").count() >= 4);

    // A clean stop flushes: a new server on the same directory answers the same figures.
    let before = usage(&mut audit, "acme", None, at(later_minute))
        .await
        .unwrap();
    drop((keys, tenants, audit, svc_keys, svc_audit, auditor_audit));
    server.stop().await;
    let again = TestServer::start_with(options).await;
    let (_, _, mut audit) = again.clients().await;
    let after = usage(&mut audit, "acme", None, at(later_minute))
        .await
        .unwrap();
    assert_eq!(after, before);
    assert!(temp.path().join("data/usage.db").exists());
}

#[tokio::test]
async fn usage_metrics_give_the_first_tenants_their_own_label_and_sum_the_rest() {
    let server = TestServer::start_configured(|options| options.usage.metrics_top = 1).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    for tenant in ["first", "second", "third"] {
        create_tenant(&mut tenants, tenant).await;
        encrypt(&mut keys, tenant, "c", b"v", b"").await;
    }
    let out =
        tenant_kms::metrics::encode(tenant_kms::service::server::metrics_extra(&server.state)());
    let calls: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tenant_kms_usage_calls_total{"))
        .collect();
    assert!(
        calls
            .iter()
            .any(|l| l.starts_with("tenant_kms_usage_calls_total{tenant=\"first\"")),
        "{out}"
    );
    let other = calls
        .iter()
        .find(|l| l.contains("tenant=\"other\"") && l.contains("operation=\"Encrypt\""))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(other.ends_with(" 2"), "{other}");
    // No usage series names a tenant past the first (the key-version gauges, which are
    // bounded by the key cache, do).
    let usage: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("tenant_kms_usage_"))
        .collect();
    assert!(
        usage
            .iter()
            .all(|l| !l.contains("\"second\"") && !l.contains("\"third\"")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_command_prints_json_and_a_table() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    encrypt(&mut keys, "acme", "c", b"value", b"").await;
    let url = server.url();
    let token_file = server.data_dir.join("admin.token");
    let token_file = token_file.to_str().unwrap().to_owned();
    let run = move |extra: &'static [&'static str]| {
        let (url, token_file) = (url.clone(), token_file.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "usage",
                "--tenant",
                "acme",
                "--addr",
                &url,
                "--token-file",
                &token_file,
            ];
            args.extend_from_slice(extra);
            run_cli(&args)
        })
    };
    let (code, stdout, stderr) = run(&["--json", "--since", "2020-01-01"]).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["tenant_id"], "acme");
    assert_eq!(json["since"], "2020-01-01T00:00:00Z");
    let encrypts = json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["operation"] == "Encrypt" && e["outcome"] == "ok")
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(encrypts["calls"], "1"); // 64-bit integers print as strings (one JSON style)
    let (code, stdout, stderr) = run(&[]).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("Encrypt") && stdout.contains("total: "),
        "{stdout}"
    );
    let (code, _, stderr) = run(&["--since", "yesterday"]).await.unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("RFC 3339"), "{stderr}");
}

/// The value of the usage series `family` for (`tenant`, `caller`, `operation`) in a scrape.
fn usage_series(out: &str, family: &str, tenant: &str, caller: &str, operation: &str) -> u64 {
    let prefix = format!(
        "tenant_kms_usage_{family}_total{{tenant=\"{tenant}\",caller=\"{caller}\",operation=\"{operation}\"}} "
    );
    out.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {prefix} in {out}"))
        .parse()
        .unwrap()
}

/// Exact items, failed items and bytes for known calls, in `/metrics` and in `GetUsage`: the
/// request bytes are the encoded requests the client sent, the response bytes the encoded
/// answers it received (refused calls answer nothing), the items a batch's size.
#[tokio::test]
async fn usage_counts_exact_items_and_bytes_for_known_calls() {
    use prost::Message;
    let server = TestServer::start().await;
    let (_, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let (svc, caller) = issue(&server, Role::Service, "acme");
    let (mut keys, _, _) = server.clients_with(Some(&svc)).await;

    let one = encrypt_request("acme", "users.email", b"alice@example.com", b"row-1");
    let sealed = keys.encrypt(one.clone()).await.unwrap().into_inner();
    let batch = pb::EncryptBatchRequest {
        tenant_id: "acme".into(),
        items: ["a", "bb", "ccc"]
            .iter()
            .map(|v| pb::EncryptBatchItem {
                context: "users.name".into(),
                plaintext: v.as_bytes().to_vec(),
                aad: Vec::new(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let sealed_batch = keys
        .encrypt_batch(batch.clone())
        .await
        .unwrap()
        .into_inner();
    let Some(pb::encrypt_batch_result::Result::Output(first)) =
        sealed_batch.results[0].result.clone()
    else {
        panic!("the first batch item was not sealed");
    };
    // Three items, one of which does not open (wrong row): a partial batch.
    let open_batch = pb::DecryptBatchRequest {
        tenant_id: "acme".into(),
        items: vec![
            pb::DecryptBatchItem {
                context: "users.email".into(),
                ciphertext: sealed.ciphertext.clone(),
                aad: b"row-1".to_vec(),
            },
            pb::DecryptBatchItem {
                context: "users.email".into(),
                ciphertext: sealed.ciphertext.clone(),
                aad: b"row-2".to_vec(),
            },
            pb::DecryptBatchItem {
                context: "users.name".into(),
                ciphertext: first.ciphertext.clone(),
                aad: Vec::new(),
            },
        ],
    };
    let opened_batch = keys
        .decrypt_batch(open_batch.clone())
        .await
        .unwrap()
        .into_inner();
    let open = |aad: &[u8]| pb::DecryptRequest {
        tenant_id: "acme".into(),
        context: "users.email".into(),
        ciphertext: sealed.ciphertext.clone(),
        aad: aad.to_vec(),
    };
    let opened = keys.decrypt(open(b"row-1")).await.unwrap().into_inner();
    assert!(keys.decrypt(open(b"row-9")).await.is_err());

    let out =
        tenant_kms::metrics::encode(tenant_kms::service::server::metrics_extra(&server.state)());
    let series = |family, operation| usage_series(&out, family, "acme", &caller, operation);
    let expected: [(&str, u64, u64, u64, u64); 4] = [
        // operation, items, failed items, request bytes, response bytes
        (
            "Encrypt",
            1,
            0,
            one.encoded_len() as u64,
            sealed.encoded_len() as u64,
        ),
        (
            "EncryptBatch",
            3,
            0,
            batch.encoded_len() as u64,
            sealed_batch.encoded_len() as u64,
        ),
        (
            "DecryptBatch",
            3,
            1,
            open_batch.encoded_len() as u64,
            opened_batch.encoded_len() as u64,
        ),
        (
            "Decrypt",
            2,
            0,
            (open(b"row-1").encoded_len() + open(b"row-9").encoded_len()) as u64,
            opened.encoded_len() as u64,
        ),
    ];
    let u = usage(&mut audit, "acme", None, None).await.unwrap();
    for (operation, items, failed, request, response) in expected {
        assert_eq!(series("items", operation), items, "{operation}");
        assert_eq!(series("failed_items", operation), failed, "{operation}");
        assert_eq!(series("request_bytes", operation), request, "{operation}");
        assert_eq!(series("response_bytes", operation), response, "{operation}");
        // GetUsage per outcome sums to the same figures.
        let cells: Vec<&pb::UsageEntry> = u
            .entries
            .iter()
            .filter(|e| e.caller == caller && e.operation == operation)
            .collect();
        let sum = |f: fn(&pb::UsageEntry) -> u64| cells.iter().map(|e| f(e)).sum::<u64>();
        assert_eq!(sum(|e| e.items), items, "{operation}");
        assert_eq!(sum(|e| e.failed_items), failed, "{operation}");
        assert_eq!(sum(|e| e.request_bytes), request, "{operation}");
        assert_eq!(sum(|e| e.response_bytes), response, "{operation}");
    }
    assert_eq!(entry(&u, &caller, "DecryptBatch", "partial").calls, 1);
    assert_eq!(entry(&u, &caller, "Decrypt", "invalid").response_bytes, 0);
}
