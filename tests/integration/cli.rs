//! The command line as a user meets it (issue 18, item 3): a command for every RPC (checked
//! against the protos), one JSON style across every command's output, exit code 2 for each
//! kind of usage error, connection failures that say why, the token from
//! `TENANT_KMS_TOKEN`, `--addr` as `host:port` or a URL, `rotate --due --json` times and
//! reasons, and completions and man pages from the clap definitions. Every client command
//! runs as the real binary against a real server on an ephemeral loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine;
use common::tls::Pki;
use common::*;
use serde_json::Value;
use tenant_kms::service::TlsFiles;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// What a command run gave: exit code, stdout, stderr.
struct Ran {
    code: i32,
    out: String,
    err: String,
}

impl Ran {
    /// The stdout lines, each parsed as JSON and checked against the CLI's JSON style.
    fn json_lines(&self) -> Vec<Value> {
        self.out
            .lines()
            .map(|line| {
                let value: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?} / {}", self.err));
                check_style(&value, "");
                value
            })
            .collect()
    }

    /// The one JSON line of stdout.
    fn json(&self) -> Value {
        let lines = self.json_lines();
        assert_eq!(lines.len(), 1, "one JSON line expected: {:?}", self.out);
        lines.into_iter().next().unwrap()
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {}\n{}", self.out, self.err);
        self
    }
}

/// Runs the binary with `stdin` and extra environment variables, on the blocking pool (so
/// the in-process server in this runtime keeps serving).
async fn run(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Ran {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("TENANT_KMS_TOKEN")
        .env_remove("TENANT_KMS_TOKEN_FILE")
        .env_remove("TENANT_KMS_ADDR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        // A command that fails before reading stdin closes it: not an error here.
        let _ = pipe.write_all(&stdin);
        drop(pipe);
        let output = child.wait_with_output().unwrap();
        Ran {
            code: output.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&output.stdout).into_owned(),
            err: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// A client of `server`: `--addr host:port` and the admin token from `TENANT_KMS_TOKEN`.
struct Kms<'s> {
    server: &'s TestServer,
}

impl Kms<'_> {
    async fn run(&self, args: &[&str], stdin: &[u8]) -> Ran {
        let addr = self.server.addr.to_string();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--addr", &addr]);
        run(
            &all,
            stdin,
            &[("TENANT_KMS_TOKEN", self.server.admin_token.as_str())],
        )
        .await
    }
}

/// Fields that hold times, 64-bit integers and enums in the protos the CLI prints.
const TIME_FIELDS: &[&str] = &["created_at", "deletion_time", "destroyed_at", "time"];
const U64_FIELDS: &[&str] = &[
    "encryptions",
    "rotation_period_seconds",
    "max_encryptions",
    "seq",
    "records_checked",
    "first_bad_seq",
];

/// The CLI's one JSON style (src/cli/json.rs): proto field names (lower snake case), times
/// in RFC 3339 or null, 64-bit integers as decimal strings, enums by their proto names.
fn check_style(value: &Value, path: &str) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                assert!(
                    !key.is_empty()
                        && key.starts_with(|c: char| c.is_ascii_lowercase())
                        && key
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "{path}.{key}: not a proto field name"
                );
                if TIME_FIELDS.contains(&key.as_str()) {
                    assert!(
                        v.is_null()
                            || v.as_str()
                                .is_some_and(|t| humantime::parse_rfc3339(t).is_ok()),
                        "{path}.{key}: not an RFC 3339 time: {v}"
                    );
                }
                if U64_FIELDS.contains(&key.as_str()) {
                    assert!(
                        v.as_str().is_some_and(|n| n.parse::<u64>().is_ok()),
                        "{path}.{key}: a 64-bit integer prints as a string: {v}"
                    );
                }
                if key == "state" {
                    let s = v.as_str().unwrap_or_default();
                    assert!(
                        s.starts_with("TENANT_STATE_") || s.starts_with("KEY_VERSION_STATE_"),
                        "{path}.state: not a proto enum name: {v}"
                    );
                }
                check_style(v, &format!("{path}.{key}"));
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_style(v, path)),
        _ => {}
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(value: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Every RPC has a command
// ---------------------------------------------------------------------------------------

/// `Service/Rpc` for every rpc of every service in proto/tenantkms/v1.
fn proto_rpcs() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/tenantkms/v1");
    let mut rpcs = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_owned);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                rpcs.insert(format!("{}/{name}", service.as_ref().unwrap()));
            }
        }
    }
    assert!(
        rpcs.len() > 20,
        "the proto parser found too few RPCs: {rpcs:?}"
    );
    rpcs
}

