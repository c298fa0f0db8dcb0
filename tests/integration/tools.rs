//! Issue 18, the tooling users already have: stock gRPC tooling (reflection v1alpha, health
//! that follows readiness), logs and traces, and the packaging files (LICENSE, the systemd
//! unit, the example configuration), each checked against the real server, binary or parser.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tenant_kms::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The repository root (tests run with the crate root as working directory, but say so).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Longest a test waits for a condition the server reaches by itself.
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// 1. Stock gRPC tooling

/// A raw `grpc.reflection.v1alpha` exchange, as grpcurl before 1.8.8, grpcio-reflection,
/// Evans and Postman send it: list the services, then ask for the file declaring one.
#[tokio::test]
async fn v1alpha_reflection_lists_and_describes_the_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(connect(&server.url()).await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("tenantkms.v1.KeyService".into()),
        MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("the v1alpha reflection service answers")
        .into_inner();
    let listed = match answers.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list,
        other => panic!("not a service list: {other:?}"),
    };
    // The exact list (and that v1 gives the same) is checked in tests/integration/perf.rs.
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "tenantkms.v1.KeyService"),
        "{names:?}"
    );
    for wanted in ["tenantkms/v1/keys.proto", "health.proto"] {
        match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                use prost::Message as _;
                let names: Vec<String> = files
                    .file_descriptor_proto
                    .iter()
                    .map(|raw| {
                        prost_types::FileDescriptorProto::decode(raw.as_slice())
                            .unwrap()
                            .name()
                            .to_owned()
                    })
                    .collect();
                assert!(
                    names.iter().any(|n| n.ends_with(wanted)),
                    "{wanted} in {names:?}"
                );
            }
            other => panic!("not a file descriptor answer: {other:?}"),
        }
    }
    server.stop().await;
}

/// The health of every service, one check each.
async fn checked(health: &mut HealthClient<tonic::transport::Channel>) -> Vec<(String, i32)> {
    let mut all = Vec::new();
    for name in tenant_kms::service::server::HEALTH_SERVICES {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        all.push((name.to_owned(), status));
    }
    all
}

/// Waits (bounded) for the next status a health Watch stream sends.
async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<i32> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no health change in time")
        .ok()
        .flatten()
        .map(|r| r.status)
}

#[tokio::test]
async fn health_is_not_serving_while_the_audit_cannot_write_and_serving_after() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let mut options = test_options(&dir);
    options.audit_busy_timeout = Duration::from_millis(200);
    let server = TestServer::start_with(options).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let mut health = HealthClient::new(connect(&server.url()).await);
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    for (name, status) in checked(&mut health).await {
        assert_eq!(status, serving, "{name:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "tenantkms.v1.KeyService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, Some(serving));

    // The fault (as in tests/integration/audit.rs): another connection holds audit.db's write lock past
    // the writer's busy timeout, so commits fail.
    let blocker = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let refused = encrypt_request("acme", "ctx", b"during", b"");
    let status = keys.encrypt(refused).await.status_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(next_status(&mut watch).await, Some(not_serving));
    for (name, status) in checked(&mut health).await {
        assert_eq!(status, not_serving, "{name:?} while the audit cannot write");
    }

    // The fault clears: the writer's retry of the refused call's record succeeds by itself,
    // and health turns SERVING without a restart or another call.
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);
    assert_eq!(next_status(&mut watch).await, Some(serving));
    for (name, status) in checked(&mut health).await {
        assert_eq!(status, serving, "{name:?} after recovery");
    }
    encrypt(&mut keys, "acme", "ctx", b"after", b"").await;
    server.stop().await;
}

