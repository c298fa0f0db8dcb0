//! Issue 7: the metrics endpoint and the hot-path mechanisms behind the bench's figures
//! (grouped nonce-budget reservations, the single-flight change check); issue 12: the bench is
//! not the product (no benchmark service in the default server). The load generator itself,
//! its echo baseline and the churn soak are tested in the bench crate (`bench/tests/`).
//!
//! No test here asserts a speed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::*;
use tenant_kms::store::{ChangeDetection, MasterKeyStore, SqliteKeyStore, TokenStore};

/// GET `path` over plain HTTP/1.1; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[tokio::test]
async fn metrics_endpoint_reports_rpcs_audit_cache_and_budget() {
    let temp = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let server = BinaryServer::start(
        &temp.path().join("data"),
        &["--metrics-listen", &metrics_addr],
    )
    .await;
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    create_tenant(&mut tenants, "metered").await;
    for _ in 0..3 {
        encrypt(&mut keys, "metered", "ctx", b"value", b"").await;
    }
    let refused = decrypt(&mut keys, "metered", "ctx", b"not a ciphertext", b"").await;
    assert!(refused.is_err());

    let (status, body) = http_get(&metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    for needle in [
        "tenant_kms_rpc_total{method=\"Encrypt\",outcome=\"ok\"} 3",
        "tenant_kms_rpc_total{method=\"Decrypt\",outcome=\"invalid\"} 1",
        "tenant_kms_rpc_total{method=\"CreateTenant\",outcome=\"ok\"} 1",
        "tenant_kms_rpc_duration_seconds_bucket{method=\"Encrypt\",le=\"0.00005\"}",
        "tenant_kms_rpc_duration_seconds_count{method=\"Encrypt\"} 3",
        "tenant_kms_audit_batch_records_bucket{le=\"1\"}",
        "tenant_kms_audit_commit_seconds_count",
        "tenant_kms_key_cache_hits_total",
        "tenant_kms_key_cache_misses_total",
        "tenant_kms_key_cache_tenants 1",
        "tenant_kms_key_version_encryptions{tenant=\"metered\",version=\"1\"}",
        "tenant_kms_key_version_max_encryptions{tenant=\"metered\",version=\"1\"} 1073741824",
        "# TYPE tenant_kms_rpc_duration_seconds histogram",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    // Every sample line parses as `name{labels} number` or `name number`.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line}");
    }
    // Three audited encrypts were counted against the version's budget (conservatively: the
    // count includes the reservation made before sealing).
    let used: u64 = body
        .lines()
        .find(|l| l.starts_with("tenant_kms_key_version_encryptions{tenant=\"metered\""))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(used >= 3, "{used}");
    // Nothing secret: the token never appears.
    assert!(!body.contains(&server.admin_token()));

    let (status, _) = http_get(&metrics_addr, "/other");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let (code, stdout, _) = run_cli(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("--metrics-listen"));
}

/// The names of the services a server's gRPC reflection lists, asked through
/// `grpc.reflection.v1` and through `v1alpha` (what older stock tools speak): both must give
/// the same list, returned sorted.
async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::{v1, v1alpha};

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(connect(url).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<String> = match answers.message().await.unwrap().unwrap().message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };
    names.sort();

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(connect(url).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let mut alpha: Vec<String> = match answers.message().await.unwrap().unwrap().message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };
    alpha.sort();
    assert_eq!(names, alpha, "v1 and v1alpha list different services");
    names
}

/// Calls `path` with an empty message; returns the status the server answered with.
async fn empty_call(url: &str, path: &'static str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(connect(url).await);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(()),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<(), ()>::default(),
    )
    .await
    .status_err()
}

#[tokio::test]
async fn the_default_server_lists_and_serves_no_benchmark_service() {
    let temp = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&temp.path().join("data"), &[]).await;
    let services = reflected_services(&server.url()).await;
    // Exactly what the server serves: ours, health, and both reflection versions.
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "tenantkms.v1.AuditService",
            "tenantkms.v1.KeyService",
            "tenantkms.v1.TenantService",
        ]
    );
    assert!(
        !services
            .iter()
            .any(|s| s.to_lowercase().contains("bench") || s.contains("Echo")),
        "a benchmark service is listed: {services:?}"
    );
    // Nor is one served, under the echo's old name or the bench crate's.
    for path in [
        "/tenantkms.v1.BenchService/Echo",
        "/tenantkms.bench.v1.BenchService/Echo",
    ] {
        let status = empty_call(&server.url(), path).await;
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}");
    }
}