#[test]
fn every_rpc_of_the_protos_has_a_cli_command() {
    let table: BTreeSet<String> = tenant_kms::cli::RPC_COMMANDS
        .iter()
        .map(|(rpc, _)| (*rpc).to_owned())
        .collect();
    let protos = proto_rpcs();
    let missing: Vec<_> = protos.difference(&table).collect();
    assert!(
        missing.is_empty(),
        "RPCs without a CLI command: {missing:?}"
    );
    let stale: Vec<_> = table.difference(&protos).collect();
    assert!(
        stale.is_empty(),
        "commands for RPCs the protos lack: {stale:?}"
    );
    // Each named command and flag exists in the clap definitions.
    let root = tenant_kms::cli::command();
    for (rpc, line) in tenant_kms::cli::RPC_COMMANDS {
        let mut command = &root;
        for word in line.split_whitespace() {
            if let Some(flag) = word.strip_prefix("--") {
                assert!(
                    command.get_arguments().any(|a| a.get_long() == Some(flag)),
                    "{rpc}: `{line}`: no flag --{flag}"
                );
            } else {
                command = command
                    .find_subcommand(word)
                    .unwrap_or_else(|| panic!("{rpc}: `{line}`: no command {word}"));
            }
        }
        assert!(
            command.get_subcommands().next().is_none(),
            "{rpc}: `{line}` names a group, not a command"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Every client command, one JSON style
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_command_works_and_prints_one_json_style() {
    let server = TestServer::start().await;
    let kms = Kms { server: &server };

    // Tenants.
    let created = kms
        .run(&["tenant", "create", "acme"], b"")
        .await
        .ok()
        .json();
    assert_eq!(created["tenant_id"], "acme");
    assert_eq!(created["state"], "TENANT_STATE_ACTIVE");
    assert_eq!(created["primary_version"], 1);
    kms.run(&["tenant", "get", "acme"], b"").await.ok().json();
    assert_eq!(
        kms.run(&["tenant", "list"], b"")
            .await
            .ok()
            .json_lines()
            .len(),
        1
    );

    // Rotation policy: set one half, the other keeps its value.
    let set = kms
        .run(
            &[
                "tenant",
                "set-policy",
                "acme",
                "--rotation-period",
                "90d",
                "--max-encryptions",
                "5000",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(set["rotation_policy"]["rotation_period_seconds"], "7776000");
    kms.run(
        &["tenant", "set-policy", "acme", "--max-encryptions", "6000"],
        b"",
    )
    .await
    .ok();
    let policy = kms
        .run(&["tenant", "get-policy", "acme"], b"")
        .await
        .ok()
        .json();
    assert_eq!(
        policy["rotation_policy"]["rotation_period_seconds"],
        "7776000"
    );
    assert_eq!(policy["rotation_policy"]["max_encryptions"], "6000");

    // Encrypt and decrypt, plain and --json.
    let ct_v1 = kms
        .run(
            &[
                "encrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:1",
            ],
            b"alice",
        )
        .await
        .ok()
        .out
        .trim()
        .to_owned();
    let rotated = kms
        .run(&["tenant", "rotate", "acme"], b"")
        .await
        .ok()
        .json();
    assert_eq!(rotated["primary_version"], 2);
    let sealed = kms
        .run(
            &[
                "encrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:2",
                "--json",
            ],
            b"bob",
        )
        .await
        .ok()
        .json();
    assert_eq!(sealed["key_version"], 2);
    let opened = kms
        .run(
            &[
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:2",
                "--json",
            ],
            sealed["ciphertext"].as_str().unwrap().as_bytes(),
        )
        .await
        .ok()
        .json();
    assert_eq!(unb64(&opened["plaintext"]), b"bob");
    let raw = kms
        .run(
            &[
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:1",
            ],
            ct_v1.as_bytes(),
        )
        .await
        .ok();
    assert_eq!(raw.out, "alice");

    // Rewrap moves the v1 value to v2 without the plaintext leaving the server.
    let rewrapped = kms
        .run(
            &[
                "rewrap",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:1",
                "--json",
            ],
            ct_v1.as_bytes(),
        )
        .await
        .ok()
        .json();
    assert_eq!(rewrapped["key_version"], 2);
    let again = kms
        .run(
            &[
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:1",
            ],
            rewrapped["ciphertext"].as_str().unwrap().as_bytes(),
        )
        .await
        .ok();
    assert_eq!(again.out, "alice");

    // Data keys, with and without plaintext.
    let dk = kms
        .run(
            &[
                "datakey",
                "generate",
                "--tenant",
                "acme",
                "--context",
                "files",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert_eq!(unb64(&dk["plaintext_key"]).len(), 32);
    let unwrapped = kms
        .run(
            &[
                "datakey",
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "files",
            ],
            dk["wrapped_key"].as_str().unwrap().as_bytes(),
        )
        .await
        .ok()
        .json();
    assert_eq!(unwrapped["plaintext_key"], dk["plaintext_key"]);
    let wrapped_only = kms
        .run(
            &[
                "datakey",
                "generate",
                "--tenant",
                "acme",
                "--context",
                "files",
                "--without-plaintext",
                "--aad",
                "bucket:7",
            ],
            b"",
        )
        .await
        .ok()
        .json();
    assert!(wrapped_only.get("plaintext_key").is_none());
    let wrapped = wrapped_only["wrapped_key"].as_str().unwrap().as_bytes();
    let opened = kms
        .run(
            &[
                "datakey",
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "files",
                "--aad",
                "bucket:7",
            ],
            wrapped,
        )
        .await
        .ok()
        .json();
    assert_eq!(unb64(&opened["plaintext_key"]).len(), 32);
    let wrong_aad = kms
        .run(
            &[
                "datakey",
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "files",
                "--aad",
                "bucket:8",
            ],
            wrapped,
        )
        .await;
    assert_eq!(wrong_aad.code, 1, "{}", wrong_aad.err);

    // Batches: one result line per input line; a bad line is its own error; exit 1.
    let input = format!(
        "{}\nnot json\n{}\n",
        serde_json::json!({"context": "crm.email", "plaintext": b64(b"one"), "aad": b64(b"r1")}),
        serde_json::json!({"context": "crm.email", "plaintext": b64(b"two")}),
    );
    let batch = kms
        .run(&["encrypt-batch", "--tenant", "acme"], input.as_bytes())
        .await;
    assert_eq!(batch.code, 1, "{}", batch.err);
    let lines = batch.json_lines();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["error"]["code"], 3);
    assert!(
        lines[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2")
    );
    let decrypt_input = format!(
        "{}\n{}\n",
        serde_json::json!({"context": "crm.email", "ciphertext": lines[0]["output"]["ciphertext"], "aad": b64(b"r1")}),
        serde_json::json!({"context": "crm.email", "ciphertext": lines[2]["output"]["ciphertext"], "aad": b64(b"wrong")}),
    );
    let opened = kms
        .run(
            &["decrypt-batch", "--tenant", "acme"],
            decrypt_input.as_bytes(),
        )
        .await;
    assert_eq!(opened.code, 1, "{}", opened.err);
    let opened = opened.json_lines();
    assert_eq!(unb64(&opened[0]["output"]["plaintext"]), b"one");
    assert_eq!(opened[1]["error"]["code"], 3);
    let all_good = format!(
        "{}\n",
        serde_json::json!({"context": "crm.email", "ciphertext": lines[0]["output"]["ciphertext"], "aad": b64(b"r1")}),
    );
    kms.run(&["decrypt-batch", "--tenant", "acme"], all_good.as_bytes())
        .await
        .ok();
    let rewrapped = kms
        .run(&["rewrap-batch", "--tenant", "acme"], all_good.as_bytes())
        .await
        .ok()
        .json();
    assert_eq!(rewrapped["output"]["key_version"], 2);

    // Key versions: disable, enable, destroy.
    let versions = kms
        .run(&["tenant", "versions", "acme"], b"")
        .await
        .ok()
        .json_lines();
    assert_eq!(versions.len(), 2);
    let disabled = kms
        .run(&["tenant", "disable-version", "acme", "1"], b"")
        .await
        .ok()
        .json();
    assert_eq!(disabled["state"], "KEY_VERSION_STATE_DISABLED");
    let refused = kms
        .run(
            &[
                "decrypt",
                "--tenant",
                "acme",
                "--context",
                "crm.email",
                "--aad",
                "row:1",
            ],
            ct_v1.as_bytes(),
        )
        .await;
    assert_eq!(refused.code, 1, "{}", refused.err);
    let enabled = kms
        .run(&["tenant", "enable-version", "acme", "1"], b"")
        .await
        .ok()
        .json();
    assert_eq!(enabled["state"], "KEY_VERSION_STATE_ENABLED");
    kms.run(&["tenant", "disable-version", "acme", "1"], b"")
        .await
        .ok();
    let destroyed = kms
        .run(&["tenant", "destroy-version", "acme", "1"], b"")
        .await
        .ok()
        .json();
    assert_eq!(destroyed["state"], "KEY_VERSION_STATE_DESTROYED");

    // Blind indexes.
    kms.run(
        &["index", "declare", "--name", "email", "--bits", "32"],
        b"",
    )
    .await
    .ok()
    .json();
    kms.run(&["index", "list"], b"").await.ok().json();
    let computed = kms
        .run(
            &["index", "compute", "--tenant", "acme", "--index", "email"],
            b"a@x\nb@x\n",
        )
        .await
        .ok()
        .json_lines();
    assert_eq!(computed.len(), 2);
    assert_eq!(
        unb64(&computed[0]["output"]["indexes"][0]["index"]).len(),
        4
    );

    // Lifecycle.
    kms.run(&["tenant", "suspend", "acme"], b"")
        .await
        .ok()
        .json();
    kms.run(&["tenant", "resume", "acme"], b"")
        .await
        .ok()
        .json();
    let pending = kms
        .run(&["tenant", "delete", "acme", "--window", "2d"], b"")
        .await
        .ok()
        .json();
    assert_eq!(pending["state"], "TENANT_STATE_PENDING_DELETION");
    assert!(pending["deletion_time"].is_string());
    kms.run(&["tenant", "cancel-delete", "acme"], b"")
        .await
        .ok()
        .json();

    // The audit through the server.
    let events = kms
        .run(
            &[
                "audit",
                "list",
                "--tenant",
                "acme",
                "--operation",
                "DestroyKeyVersion",
            ],
            b"",
        )
        .await
        .ok()
        .json_lines();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["tenant_id"], "acme");
    let verified = kms.run(&["audit", "verify-chain"], b"").await.ok().json();
    assert_eq!(verified["ok"], true);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Addresses, tokens, usage errors
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addr_takes_host_port_or_a_url_and_the_token_a_file_or_the_environment() {
    let server = TestServer::start().await;
    let token_file = server.data_dir.join("admin.token");
    let url = format!("http://{}", server.addr);
    let by_url_and_file = run(
        &[
            "tenant",
            "create",
            "a",
            "--addr",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        b"",
        &[],
    )
    .await
    .ok();
    by_url_and_file.json();
    let by_host_port_and_env = run(
        &["tenant", "get", "a", "--addr", &server.addr.to_string()],
        b"",
        &[("TENANT_KMS_TOKEN", &server.admin_token)],
    )
    .await
    .ok();
    assert_eq!(by_host_port_and_env.json()["tenant_id"], "a");
    // A wrong token in the environment is the server's refusal (exit 1), with a hint.
    let wrong = run(
        &["tenant", "get", "a", "--addr", &server.addr.to_string()],
        b"",
        &[("TENANT_KMS_TOKEN", "tkms_wrong")],
    )
    .await;
    assert_eq!(wrong.code, 1, "{}", wrong.err);
    assert!(
        wrong.err.contains("Unauthenticated") && wrong.err.contains("TENANT_KMS_TOKEN"),
        "{}",
        wrong.err
    );
    assert!(
        !wrong.err.contains("tkms_wrong"),
        "the token is never printed: {}",
        wrong.err
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_name_flags_while_refusals_exit_1() {
    let server = TestServer::start().await;
    let kms = Kms { server: &server };
    kms.run(&["tenant", "create", "acme"], b"").await.ok();
    let usage: &[(&[&str], &[u8], &str)] = &[
        // Unknown flag, missing argument (clap).
        (
            &["encrypt", "--tenant", "acme", "--context", "c", "--nope"],
            b"x",
            "--nope",
        ),
        (&["encrypt", "--context", "c"], b"x", "--tenant"),
        // Bad values.
        (
            &["tenant", "delete", "acme", "--window", "soon"],
            b"",
            "--window",
        ),
        (&["tenant", "disable-version", "acme", "0"], b"", "VERSION"),
        (&["tenant", "set-policy", "acme"], b"", "--rotation-period"),
        (
            &["tenant", "get", "acme", "--connect-timeout", "fast"],
            b"",
            "--connect-timeout",
        ),
        (&["audit", "list", "--since", "yesterday"], b"", "--since"),
        (
            &["encrypt-batch", "--tenant", "acme", "--chunk", "0"],
            b"",
            "--chunk",
        ),
        // Unusable input on stdin.
        (
            &["decrypt", "--tenant", "acme", "--context", "c"],
            b"not base64!",
            "base64",
        ),
        (
            &["datakey", "decrypt", "--tenant", "acme", "--context", "c"],
            b"@@",
            "base64",
        ),
    ];
    for (args, stdin, names) in usage {
        let ran = kms.run(args, stdin).await;
        assert_eq!(ran.code, 2, "{args:?}: {}", ran.err);
        assert!(
            ran.err.contains(names),
            "{args:?} should name {names}: {}",
            ran.err
        );
    }
    let shell = run(&["completions", "tcsh"], b"", &[]).await;
    assert_eq!(shell.code, 2, "{}", shell.err);
    assert!(shell.err.contains("tcsh"), "{}", shell.err);
    // Flags the client checks itself.
    let bad_addr: &[(&str, &str)] = &[
        ("ftp://127.0.0.1:1", "http:// or https://"),
        ("localhost", "host:port"),
    ];
    for (addr, names) in bad_addr {
        let ran = run(
            &["tenant", "get", "acme", "--addr", addr],
            b"",
            &[("TENANT_KMS_TOKEN", "t")],
        )
        .await;
        assert_eq!(ran.code, 2, "--addr {addr}: {}", ran.err);
        assert!(
            ran.err.contains("--addr") && ran.err.contains(names),
            "{}",
            ran.err
        );
    }
    let addr = server.addr.to_string();
    let no_token = run(
        &[
            "tenant",
            "get",
            "acme",
            "--addr",
            &addr,
            "--token-file",
            "/nonexistent/token",
        ],
        b"",
        &[],
    )
    .await;
    assert_eq!(no_token.code, 2, "{}", no_token.err);
    assert!(
        no_token.err.contains("/nonexistent/token"),
        "{}",
        no_token.err
    );
    let plain_with_ca = run(
        &[
            "tenant",
            "get",
            "acme",
            "--addr",
            &format!("http://{addr}"),
            "--ca-cert",
            "/x.pem",
        ],
        b"",
        &[("TENANT_KMS_TOKEN", "t")],
    )
    .await;
    assert_eq!(plain_with_ca.code, 2, "{}", plain_with_ca.err);
    assert!(
        plain_with_ca.err.contains("--ca-cert"),
        "{}",
        plain_with_ca.err
    );

    // The server's refusals exit 1 and speak of flags, not request fields.
    let missing = kms.run(&["tenant", "get", "nosuch"], b"").await;
    assert_eq!(missing.code, 1, "{}", missing.err);
    assert!(missing.err.contains("NotFound"), "{}", missing.err);
    let long_context = "c".repeat(200);
    let refused = kms
        .run(
            &["encrypt", "--tenant", "acme", "--context", &long_context],
            b"x",
        )
        .await;
    assert_eq!(refused.code, 1, "{}", refused.err);
    assert!(refused.err.contains("--context"), "{}", refused.err);
    let window = kms
        .run(&["tenant", "delete", "acme", "--window", "20000d"], b"")
        .await;
    assert_eq!(window.code, 2, "{}", window.err);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Connection failures say why
// ---------------------------------------------------------------------------------------

/// A TLS server certified by `pki` for `names` only (no IP address).
async fn tls_server_for(pki: &Pki, names: &[&str]) -> TestServer {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &pki.ca).unwrap();
    let files = TlsFiles {
        cert: pki.write("server.pem", &cert.pem()),
        key: pki.write("server.key", &key.serialize_pem()),
        client_ca: None,
    };
    TestServer::start_configured(move |o| o.tls = Some(files)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_says_why_and_what_to_check() {
    let env = [("TENANT_KMS_TOKEN", "t")];
    // Refused: nothing listens.
    let port = free_port().to_string();
    let refused = run(
        &["tenant", "list", "--addr", &format!("127.0.0.1:{port}")],
        b"",
        &env,
    )
    .await;
    assert_eq!(refused.code, 1, "{}", refused.err);
    assert!(
        refused.err.contains("connection refused") && refused.err.contains("--addr"),
        "{}",
        refused.err
    );

    // Timed out: a peer that accepts and never answers the TLS handshake.
    let pki = Pki::new("right CA");
    let ca = pki.write("ca.pem", &pki.ca_pem);
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let hold = std::thread::spawn(move || {
        let (stream, _) = silent.accept().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(5));
        drop(stream);
    });
    let timed_out = run(
        &[
            "tenant",
            "list",
            "--addr",
            &silent_addr,
            "--ca-cert",
            ca.to_str().unwrap(),
            "--connect-timeout",
            "300ms",
        ],
        b"",
        &env,
    )
    .await;
    assert_eq!(timed_out.code, 1, "{}", timed_out.err);
    assert!(
        timed_out.err.contains("timed out") && timed_out.err.contains("--connect-timeout"),
        "{}",
        timed_out.err
    );
    drop(hold);

    // TLS: a certificate from another CA, and one for another name.
    let server = tls_server_for(&pki, &["kms.example"]).await;
    let other = Pki::new("other CA");
    let other_ca = other.write("ca.pem", &other.ca_pem);
    let url = format!("https://{}", server.addr);
    let unknown = run(
        &[
            "tenant",
            "list",
            "--addr",
            &url,
            "--ca-cert",
            other_ca.to_str().unwrap(),
        ],
        b"",
        &env,
    )
    .await;
    assert_eq!(unknown.code, 1, "{}", unknown.err);
    assert!(
        unknown.err.contains("unknown CA") && unknown.err.contains("--ca-cert"),
        "{}",
        unknown.err
    );
    let mismatch = run(
        &[
            "tenant",
            "list",
            "--addr",
            &url,
            "--ca-cert",
            ca.to_str().unwrap(),
        ],
        b"",
        &env,
    )
    .await;
    assert_eq!(mismatch.code, 1, "{}", mismatch.err);
    assert!(
        mismatch.err.contains("name mismatch") && mismatch.err.contains("--addr"),
        "{}",
        mismatch.err
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// rotate --due --json: times and reasons
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_due_json_lines_carry_a_time_and_each_actions_reason() {
    let server = TestServer::start().await;
    let kms = Kms { server: &server };
    for id in ["aged", "busy", "idle"] {
        kms.run(&["tenant", "create", id], b"").await.ok();
    }
    kms.run(
        &["tenant", "set-policy", "aged", "--rotation-period", "1d"],
        b"",
    )
    .await
    .ok();
    kms.run(
        &["tenant", "set-policy", "busy", "--max-encryptions", "10"],
        b"",
    )
    .await
    .ok();
    for _ in 0..9 {
        kms.run(&["encrypt", "--tenant", "busy", "--context", "c"], b"x")
            .await
            .ok();
    }
    let data_dir = server.data_dir.clone();
    let _kept = server.stop().await;
    let clock = ProcessClock::new();
    clock.advance(2 * 86_400);
    let mut command = Command::new(BIN);
    command.args([
        "rotate",
        "--due",
        "--json",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]);
    clock.apply(&mut command);
    let (code, out, err) = tokio::task::spawn_blocking(move || run_command(&mut command))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    let now = std::time::SystemTime::now();
    let run_time = humantime::parse_rfc3339(summary["time"].as_str().unwrap()).unwrap();
    // The command's clock is two days ahead: its times say so.
    let ahead = run_time.duration_since(now).unwrap_or_default().as_secs();
    assert!((86_400..3 * 86_400).contains(&ahead), "{summary}");
    let actions = summary["actions"].as_array().unwrap();
    let by_target = |t: &str| actions.iter().find(|a| a["target"] == t).cloned();
    let aged = by_target("aged").unwrap();
    assert!(
        aged["reason"]
            .as_str()
            .unwrap()
            .starts_with("rotation period: primary v1 is 2days"),
        "{aged}"
    );
    humantime::parse_rfc3339(aged["time"].as_str().unwrap()).unwrap();
    let busy = by_target("busy").unwrap();
    let reason = busy["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("nonce budget: primary v1 has sealed ")
            && reason.contains("of its 10 values"),
        "{busy}"
    );
    assert!(by_target("idle").is_none(), "{summary}");
}

// ---------------------------------------------------------------------------------------
// Completions and man pages
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn completions_and_man_pages_come_from_the_clap_definitions() {
    let root = tenant_kms::cli::command();
    let names: Vec<String> = root
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    for shell in ["bash", "zsh", "fish"] {
        let ran = run(&["completions", shell], b"", &[]).await.ok();
        for name in &names {
            assert!(
                ran.out.contains(name.as_str()),
                "{shell} completions lack {name}"
            );
        }
        assert!(
            ran.out.contains("without-plaintext"),
            "{shell}: subcommand flags complete"
        );
    }
    let man = run(&["man"], b"", &[]).await.ok();
    // roff writes a hyphen as `\-`.
    let text = man.out.replace("\\-", "-");
    assert!(
        text.contains(".TH tenant-kms"),
        "{}",
        &text[..200.min(text.len())]
    );
    for name in &names {
        assert!(text.contains(name.as_str()), "the man page lacks {name}");
    }
    let dir = tempfile::tempdir().unwrap();
    run(
        &["man", "--out-dir", dir.path().to_str().unwrap()],
        b"",
        &[],
    )
    .await
    .ok();
    for page in [
        "tenant-kms.1",
        "tenant-kms-encrypt-batch.1",
        "tenant-kms-tenant-set-policy.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}

#[test]
fn man_and_completions_into_a_closed_pipe_exit_quietly() {
    for args in [&["man"][..], &["completions", "bash"]] {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader is gone before the page is written (`tenant-kms man | head -0`).
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: quiet, but said {err}");
    }
}