#[tokio::test]
async fn health_turns_not_serving_at_shutdown_and_watchers_do_not_hold_it_open() {
    let temp = tempfile::tempdir().unwrap();
    let server = BinaryServer::start(&temp.path().join("data"), &[]).await;
    let mut health = HealthClient::new(connect(&server.url()).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next_status(&mut watch).await,
        Some(ServingStatus::Serving as i32)
    );
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(server.terminate());
    assert_eq!(
        next_status(&mut watch).await,
        Some(ServingStatus::NotServing as i32)
    );
    // Then the stream ends, and the process exits well before its 10 s grace period.
    assert_eq!(next_status(&mut watch).await, None);
    let stderr = tokio::time::timeout(WAIT, stopping)
        .await
        .expect("serve did not stop")
        .unwrap();
    assert!(
        stderr.contains("in-flight calls finished"),
        "not a graceful stop: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(9), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// 7. Packaging

/// The field names a `Deserialize` struct accepts, read from serde itself: a deserializer
/// that records what `deserialize_struct` is asked for, then stops.
fn serde_fields<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Fields<'a>(&'a mut Vec<&'static str>);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.extend_from_slice(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Fields(&mut fields));
    assert!(!fields.is_empty(), "not a struct");
    fields
}

/// The example with every `#key = value` and `#[[table]]` line (no space after `#`: a setting
/// shown but not set) turned on.
fn everything_on(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest)
                if rest.starts_with("[[")
                    || rest.split_once(" = ").is_some_and(|(key, _)| {
                        key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_configuration_lists_every_key_and_parses() {
    use tenant_kms::config::{FileConfig, TlsCallerConfig};
    let path = repo().join("deploy/tenant-kms.toml");
    // As shipped: what the systemd unit starts with.
    FileConfig::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // With every shown setting on, still valid (each value has the type the parser wants).
    let text = std::fs::read_to_string(&path).unwrap();
    let all = everything_on(&text);
    let parsed: FileConfig =
        toml::from_str(&all).unwrap_or_else(|e| panic!("example with all settings on: {e}"));
    assert!(
        !parsed.tls_callers.is_empty(),
        "the [[tls_callers]] example"
    );
    // Every key the parser knows is in the example, and nothing else is (the parser refuses
    // unknown keys, so the second half holds by the parse above; checked here by name too).
    let table: toml::Table = toml::from_str(&all).unwrap();
    let mut listed: Vec<&str> = table.keys().map(String::as_str).collect();
    listed.sort();
    let mut known = serde_fields::<FileConfig>();
    known.sort();
    assert_eq!(
        listed, known,
        "deploy/tenant-kms.toml and src/config.rs disagree"
    );
    let caller = table["tls_callers"].as_array().unwrap()[0]
        .as_table()
        .unwrap();
    let mut listed: Vec<&str> = caller.keys().map(String::as_str).collect();
    listed.sort();
    let mut known = serde_fields::<TlsCallerConfig>();
    known.sort();
    assert_eq!(
        listed, known,
        "the [[tls_callers]] example and src/config.rs disagree"
    );
}

/// The check above would pass vacuously if the field reader read nothing: it does not.
#[test]
fn the_field_reader_sees_a_key_missing_from_an_example() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: Option<u8>,
        b: Option<u8>,
    }
    assert_eq!(serde_fields::<Two>(), ["a", "b"]);
    let table: toml::Table = toml::from_str(&everything_on("a = 1\n# b = 2\n")).unwrap();
    assert_eq!(table.len(), 1, "a prose comment is not a setting");
    let table: toml::Table = toml::from_str(&everything_on("a = 1\n#b = 2\n")).unwrap();
    assert_eq!(table.len(), 2);
}

#[test]
fn the_systemd_unit_is_hardened_and_loads_credentials_the_server_reads() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/tenant-kms.service")).unwrap();
    let set: Vec<&str> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for wanted in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LimitMEMLOCK=infinity",
        "LimitCORE=0",
        "CapabilityBoundingSet=",
        "LoadCredential=passphrase:",
    ] {
        assert!(
            set.iter().any(|l| l.starts_with(wanted)),
            "{wanted} missing from the unit"
        );
    }
    // The credential reaches the server through a flag `serve` has.
    assert!(unit.contains("--passphrase-file ${CREDENTIALS_DIRECTORY}/passphrase"));
    let (code, help, _) = run_cli(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--config", "--seal", "--passphrase-file", "--log-format"] {
        assert!(help.contains(flag), "serve has no {flag}");
    }
    // The example configuration the unit names is the one in deploy/.
    assert!(unit.contains("--config /etc/tenant-kms/tenant-kms.toml"));
}

