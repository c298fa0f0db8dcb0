//! Issue 7: the load generator, the metrics endpoint, the churn soak and the hot-path
//! mechanisms behind them (grouped nonce-budget reservations, the single-flight change check).
//!
//! No test here asserts a speed: the bench runs briefly and only its output's shape and its
//! correctness checks are asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::*;
use tenant_kms::pb;
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
    assert!(
        !stdout.contains("--bench-echo"),
        "the echo flag is hidden from help"
    );
}

#[tokio::test]
async fn echo_is_served_only_with_the_hidden_flag() {
    let temp = tempfile::tempdir().unwrap();
    let plain = BinaryServer::start(&temp.path().join("a"), &[]).await;
    let mut echo = pb::bench_service_client::BenchServiceClient::new(connect(&plain.url()).await);
    let refused = echo.echo(pb::EchoRequest::default()).await.status_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);

    let with = BinaryServer::start(&temp.path().join("b"), &["--bench-echo"]).await;
    let mut echo = pb::bench_service_client::BenchServiceClient::new(connect(&with.url()).await);
    // No token needed; nothing is audited; the response carries the asked-for sizes.
    let response = echo
        .echo(pb::EchoRequest {
            tenant_id: "whoever".into(),
            items: vec![pb::EchoItem::default(); 3],
            response_bytes: 98,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 3);
    assert!(
        response
            .results
            .iter()
            .all(|r| r.output.as_ref().unwrap().ciphertext.len() == 98)
    );
    let unary = echo
        .echo(pb::EchoRequest {
            plaintext: vec![1; 64],
            response_bytes: 98,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary.ciphertext.len(), 98);
    let data = with.data_dir.clone();
    drop(with);
    let (code, stdout, stderr) =
        run_cli(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("OK: 0 records"),
        "echo calls are not audited: {stdout}"
    );
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = run_cli(args);
    assert_eq!(code, 0, "bench failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn bench_runs_every_scenario_with_its_baselines() {
    let report = bench_json(&[
        "bench",
        "--duration",
        "400ms",
        "--warmup",
        "100ms",
        "--concurrency",
        "2",
        "--scenario",
        "encrypt-64,decrypt-64,batch-10,generate-data-key,rewrap",
        "--durability",
        "process",
        "--tenants",
        "3",
        "--baseline-time",
        "20ms",
        "--json",
    ]);
    let results = report["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "encrypt-64",
            "decrypt-64",
            "batch-10",
            "generate-data-key",
            "rewrap"
        ]
    );
    for r in results {
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["durability"], "process");
        assert_eq!(r["concurrency"], 2);
        // Figures and their same-run echo baselines are all present.
        for field in [
            "rps",
            "items_per_s",
            "p50_us",
            "p99_us",
            "max_us",
            "echo_rps",
            "echo_p50_us",
            "rps_vs_echo",
            "p50_vs_echo",
            "p99_vs_echo",
            "server_cpu_us_per_req",
            "server_rss_mib",
        ] {
            assert!(r[field].is_number(), "{field} missing in {r}");
        }
    }
    let baselines = &report["baselines"];
    for field in [
        "raw_seal_64_ns",
        "raw_seal_4k_ns",
        "field_encrypt_cached_64_ns",
        "field_encrypt_uncached_64_ns",
        "change_check_ns",
    ] {
        assert!(baselines[field].as_f64().unwrap() > 0.0, "{field}");
    }
    assert!(baselines["fsync"]["count"].as_u64().unwrap() > 0);
    assert!(report["targets"].is_array());
    assert!(report["machine"].as_str().unwrap().contains("cores"));
}

#[test]
fn bench_refuses_bad_input() {
    let (code, _, stderr) = run_cli(&["bench", "--scenario", "encrypt-sideways"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown scenario"), "{stderr}");
    let (code, _, stderr) = run_cli(&["bench", "--concurrency", "0"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("positive"), "{stderr}");
}

#[test]
fn churn_soak_finds_no_violation() {
    let report = bench_json(&[
        "bench",
        "--scenario",
        "churn",
        "--duration",
        "3s",
        "--concurrency",
        "4",
        "--durability",
        "process",
        "--baseline-time",
        "10ms",
        "--json",
    ]);
    let churn = &report["churn"].as_array().unwrap()[0];
    assert_eq!(churn["violations"], 0, "{churn}");
    assert_eq!(churn["final_decrypt_failures"], 0, "{churn}");
    assert_eq!(churn["destroyed_key_bytes_found"], 0, "{churn}");
    assert_eq!(churn["audit_verified"], true, "{churn}");
    assert_eq!(churn["passed"], true, "{churn}");
    let ops = churn["ops"].as_object().unwrap();
    assert!(ops["create"].as_u64().unwrap() > 0, "{churn}");
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
