//! The bench crate end to end: its server serves the echo baseline beside the real services,
//! and the load generator and the churn soak run against it (issue 7; moved here by issue 12).
//!
//! No test here asserts a speed: the bench runs briefly and only its output's shape and its
//! correctness checks are asserted. The server under test is started by the bench's own
//! child-process harness (`tenant_kms_bench::child`), so these tests need nothing of the
//! product's test helpers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use tenant_kms::audit::Durability;
use tenant_kms_bench::child::{self, ChildOptions, ChildServer};
use tenant_kms_bench::pb;
use tenant_kms_bench::pb::bench_service_client::BenchServiceClient;

/// The bench binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_tenant-kms-bench");

/// Runs the bench binary with arguments; returns (exit code, stdout, stderr).
fn run_bench(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `tenant-kms-bench serve` on `data_dir`, started the way the bench starts it.
async fn start_server(data_dir: &Path) -> ChildServer {
    ChildServer::start(ChildOptions {
        data_dir,
        durability: Durability::Process,
        config: None,
        log: data_dir.with_extension("log"),
        extra: Vec::new(),
        exe: Some(BIN.into()),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_bench_server_serves_echo_beside_the_real_services_and_audits_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = start_server(&data).await;
    let channel = child::connect(&server.url).await.unwrap();

    // The real services are served beside the echo.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tenantkms.v1.KeyService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // No token needed; the response carries the asked-for sizes.
    let mut echo = BenchServiceClient::new(channel);
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
    server.stop().await;

    // Echo calls are not audited (the bench binary runs the product's `audit verify`).
    let (code, stdout, stderr) =
        run_bench(&["audit", "verify", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("OK: 0 records"),
        "echo calls are not audited: {stdout}"
    );
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = run_bench(args);
    assert_eq!(code, 0, "bench failed:\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn bench_runs_every_scenario_with_its_baselines() {
    let report = bench_json(&[
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

/// Searchable columns: ComputeBlindIndex and deterministic EncryptBatch under load, each with
/// its echo of the same shape (the bench declares its index before the run).
#[test]
fn bench_runs_the_searchable_scenarios() {
    let report = bench_json(&[
        "--duration",
        "400ms",
        "--warmup",
        "100ms",
        "--concurrency",
        "2",
        "--scenario",
        "blind-index-10,det-batch-10",
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
    assert_eq!(names, ["blind-index-10", "det-batch-10"]);
    for r in results {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["items_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["rps_vs_echo"].is_number(), "{r}");
    }
}

#[test]
fn bench_compares_sqlite_with_one_and_two_postgres_nodes() {
    // Starts its own PostgreSQL (postgresql-15); fails, saying what to install, without it.
    let report = bench_json(&[
        "--postgres",
        "--duration",
        "500ms",
        "--warmup",
        "200ms",
        "--concurrency",
        "4",
        "--scenario",
        "encrypt-64,decrypt-64",
        "--tenants",
        "3",
        "--json",
    ]);
    let results = report["results"].as_array().unwrap();
    let rows: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["deployment"].as_str().unwrap(),
                r["scenario"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("sqlite, 1 node", "encrypt-64"),
            ("sqlite, 1 node", "decrypt-64"),
            ("postgres, 1 node", "encrypt-64"),
            ("postgres, 1 node", "decrypt-64"),
            ("postgres, 2 nodes", "encrypt-64"),
            ("postgres, 2 nodes", "decrypt-64"),
        ]
    );
    for r in results {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["rps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["node_cpu_us_per_req"].as_f64().unwrap() > 0.0, "{r}");
        let postgres = r["deployment"].as_str().unwrap().starts_with("postgres");
        // The database tier is measured for PostgreSQL only, and every audited call left
        // a record that some audit commit wrote.
        assert_eq!(r["db_cpu_us_per_req"].is_f64(), postgres, "{r}");
        if postgres {
            assert!(r["db_cpu_us_per_req"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                r["audit_records_per_audit_commit"].as_f64().unwrap() >= 1.0,
                "{r}"
            );
            assert!(r["db_commits_per_req"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // Both targets are checked for Encrypt against SQLite; the two-node run is projected.
    assert_eq!(report["targets"].as_array().unwrap().len(), 4);
    let projections = report["projections"].as_array().unwrap();
    assert_eq!(projections.len(), 2);
    assert!(projections[0]["nodes_per_database"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_bad_input() {
    let (code, _, stderr) = run_bench(&["--scenario", "encrypt-sideways"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("unknown scenario"), "{stderr}");
    let (code, _, stderr) = run_bench(&["--concurrency", "0"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("positive"), "{stderr}");
    // The bench's flags and its subcommands do not mix.
    let (code, _, stderr) = run_bench(&["--json", "serve"]);
    assert_eq!(code, 2, "{stderr}");
    // --postgres starts its own servers: a data directory of the caller's is refused.
    let (code, _, stderr) = run_bench(&["--postgres", "--data-dir", "/nonexistent/kms"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("drop --addr and --data-dir"), "{stderr}");
}

#[test]
fn churn_soak_finds_no_violation() {
    let report = bench_json(&[
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