#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    assert_eq!(manifest["package"]["license"].as_str(), Some("Apache-2.0"));
    let license = std::fs::read_to_string(repo().join("LICENSE")).unwrap();
    assert!(
        license.contains("Apache License\n                           Version 2.0, January 2004")
    );
    assert!(
        license.contains("END OF TERMS AND CONDITIONS"),
        "not the full text"
    );
    assert!(license.contains("APPENDIX: How to apply the Apache License"));
}

// ---------------------------------------------------------------------------------------
// 4. Logs and traces

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An encrypt request with a `traceparent` header.
fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

fn request_id<T>(response: &tonic::Response<T>) -> String {
    response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// The server binary logging JSON lines at `level`, with tenant `acme` created.
async fn json_log_server_with_acme(temp: &Path, level: &str) -> (BinaryServer, Keys, Tenants) {
    let server = BinaryServer::start(
        &temp.join("data"),
        &["--log-format", "json", "--log", level],
    )
    .await;
    let (keys, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    create_tenant(&mut tenants, "acme").await;
    (server, keys, tenants)
}

/// An Encrypt on `acme` traced with [`TRACEPARENT`]: its request id.
async fn traced_encrypt(keys: &mut Keys) -> String {
    let response = keys
        .encrypt(traced(
            encrypt_request("acme", "ctx", b"v", b""),
            TRACEPARENT,
        ))
        .await
        .unwrap();
    request_id(&response)
}

#[tokio::test]
async fn json_logs_carry_the_request_id_tenant_and_trace_on_every_line_of_a_call() {
    let temp = tempfile::tempdir().unwrap();
    let (server, mut keys, _) = json_log_server_with_acme(temp.path(), "tenant_kms=debug").await;
    let id = traced_encrypt(&mut keys).await;
    let stderr = server.terminate().await;

    let mut of_the_call = 0;
    for line in stderr.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        assert!(value.is_object(), "{line}");
        assert!(
            !line.contains('\u{1b}'),
            "ANSI escape in a JSON line: {line:?}"
        );
        if value["span"]["request_id"] == id.as_str() {
            of_the_call += 1;
            assert_names_the_traced_call(&value["span"], line);
        }
    }
    assert!(of_the_call > 0, "no line of the call {id} in:\n{stderr}");
}

/// At the default level no line is written inside a successful call, so the server makes a
/// call's span only when a line is written inside it; that line must name the call all the
/// same. The nonce budget's rotation writes one (at info) inside the Encrypt that spends it.
#[tokio::test]
async fn at_the_default_level_a_line_inside_a_call_names_its_request_id_and_tenant() {
    assert_the_rotation_line_names_its_call("info").await;
}

/// At `--log warn` the call's info span is off: a line written inside the call (here the
/// rotation's, let through by a directive for its module) still names it, through a span
/// made at error level for that line.
#[tokio::test]
async fn with_call_spans_filtered_out_a_line_inside_a_call_still_names_its_request_id() {
    assert_the_rotation_line_names_its_call("warn,tenant_kms::keys::manager=info").await;
}

/// The server logging at `level` spends acme's nonce budget; the Encrypt that then rotates
/// the key writes a line, which must name that call.
async fn assert_the_rotation_line_names_its_call(level: &str) {
    let temp = tempfile::tempdir().unwrap();
    let (server, mut keys, mut tenants) = json_log_server_with_acme(temp.path(), level).await;
    set_rotation_policy(&mut tenants, "acme", 0, 1000)
        .await
        .unwrap();
    let items = (0..1000)
        .map(|_| pb::EncryptBatchItem {
            context: "ctx".into(),
            plaintext: b"v".to_vec(),
            ..Default::default()
        })
        .collect();
    keys.encrypt_batch(pb::EncryptBatchRequest {
        tenant_id: "acme".into(),
        items,
        ..Default::default()
    })
    .await
    .unwrap();
    // The budget is spent: this call rotates the key and says so.
    let id = traced_encrypt(&mut keys).await;
    let stderr = server.terminate().await;

    let rotated: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|value| value["fields"]["message"] == "rotated: nonce budget reached")
        .collect();
    assert_eq!(rotated.len(), 1, "{stderr}");
    let span = &rotated[0]["span"];
    assert_eq!(span["name"], "call", "{stderr}");
    assert_eq!(span["request_id"], id.as_str(), "{stderr}");
    assert_eq!(span["op"], "Encrypt", "{stderr}");
    assert_names_the_traced_call(span, &stderr);
}

