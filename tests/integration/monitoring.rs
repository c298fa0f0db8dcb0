//! The monitoring kit against the real server (issue 16, item 6): the `/metrics` endpoint's
//! output passes `promtool check metrics`; `deploy/prometheus/alerts.yml` passes `promtool
//! check rules` and its unit tests (`promtool test rules`); the alert rules and the Grafana
//! dashboard use only metric names the server exports.
//!
//! promtool comes from Debian's `prometheus` package (`.ci/run` installs it when missing);
//! without it these tests fail and say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs promtool with `args` (and `stdin`), from `dir`; panics clearly when it is missing.
fn promtool(dir: &Path, args: &[&str], stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed ({e}): install Debian's `prometheus` package \
                 (apt-get install prometheus; .ci/run does it)"
            )
        });
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `GET /metrics` from a metrics endpoint serving `server`, over plain HTTP/1.1.
async fn scrape(server: &TestServer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = tokio::spawn(tenant_kms::metrics::serve(
        listener,
        tenant_kms::service::server::metrics_extra(&server.state),
        async {
            let _ = stopped.await;
        },
    ));
    let response = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    let _ = stop.send(());
    endpoint.await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// A server with traffic of every kind the usage metrics label (ok, denied, invalid), and an
/// audit stream to a file (so the stream families have a series).
async fn busy_server() -> TestServer {
    let server = TestServer::start_configured(|options| {
        options.audit_stream.file = Some(tenant_kms::audit::stream::file::FileSinkConfig {
            path: options.data_dir.join("audit-stream.jsonl"),
            max_bytes: tenant_kms::audit::stream::file::FileSinkConfig::DEFAULT_MAX_BYTES,
            keep: tenant_kms::audit::stream::file::FileSinkConfig::DEFAULT_KEEP,
        });
    })
    .await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let sealed = encrypt(&mut keys, "acme", "c", b"v", b"").await;
    decrypt(&mut keys, "acme", "c", &sealed.ciphertext, b"")
        .await
        .unwrap();
    let refused = decrypt(&mut keys, "acme", "c", &sealed.ciphertext, b"other aad").await;
    assert!(refused.is_err());
    server
}

/// Metric family names in a scrape (from its `# TYPE` lines; a family is in a scrape once it
/// has a series), with the series names a histogram family adds.
fn exported(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Every `tenant_kms_…` metric name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tenant_kms_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_passes_promtool_check_metrics() {
    let server = busy_server().await;
    let body = scrape(&server).await;
    assert!(
        body.contains("tenant_kms_usage_calls_total{tenant=\"acme\""),
        "{body}"
    );
    let (ok, report) = promtool(Path::new(ROOT), &["check", "metrics"], body.as_bytes());
    assert!(ok, "promtool check metrics: {report}\n{body}");
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let (ok, report) = promtool(&dir, &["check", "rules", "alerts.yml"], b"");
    assert!(ok, "promtool check rules: {report}");
    let (ok, report) = promtool(&dir, &["test", "rules", "alerts_test.yml"], b"");
    assert!(ok, "promtool test rules: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_exported_metrics() {
    let server = busy_server().await;
    let exported = exported(&scrape(&server).await);
    let alerts =
        std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml")).unwrap();
    let used = metric_names(&alerts);
    assert!(used.len() >= 7, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "alerts.yml uses unexported {missing:?}");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/tenant-kms.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            let missing: Vec<_> = names.difference(&exported).collect();
            assert!(
                missing.is_empty(),
                "dashboard query {expr} uses unexported {missing:?}"
            );
            queries += 1;
        }
    }
    assert!(queries >= 15, "{queries}");
}