#[test]
fn the_product_command_line_has_no_bench() {
    let (code, stdout, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("serve"), "{stdout}");
    assert!(!stdout.contains("bench"), "{stdout}");
    let (code, _, stderr) = run_cli(&["bench"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run_cli(&["serve", "--bench-echo"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn concurrent_reservations_are_grouped_and_exact() {
    let temp = tempfile::tempdir().unwrap();
    let mut options = tenant_kms::service::ServiceOptions::new(temp.path().join("data"));
    options.bootstrap_admin_token = false;
    let dir = tenant_kms::service::state::DataDir::open(&options, true).unwrap();
    let ids: Vec<_> = (0..4)
        .map(|i| tenant_kms::domain::TenantId::parse(&format!("r{i}")).unwrap())
        .collect();
    assert_eq!(dir.keys.create_tenants(&ids).unwrap().len(), 4);
    let store = Arc::clone(&dir.store);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            let ids = ids.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        let id = &ids[(t + i) % ids.len()];
                        (id.clone(), store.reserve_encryptions(id, 1, 3).unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut totals: Vec<(String, u64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .map(|(id, total)| (id.as_str().to_owned(), total))
        .collect();
    totals.sort();
    // Every reservation got its own total, and per tenant they are exactly 3, 6, 9, …
    for id in &ids {
        let mine: Vec<u64> = totals
            .iter()
            .filter(|(t, _)| t == id.as_str())
            .map(|(_, n)| *n)
            .collect();
        let expected: Vec<u64> = (1..=mine.len() as u64).map(|k| 3 * k).collect();
        assert_eq!(mine, expected, "{id}");
        let stored = store.key_versions(id).unwrap()[0].encryptions;
        assert_eq!(stored, 3 * mine.len() as u64);
    }
    assert_eq!(totals.len(), 400);
    // An unknown version fails alone.
    assert!(store.reserve_encryptions(&ids[0], 9, 1).is_err());
}

#[test]
fn change_generation_sees_other_connections_only() {
    let temp = tempfile::tempdir().unwrap();
    let path = temp.path().join("keys.db");
    let a = SqliteKeyStore::open(&path).unwrap();
    let b = SqliteKeyStore::open(&path).unwrap();
    tenant_kms::store::contract::install_test_row_key(&a);
    tenant_kms::store::contract::install_test_row_key(&b);
    let g0 = a.change_generation().unwrap();
    assert_eq!(
        a.change_generation().unwrap(),
        g0,
        "no change, same generation"
    );
    // A's own write is not a change "elsewhere".
    a.revoke_token("none", 1).unwrap();
    a.insert_master_version(&tenant_kms::store::MasterVersionRecord {
        version: 7,
        check_value: vec![0; 32],
        created_at: 0,
        retired_at: None,
    })
    .unwrap();
    assert_eq!(a.change_generation().unwrap(), g0);
    // B's write is.
    b.retire_master_version(7, 5).unwrap();
    let g1 = a.change_generation().unwrap();
    assert!(g1 > g0);
    assert_eq!(
        a.change_generation().unwrap(),
        g1,
        "one change, counted once"
    );
    // Every later write elsewhere is seen, also after A's own writes and idle checks (the
    // fast path compares the WAL-index header; a full check runs whenever it moved).
    let mut last = a.change_generation().unwrap();
    for i in 0..6u32 {
        assert_eq!(a.change_generation().unwrap(), last, "idle");
        if i % 2 == 0 {
            a.revoke_token("none", 2).unwrap();
            a.insert_master_version(&tenant_kms::store::MasterVersionRecord {
                version: 100 + i,
                check_value: vec![0; 32],
                created_at: 0,
                retired_at: None,
            })
            .unwrap();
            assert_eq!(a.change_generation().unwrap(), last, "own write");
        }
        b.insert_master_version(&tenant_kms::store::MasterVersionRecord {
            version: 200 + i,
            check_value: vec![0; 32],
            created_at: 0,
            retired_at: None,
        })
        .unwrap();
        let now = a.change_generation().unwrap();
        assert!(now > last, "write {i} elsewhere seen");
        last = now;
    }
    let g1 = last;
    // Many threads checking at once all get a current generation.
    let a = Arc::new(a);
    b.retire_master_version(7, 6).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.change_generation().unwrap())
        })
        .collect();
    // retire_master_version only updates a row whose retired_at is NULL, so the second call
    // changed nothing; whatever the generation, it never goes back.
    for t in threads {
        assert!(t.join().unwrap() >= g1);
    }
}

// ---------------------------------------------------------------------------------------
// Issue 19: the lone audited call commits its own record, with no thread hand-off, when the
// audit log commits into the page cache (`process` durability); `fsync` calls still go to the
// writer thread.

/// `Encrypt`s of `calls` values one at a time, each answered before the next is sent.
async fn lone_encrypts(keys: &mut Keys, calls: usize) {
    for i in 0..calls {
        encrypt(keys, "acme", "crm.email", format!("v{i}").as_bytes(), b"").await;
    }
}

/// A server in `process` durability with the tenant `acme`, after one lone `Encrypt` (whose
/// batch also carries the key-store anchor of its nonce reservation).
async fn process_server_with_acme() -> (TestServer, Keys) {
    let server =
        TestServer::start_configured(|o| o.durability = tenant_kms::audit::Durability::Process)
            .await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    lone_encrypts(&mut keys, 1).await;
    (server, keys)
}

/// A `Decrypt` refused as invalid and an `Encrypt` refused for a stranger's token.
async fn refused_calls(server: &TestServer, keys: &mut Keys) {
    assert!(
        decrypt(keys, "acme", "crm.email", b"not a ciphertext", b"")
            .await
            .is_err()
    );
    let (mut stranger, _, _) = server.clients_with(Some("not-a-token")).await;
    assert!(
        stranger
            .encrypt(encrypt_request("acme", "crm.email", b"v", b""))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_rpc_commits_its_record_in_place_in_both_durabilities() {
    const CALLS: u64 = 50;
    // In `fsync` durability the call also syncs on its worker (no hand-off either way).
    for (durability, in_place) in [
        (tenant_kms::audit::Durability::Process, CALLS),
        (tenant_kms::audit::Durability::Fsync, CALLS),
    ] {
        let server = TestServer::start_configured(|o| o.durability = durability).await;
        let (mut keys, mut tenants, _) = server.clients().await;
        create_tenant(&mut tenants, "acme").await;
        let writer = &server.state.audit;
        let (commits, in_place_before) = (writer.commits(), writer.in_place_commits());
        let encrypts = || {
            server
                .state
                .audit_reader
                .list(&tenant_kms::audit::ListFilter {
                    operation: "Encrypt".into(),
                    limit: 1_000,
                    ..Default::default()
                })
                .unwrap()
                .len() as u64
        };
        let records = encrypts();
        lone_encrypts(&mut keys, CALLS as usize).await;
        assert_eq!(
            writer.in_place_commits() - in_place_before,
            in_place,
            "{durability:?}: commits made by the calls themselves"
        );
        assert_eq!(
            writer.commits() - commits,
            CALLS,
            "{durability:?}: one commit per lone call"
        );
        // (The first call's batch also carries a key-store anchor: its nonce reservation.)
        assert_eq!(encrypts() - records, CALLS, "{durability:?}");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_commits_in_place_only_alone_in_both_durabilities() {
    const CALLS: u64 = 20;
    let (server, mut keys) = process_server_with_acme().await;
    let writer = &server.state.audit;
    // Another audited call in flight (what each call holds from its admission to the end of
    // its append): a lone RPC's record goes to the writer thread, where batches form.
    let other = writer.begin_call();
    let (commits, in_place) = (writer.commits(), writer.in_place_commits());
    lone_encrypts(&mut keys, CALLS as usize).await;
    assert_eq!(
        writer.in_place_commits() - in_place,
        0,
        "queued behind the other call"
    );
    assert_eq!(writer.commits() - commits, CALLS);
    drop(other);
    // Alone again: each commits in place, and every call stopped counting once answered,
    // refused ones included.
    lone_encrypts(&mut keys, CALLS as usize).await;
    assert_eq!(writer.in_place_commits() - in_place, CALLS);
    refused_calls(&server, &mut keys).await;
    assert_eq!(writer.calls_in_flight(), 0);
    server.stop().await;

    // `fsync`: the lone call commits and syncs on its worker (no hand-off), once per call;
    // with another call in flight its batch goes to the writer thread and the sync thread
    // (the pipelining), not synced by the writer thread.
    let server =
        TestServer::start_configured(|o| o.durability = tenant_kms::audit::Durability::Fsync).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    lone_encrypts(&mut keys, 1).await;
    let writer = &server.state.audit;
    let (syncs, writer_syncs, in_place) = (
        writer.syncs(),
        writer.writer_syncs(),
        writer.in_place_commits(),
    );
    lone_encrypts(&mut keys, CALLS as usize).await;
    assert_eq!(writer.in_place_commits() - in_place, CALLS);
    assert_eq!(writer.syncs() - syncs, CALLS);
    let other = writer.begin_call();
    let (syncs, in_place) = (writer.syncs(), writer.in_place_commits());
    lone_encrypts(&mut keys, CALLS as usize).await;
    assert_eq!(writer.in_place_commits() - in_place, 0);
    assert_eq!(writer.writer_syncs() - writer_syncs, 0);
    assert_eq!(
        writer.syncs() - syncs,
        CALLS,
        "a sync per call, each on the sync thread"
    );
    drop(other);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_counts_each_request_until_its_answer_and_the_writer_waits_only_under_load() {
    let (server, mut keys) = process_server_with_acme().await;
    let writer = &server.state.audit;
    // Answered calls, a refused one and a stranger's all stopped counting.
    refused_calls(&server, &mut keys).await;
    assert_eq!(writer.arrivals().pending(), 0);
    let (in_place, gathers) = (writer.in_place_commits(), writer.gathers());
    lone_encrypts(&mut keys, 5).await;
    assert_eq!(
        (
            writer.in_place_commits() - in_place,
            writer.gathers() - gathers
        ),
        (5, 0),
        "a lone call commits in place and nothing waits"
    );
    // Requests received and not answered (held here as the guard holds them), more than the
    // siblings the writer waits from: each lone call's record now goes to the thread, which
    // waits for the records they might bring, up to its bound, then commits.
    let held: Vec<_> = (0..tenant_kms::audit::arrivals::DEFAULT_GATHER_SIBLINGS + 1)
        .map(|_| writer.arrivals().arrive())
        .collect();
    let (commits, in_place) = (writer.commits(), writer.in_place_commits());
    lone_encrypts(&mut keys, 3).await;
    assert_eq!(writer.commits() - commits, 3);
    assert_eq!(writer.in_place_commits() - in_place, 0);
    assert_eq!(writer.gathers() - gathers, 3, "one bounded wait per batch");
    drop(held);
    assert_eq!(writer.arrivals().pending(), 0);
    server.stop().await;
}

/// The threads of process `pid`: (how many, the `audit-writer` thread's voluntary context
/// switches, i.e. how often it was woken).
fn threads_and_writer_wakeups(pid: u32) -> (usize, u64) {
    let mut threads = 0;
    let mut wakeups = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        threads += 1;
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if name.trim() == "audit-writer" {
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            wakeups = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse().ok());
        }
    }
    (
        threads,
        wakeups.expect("the server has an audit-writer thread"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_wakes_no_thread_for_a_lone_rpcs_audit_record() {
    const CALLS: u64 = 400;
    for durability in ["process", "fsync"] {
        let temp = tempfile::tempdir().unwrap();
        let data = temp.path().join("data");
        let server = BinaryServer::start(&data, &["--audit-durability", durability]).await;
        let pid = server.child.id();
        let (mut keys, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
        create_tenant(&mut tenants, "acme").await;
        // Warm: the runtime's threads exist, the key is cached.
        lone_encrypts(&mut keys, 50).await;
        let (threads, wakeups) = threads_and_writer_wakeups(pid);
        lone_encrypts(&mut keys, CALLS as usize).await;
        let (threads_after, wakeups_after) = threads_and_writer_wakeups(pid);
        let woken = wakeups_after - wakeups;
        // Committed (and in `fsync` durability synced) on the async worker that ran the
        // call: the writer thread slept, and no thread was started to stand in for a blocked
        // worker.
        assert!(
            woken < CALLS / 10,
            "{durability}: the writer thread was woken {woken} times for {CALLS} lone calls"
        );
        assert!(
            threads_after <= threads,
            "{durability}: {threads} threads before, {threads_after} after"
        );
        server.terminate().await;
    }
}