/// The `span` object of a JSON log line names the call on tenant `acme` traced with
/// [`TRACEPARENT`]: its tenant and the caller's trace ids.
fn assert_names_the_traced_call(span: &serde_json::Value, context: &str) {
    assert_eq!(span["tenant"], "acme", "{context}");
    assert_eq!(
        span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{context}"
    );
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{context}");
}

#[tokio::test]
async fn a_valid_traceparent_reaches_the_audit_record_and_an_invalid_one_is_ignored() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let good = keys
        .encrypt(traced(
            encrypt_request("acme", "ctx", b"v", b""),
            TRACEPARENT,
        ))
        .await
        .unwrap();
    // Invalid (upper-case hex): ignored, and the call succeeds all the same.
    let bad = keys
        .encrypt(traced(
            encrypt_request("acme", "ctx", b"v", b""),
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ))
        .await
        .expect("an invalid traceparent does not fail the call");
    let events = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let trace_of = |id: &str| {
        events
            .iter()
            .find(|e| e.request_id == id)
            .unwrap_or_else(|| panic!("no record of {id}"))
            .trace_parent
            .clone()
    };
    assert_eq!(trace_of(&request_id(&good)), TRACEPARENT);
    assert_eq!(trace_of(&request_id(&bad)), "");
    // The traced record is covered by the chain MAC: the chain verifies, and editing the
    // trace breaks it.
    let verified = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    let dir = server.data_dir.clone();
    let temp = server.stop().await;
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    conn.execute(
        "UPDATE audit_events SET trace_parent = '00-11111111111111111111111111111111-00f067aa0ba902b7-01' \
         WHERE trace_parent <> ''",
        [],
    )
    .unwrap();
    drop(conn);
    let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    assert_ne!(code, 0, "an edited trace went unnoticed: {out}{err}");
    drop(temp);
}

#[tokio::test]
async fn an_audit_log_from_before_the_trace_field_still_verifies_and_gains_it() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    encrypt(&mut keys, "acme", "ctx", b"old", b"").await;
    server.stop().await;
    // What a log written by the previous build looks like: no trace_parent column.
    let conn = rusqlite::Connection::open(dir.join("audit.db")).unwrap();
    conn.execute_batch("ALTER TABLE audit_events DROP COLUMN trace_parent")
        .unwrap();
    drop(conn);
    let verify = || run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    let (code, out, err) = verify();
    assert_eq!(code, 0, "{out}{err}");
    // The server adds the column and writes traced records after the old ones.
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, _, _) = server.clients().await;
    keys.encrypt(traced(
        encrypt_request("acme", "ctx", b"new", b""),
        TRACEPARENT,
    ))
    .await
    .unwrap();
    server.stop().await;
    let (code, out, err) = verify();
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn an_invalid_log_filter_is_a_usage_error() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (code, _, stderr) = run_cli(&[
        "serve",
        "--data-dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--log",
        "tenant_kms=loudest",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a log filter"), "{stderr}");
    assert!(!dir.exists(), "serve went on to open a data directory");
    let (code, _, stderr) = run_command(
        std::process::Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("TENANT_KMS_LOG", "=="),
    );
    assert_eq!(code, 2, "{stderr}");
}

/// `serve` run in a pseudo-terminal by `script` until it fails to bind a taken port: it logs
/// the unsealed-keyring warning first. Returns what the terminal showed.
fn serve_on_a_terminal(no_color: Option<&str>) -> String {
    let temp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let command = format!(
        "{BIN} serve --data-dir {} --listen {}",
        temp.path().join("data").display(),
        taken.local_addr().unwrap()
    );
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &command, "/dev/null"]);
    script.env_remove("NO_COLOR");
    if let Some(value) = no_color {
        script.env("NO_COLOR", value);
    }
    let (code, out, err) = run_command(&mut script);
    assert_ne!(code, 0, "serve bound a taken port? {out}{err}");
    assert!(out.contains("NOT sealed"), "no warning logged: {out}{err}");
    out
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    assert!(
        std::path::Path::new("/usr/bin/script").exists(),
        "this test needs util-linux's `script` for a pseudo-terminal"
    );
    assert!(
        serve_on_a_terminal(None).contains('\u{1b}'),
        "a terminal gets colour"
    );
    assert!(
        !serve_on_a_terminal(Some("1")).contains('\u{1b}'),
        "NO_COLOR=1"
    );
    // An empty NO_COLOR does not count (no-color.org).
    assert!(serve_on_a_terminal(Some("")).contains('\u{1b}'));
    // Not a terminal (a pipe): plain text.
    let temp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (code, _, stderr) = run_command(
        std::process::Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(temp.path().join("data"))
            .arg("--listen")
            .arg(taken.local_addr().unwrap().to_string())
            .env_remove("NO_COLOR"),
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("NOT sealed"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour in a pipe: {stderr:?}");
}

#[tokio::test]
async fn serve_stops_cleanly_on_sigterm_and_sigint_with_its_stderr_closed() {
    for signal in ["-TERM", "-INT"] {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        let mut command = std::process::Command::new(BIN);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log",
                "tenant_kms=debug",
                "--data-dir",
            ])
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let (mut child, addr) = await_listening(command.spawn().unwrap(), None).await;
        // Close the reading end: every later log line meets a broken pipe.
        drop(child.stderr.take());
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
        let url = format!("http://{addr}");
        let (mut keys, mut tenants, _) = clients(&url, Some(token.trim())).await;
        create_tenant(&mut tenants, "acme").await;
        let sealed = encrypt(&mut keys, "acme", "ctx", b"kept", b"")
            .await
            .ciphertext;
        drop((keys, tenants));
        let killed = std::process::Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                if started.elapsed() > WAIT {
                    let _ = child.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("serve did not stop on SIG{signal}"));
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status:?}");

        // The data is intact: the audit chain verifies, and a new server decrypts.
        let (code, out, err) = run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        let server = BinaryServer::start(&dir, &[]).await;
        let (mut keys, _, _) = clients(&server.url(), Some(&server.admin_token())).await;
        let opened = decrypt(&mut keys, "acme", "ctx", &sealed, b"")
            .await
            .unwrap();
        assert_eq!(opened.plaintext, b"kept");
        server.terminate().await;
    }
}

// ---------------------------------------------------------------------------------------
// 6. API gaps

#[tokio::test]
async fn a_data_key_without_plaintext_is_bound_to_its_aad_and_audited() {
    use tenant_kms::auth::{Role, TokenSpec, issue_token};
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let made = keys
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            tenant_id: "acme".into(),
            context: "files".into(),
            aad: b"file-42".to_vec(),
        })
        .await
        .unwrap();
    let id = request_id(&made);
    let made = made.into_inner();
    assert_eq!(made.key_version, 1);
    let open = |aad: &[u8]| pb::DecryptDataKeyRequest {
        tenant_id: "acme".into(),
        context: "files".into(),
        wrapped_key: made.wrapped_key.clone(),
        aad: aad.to_vec(),
    };
    let key = keys
        .decrypt_data_key(open(b"file-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.plaintext_key.len(), 32);
    assert!(
        !made
            .wrapped_key
            .windows(32)
            .any(|w| w == key.plaintext_key.as_slice()),
        "the plaintext key is inside the wrapped one"
    );
    for wrong in [&b""[..], b"file-43"] {
        let status = keys.decrypt_data_key(open(wrong)).await.status_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{wrong:?}");
    }
    // A GenerateDataKey key (no aad) still opens with none.
    let plain = generate_data_key(&mut keys, "acme", "files").await;
    let opened = keys
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            tenant_id: "acme".into(),
            context: "files".into(),
            wrapped_key: plain.wrapped_key.clone(),
            aad: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext_key, plain.plaintext_key);

    // Audited like GenerateDataKey: its own operation, the context, version, AAD fingerprint.
    let records = server
        .state
        .audit_reader
        .list(&tenant_kms::audit::ListFilter {
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    let (_, record) = records
        .iter()
        .find(|(_, r)| r.request_id == id)
        .expect("the call's audit record");
    assert_eq!(record.operation, "GenerateDataKeyWithoutPlaintext");
    assert_eq!(record.contexts, ["files"]);
    assert_eq!(record.key_versions, [1]);
    assert_eq!(
        record.aad_fingerprint,
        server.state.audit.keys().aad_fingerprint(b"file-42")
    );

    // Its own operation scope for service tokens, in both directions.
    let issue = |operations: &str| {
        issue_token(
            server.state.keys.store().as_ref(),
            &TokenSpec {
                name: "scoped".into(),
                role: Role::Service,
                tenants: "acme".into(),
                operations: operations.into(),
                ttl_seconds: None,
            },
            server.state.options.clock.as_ref(),
        )
        .unwrap()
        .secret
        .as_str()
        .to_owned()
    };
    let wrapped_only = issue("generate-data-key-without-plaintext");
    let (mut scoped, _, _) = server.clients_with(Some(&wrapped_only)).await;
    scoped
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            tenant_id: "acme".into(),
            context: "files".into(),
            aad: Vec::new(),
        })
        .await
        .unwrap();
    let status = scoped
        .generate_data_key(pb::GenerateDataKeyRequest {
            tenant_id: "acme".into(),
            context: "files".into(),
        })
        .await
        .status_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let with_plaintext = issue("generate-data-key");
    let (mut scoped, _, _) = server.clients_with(Some(&with_plaintext)).await;
    let status = scoped
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            tenant_id: "acme".into(),
            context: "files".into(),
            aad: Vec::new(),
        })
        .await
        .status_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    server.stop().await;
}

/// Every RPC of the protos is an audited operation and has a "Status codes:" comment naming
/// only codes the service can return (those `service::status` maps errors to, plus
/// CANCELLED/DEADLINE_EXCEEDED from the frame).
#[test]
fn every_rpc_documents_its_status_codes() {
    use prost::Message as _;
    let returned = [
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "UNAVAILABLE",
        "INTERNAL",
        "ACTIVE",
        "SUSPENDED",
        "PENDING_DELETION",
    ];
    let grpc_codes = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let set =
        prost_types::FileDescriptorSet::decode(tenant_kms::service::server::FILE_DESCRIPTOR_SET)
            .unwrap();
    let mut rpcs = 0;
    for file in set
        .file
        .iter()
        .filter(|f| f.name().starts_with("tenantkms/"))
    {
        let text = std::fs::read_to_string(repo().join("proto").join(file.name())).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for service in &file.service {
            for method in &service.method {
                rpcs += 1;
                let name = method.name();
                assert!(
                    tenant_kms::auth::Operation::ALL
                        .iter()
                        .any(|op| op.name() == name),
                    "{name} is not an audited operation"
                );
                let at = lines
                    .iter()
                    .position(|l| l.trim_start().starts_with(&format!("rpc {name}(")))
                    .unwrap_or_else(|| panic!("rpc {name} not found in {}", file.name()));
                let comment: Vec<&str> = lines[..at]
                    .iter()
                    .rev()
                    .take_while(|l| l.trim_start().starts_with("//"))
                    .copied()
                    .collect();
                let comment = comment.join(" ");
                assert!(comment.contains("Status codes:"), "{name}: {comment}");
                for word in comment.split(|c: char| !(c.is_ascii_uppercase() || c == '_')) {
                    if grpc_codes.contains(&word) || word.len() > 6 && word.contains('_') {
                        assert!(returned.contains(&word), "{name} lists {word}");
                    }
                }
            }
        }
        // Other languages generate without edits.
        let options = file.options.as_ref().expect("file options");
        assert!(
            options.go_package().contains(";tenantkmsv1"),
            "{}",
            file.name()
        );
        assert_eq!(options.java_package(), "io.tenantkms.v1");
        assert!(options.java_multiple_files());
        assert_eq!(options.csharp_namespace(), "TenantKms.V1");
    }
    assert!(rpcs >= 24, "only {rpcs} RPCs read");
}
