//! The HTTP/JSON API through the real server (src/service/rest): every RPC family over HTTP,
//! its error model, its refusals, its audit records (equal to gRPC's), and the OpenAPI
//! document (served, equal to docs/openapi.json, covering every RPC).
//!
//! `TENANT_KMS_WRITE_OPENAPI=1 cargo test --release --test integration rest::openapi` rewrites
//! docs/openapi.json from the server after a change to the protos or the routes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use base64::Engine as _;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tenant_kms::audit::{AuditRecord, ListFilter};
use tenant_kms::auth::{Role, TokenSpec, issue_token};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// An HTTP/1.1 client of one server, sending `token` (or none).
struct Http {
    addr: std::net::SocketAddr,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// One answer: HTTP status, headers, and the body parsed as JSON.
struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    json: Value,
}

impl Http {
    fn new(server: &TestServer, token: Option<&str>) -> Self {
        Self {
            addr: server.addr,
            token: token.map(str::to_owned),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn admin(server: &TestServer) -> Self {
        Self::new(server, Some(&server.admin_token))
    }

    async fn send(&self, method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/json"),
            "{method} {path}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let json = serde_json::from_slice(&bytes).unwrap();
        Answer {
            status,
            headers,
            json,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send("POST", path, &body.to_string(), &[]).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, "", &[]).await
    }

    /// POST that must succeed; its JSON.
    async fn ok(&self, path: &str, body: Value) -> Value {
        let answer = self.post(path, body).await;
        assert_eq!(answer.status, 200, "POST {path}: {}", answer.json);
        answer.json
    }

    /// GET that must succeed; its JSON.
    async fn read(&self, path: &str) -> Value {
        let answer = self.get(path).await;
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.json);
        answer.json
    }
}

/// Asserts an error answer: HTTP status, google.rpc.Code, and the JSON error model's shape.
fn assert_error(answer: &Answer, http: u16, code: tonic::Code) {
    assert_eq!(answer.status, http, "{}", answer.json);
    assert_eq!(answer.json["code"], json!(code as i32), "{}", answer.json);
    assert!(
        answer.json["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(answer.json["details"].is_array());
}

fn records(server: &TestServer) -> Vec<AuditRecord> {
    server
        .state
        .audit_reader
        .list(&ListFilter {
            limit: 1_000_000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|(_, record)| record)
        .collect()
}

fn b64(json: &Value) -> Vec<u8> {
    B64.decode(json.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn openapi_document_is_served_without_a_token_equals_the_repo_file_and_covers_every_rpc() {
    let server = TestServer::start().await;
    let answer = Http::new(&server, None).get("/openapi.json").await;
    assert_eq!(answer.status, 200);
    let served = serde_json::to_string_pretty(&answer.json).unwrap() + "\n";
    let repo_file = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    if std::env::var_os("TENANT_KMS_WRITE_OPENAPI").is_some() {
        std::fs::write(repo_file, &served).unwrap();
    }
    assert_eq!(
        served,
        std::fs::read_to_string(repo_file).unwrap(),
        "docs/openapi.json is stale: rerun with TENANT_KMS_WRITE_OPENAPI=1"
    );
    assert_eq!(
        served,
        tenant_kms::service::rest::openapi_document().unwrap()
    );

    // Every RPC of every public service has exactly one operation.
    let mut operations = Vec::new();
    for methods in answer.json["paths"].as_object().unwrap().values() {
        for operation in methods.as_object().unwrap().values() {
            operations.push(operation["operationId"].as_str().unwrap().to_owned());
        }
    }
    let pool = tenant_kms::service::rest::descriptor_pool().unwrap();
    let mut rpcs = Vec::new();
    for service in pool
        .services()
        .filter(|s| s.full_name().starts_with("tenantkms.v1."))
    {
        for method in service.methods() {
            rpcs.push(format!("{}_{}", service.name(), method.name()));
        }
    }
    operations.sort();
    rpcs.sort();
    assert_eq!(operations, rpcs);
    assert!(rpcs.len() >= 27, "{rpcs:?}");
    server.stop().await;
}

#[tokio::test]
async fn every_rpc_family_works_over_http() {
    let server = TestServer::start().await;
    let http = Http::admin(&server);

    // Tenants.
    let tenant = http.ok("/v1/tenants", json!({"tenantId": "acme"})).await;
    assert_eq!(tenant["tenantId"], "acme");
    assert_eq!(tenant["state"], "TENANT_STATE_ACTIVE");
    assert_eq!(tenant["primaryVersion"], 1);
    assert!(tenant["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(http.read("/v1/tenants/acme").await["tenantId"], "acme");
    let listed = http.read("/v1/tenants?page_size=10").await;
    assert_eq!(listed["tenants"].as_array().unwrap().len(), 1);
    assert_error(
        &http.post("/v1/tenants", json!({"tenant_id": "acme"})).await,
        409,
        tonic::Code::AlreadyExists,
    );
    assert_error(
        &http.get("/v1/tenants/nobody").await,
        404,
        tonic::Code::NotFound,
    );

    // Encrypt and decrypt (bytes as base64), bound to the AAD.
    let sealed = http
        .ok(
            "/v1/tenants/acme:encrypt",
            json!({"context": "crm.email", "plaintext": B64.encode("alice@example.com"), "aad": B64.encode("contact:42")}),
        )
        .await;
    assert_eq!(sealed["keyVersion"], 1);
    let opened = http
        .ok(
            "/v1/tenants/acme:decrypt",
            json!({"context": "crm.email", "ciphertext": sealed["ciphertext"], "aad": B64.encode("contact:42")}),
        )
        .await;
    assert_eq!(b64(&opened["plaintext"]), b"alice@example.com");
    let wrong_row = http
        .post(
            "/v1/tenants/acme:decrypt",
            json!({"context": "crm.email", "ciphertext": sealed["ciphertext"], "aad": B64.encode("contact:99")}),
        )
        .await;
    assert_error(&wrong_row, 400, tonic::Code::InvalidArgument);
    assert!(wrong_row.headers.contains_key("x-request-id"));

    // Batches, with per-item results.
    let batch = http
        .ok(
            "/v1/tenants/acme:encryptBatch",
            json!({"items": [{"context": "a", "plaintext": B64.encode("one")}, {"context": "", "plaintext": ""}]}),
        )
        .await;
    let results = batch["results"].as_array().unwrap();
    assert!(results[0]["output"]["ciphertext"].is_string());
    assert_eq!(results[1]["error"]["code"], 3);
    let opened = http
        .ok(
            "/v1/tenants/acme:decryptBatch",
            json!({"items": [{"context": "a", "ciphertext": results[0]["output"]["ciphertext"]}]}),
        )
        .await;
    assert_eq!(b64(&opened["results"][0]["output"]["plaintext"]), b"one");

    // Data keys.
    let key = http
        .ok(
            "/v1/tenants/acme:generateDataKey",
            json!({"context": "files"}),
        )
        .await;
    assert_eq!(b64(&key["plaintextKey"]).len(), 32);
    let unwrapped = http
        .ok(
            "/v1/tenants/acme:decryptDataKey",
            json!({"context": "files", "wrappedKey": key["wrappedKey"]}),
        )
        .await;
    assert_eq!(unwrapped["plaintextKey"], key["plaintextKey"]);
    let wrapped_only = http
        .ok(
            "/v1/tenants/acme:generateDataKeyWithoutPlaintext",
            json!({"context": "files", "aad": B64.encode("bucket-7")}),
        )
        .await;
    assert!(wrapped_only.get("plaintextKey").is_none());
    let unwrapped = http
        .ok(
            "/v1/tenants/acme:decryptDataKey",
            json!({"context": "files", "wrappedKey": wrapped_only["wrappedKey"], "aad": B64.encode("bucket-7")}),
        )
        .await;
    assert_eq!(b64(&unwrapped["plaintextKey"]).len(), 32);

    // Rotation, key versions and rewrap.
    let rotated = http.ok("/v1/tenants/acme:rotateKey", json!({})).await;
    assert_eq!(rotated["primaryVersion"], 2);
    let rewrapped = http
        .ok(
            "/v1/tenants/acme:rewrap",
            json!({"context": "crm.email", "ciphertext": sealed["ciphertext"], "aad": B64.encode("contact:42")}),
        )
        .await;
    assert_eq!(rewrapped["keyVersion"], 2);
    let rewrapped = http
        .ok(
            "/v1/tenants/acme:rewrapBatch",
            json!({"items": [{"context": "crm.email", "ciphertext": sealed["ciphertext"], "aad": B64.encode("contact:42")}]}),
        )
        .await;
    assert_eq!(rewrapped["results"][0]["output"]["keyVersion"], 2);
    let versions = http.read("/v1/tenants/acme/keyVersions").await;
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    assert_eq!(
        versions["versions"][0]["encryptions"]
            .as_str()
            .map(|s| s.parse::<u64>().is_ok()),
        Some(true),
        "uint64 as a string"
    );
    let disabled = http
        .ok("/v1/tenants/acme/keyVersions/1:disable", json!({}))
        .await;
    assert_eq!(disabled["state"], "KEY_VERSION_STATE_DISABLED");
    let refused = http
        .post(
            "/v1/tenants/acme:decrypt",
            json!({"context": "crm.email", "ciphertext": sealed["ciphertext"], "aad": B64.encode("contact:42")}),
        )
        .await;
    assert_error(&refused, 400, tonic::Code::FailedPrecondition);
    let enabled = http
        .ok("/v1/tenants/acme/keyVersions/1:enable", json!({}))
        .await;
    assert_eq!(enabled["state"], "KEY_VERSION_STATE_ENABLED");
    assert_error(
        &http
            .post("/v1/tenants/acme/keyVersions/2:destroy", json!({}))
            .await,
        400,
        tonic::Code::FailedPrecondition,
    );
    let policy = http
        .ok(
            "/v1/tenants/acme:setRotationPolicy",
            json!({"rotationPeriodSeconds": "86400"}),
        )
        .await;
    assert_eq!(policy["rotationPolicy"]["rotationPeriodSeconds"], "86400");

    // Searchable columns.
    let index = http
        .ok(
            "/v1/blindIndexes",
            json!({"name": "email", "bits": 32, "normalization": "casefold_trim"}),
        )
        .await;
    assert_eq!(index["name"], "email");
    assert_eq!(
        http.read("/v1/blindIndexes?tenant_id=acme").await["definitions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let indexes = http
        .ok(
            "/v1/tenants/acme:computeBlindIndex",
            json!({"indexName": "email", "values": [B64.encode("A@x.org"), B64.encode(" a@x.org")]}),
        )
        .await;
    assert_eq!(
        indexes["results"][0]["output"]["indexes"][0]["index"],
        indexes["results"][1]["output"]["indexes"][0]["index"]
    );

    // Lifecycle.
    assert_eq!(
        http.ok("/v1/tenants/acme:suspend", json!({})).await["state"],
        "TENANT_STATE_SUSPENDED"
    );
    assert_eq!(
        http.ok("/v1/tenants/acme:resume", json!({})).await["state"],
        "TENANT_STATE_ACTIVE"
    );
    let pending = http
        .ok(
            "/v1/tenants/acme:scheduleDeletion",
            json!({"waitingPeriodSeconds": "3600"}),
        )
        .await;
    assert_eq!(pending["state"], "TENANT_STATE_PENDING_DELETION");
    assert_eq!(
        http.ok("/v1/tenants/acme:cancelDeletion", json!({})).await["state"],
        "TENANT_STATE_ACTIVE"
    );

    // Audit: the HTTP calls above, listed and verified over HTTP.
    let events = http
        .read("/v1/tenants/acme/auditEvents?operation=Encrypt&page_size=100")
        .await;
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["outcome"], "ok");
    assert_eq!(events[0]["contexts"], json!(["crm.email"]));
    let verified = http.ok("/v1/auditChain:verify", json!({})).await;
    assert_eq!(verified["ok"], true);
    assert!(
        verified["recordsChecked"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 20
    );
    server.stop().await;
}

#[tokio::test]
async fn tokens_authenticate_and_authorize_http_calls_as_grpc_calls() {
    let server = TestServer::start().await;
    let admin = Http::admin(&server);
    admin.ok("/v1/tenants", json!({"tenantId": "acme"})).await;
    admin.ok("/v1/tenants", json!({"tenantId": "globex"})).await;
    let encrypt = json!({"context": "c", "plaintext": B64.encode("x")});

    assert_error(
        &Http::new(&server, None)
            .post("/v1/tenants/acme:encrypt", encrypt.clone())
            .await,
        401,
        tonic::Code::Unauthenticated,
    );
    assert_error(
        &Http::new(&server, Some("not-a-token"))
            .post("/v1/tenants/acme:encrypt", encrypt.clone())
            .await,
        401,
        tonic::Code::Unauthenticated,
    );

    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "acme-app".into(),
            role: Role::Service,
            tenants: "acme".into(),
            operations: "*".into(),
            ttl_seconds: None,
        },
        server.state.options.clock.as_ref(),
    )
    .unwrap();
    let service = Http::new(&server, Some(issued.secret.as_str()));
    assert_eq!(
        service
            .post("/v1/tenants/acme:encrypt", encrypt.clone())
            .await
            .status,
        200
    );
    assert_error(
        &service
            .post("/v1/tenants/globex:encrypt", encrypt.clone())
            .await,
        403,
        tonic::Code::PermissionDenied,
    );
    assert_error(
        &service
            .post("/v1/tenants", json!({"tenantId": "initech"}))
            .await,
        403,
        tonic::Code::PermissionDenied,
    );
    assert_error(
        &service.get("/v1/tenants").await,
        403,
        tonic::Code::PermissionDenied,
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_refused_and_change_nothing() {
    // A small message limit keeps the over-large body small enough to send whole.
    let server = TestServer::start_configured(|o| o.limits.max_message_bytes = 1 << 20).await;
    let http = Http::admin(&server);
    http.ok("/v1/tenants", json!({"tenantId": "acme"})).await;
    let before = records(&server).len();

    for (path, body) in [
        ("/v1/tenants", "{\"tenantId\": \"initech\""),
        ("/v1/tenants", "[\"initech\"]"),
        (
            "/v1/tenants",
            "{\"tenantId\": \"initech\", \"colour\": \"red\"}",
        ),
        ("/v1/tenants/acme:rotateKey", "{\"tenantId\": \"acme\"}"),
        (
            "/v1/tenants/acme:encrypt",
            "{\"context\": \"c\", \"plaintext\": \"not base64!\"}",
        ),
        ("/v1/tenants/acme/keyVersions/one:disable", "{}"),
    ] {
        let answer = http.send("POST", path, body, &[]).await;
        assert_error(&answer, 400, tonic::Code::InvalidArgument);
    }
    assert_error(
        &http.get("/v1/tenants?page_size=1&page_size=2").await,
        400,
        tonic::Code::InvalidArgument,
    );
    let unknown = http.get("/v1/nothing/here").await;
    assert_error(&unknown, 404, tonic::Code::NotFound);
    let unknown = http.get("/favicon.ico").await;
    assert_error(&unknown, 404, tonic::Code::NotFound);
    let wrong_method = http.send("DELETE", "/v1/tenants/acme", "", &[]).await;
    assert_error(&wrong_method, 405, tonic::Code::Unimplemented);
    assert_eq!(wrong_method.headers["allow"], "GET");
    // A body over twice the message limit is refused before it is read whole.
    let limit = server.state.options.limits.max_message_bytes;
    let huge = format!(
        "{{\"context\": \"c\", \"plaintext\": \"{}\"}}",
        "A".repeat(limit * 2)
    );
    assert_error(
        &http
            .send("POST", "/v1/tenants/acme:encrypt", &huge, &[])
            .await,
        413,
        tonic::Code::ResourceExhausted,
    );

    assert_eq!(
        records(&server).len(),
        before,
        "refused before any call: nothing audited"
    );
    let tenants = http.read("/v1/tenants").await;
    assert_eq!(
        tenants["tenants"].as_array().unwrap().len(),
        1,
        "nothing created"
    );
    assert_eq!(
        http.read("/v1/tenants/acme").await["primaryVersion"],
        1,
        "nothing rotated"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_calls_leave_the_audit_records_grpc_calls_leave() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let http = Http::admin(&server);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "globex-app".into(),
            role: Role::Service,
            tenants: "globex".into(),
            operations: "*".into(),
            ttl_seconds: None,
        },
        server.state.options.clock.as_ref(),
    )
    .unwrap();
    let other_tenant = issued.secret.as_str().to_owned();

    // The same four calls each way: a success (traced), a refusal by the key, one by the key
    // versions' state machine, and one by authorization.
    let sealed = encrypt(&mut keys, "acme", "crm.email", b"v", b"row-1").await;
    let mut grpc_calls = Vec::new();
    let mut request = tonic::Request::new(encrypt_request("acme", "crm.email", b"v", b"row-1"));
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    grpc_calls.push(keys.encrypt(request).await.map(drop));
    grpc_calls.push(
        decrypt(&mut keys, "acme", "crm.email", &sealed.ciphertext, b"row-2")
            .await
            .map(drop),
    );
    grpc_calls.push(disable_key_version(&mut tenants, "acme", 1).await.map(drop));
    let (mut outsider, _, _) = server.clients_with(Some(&other_tenant)).await;
    grpc_calls.push(
        outsider
            .encrypt(encrypt_request("acme", "crm.email", b"v", b""))
            .await
            .map(drop),
    );
    assert!(grpc_calls[0].is_ok() && grpc_calls[1..].iter().all(Result::is_err));
    let grpc_records = records(&server);

    let body =
        json!({"context": "crm.email", "plaintext": B64.encode("v"), "aad": B64.encode("row-1")});
    let answer = http
        .send(
            "POST",
            "/v1/tenants/acme:encrypt",
            &body.to_string(),
            &[("traceparent", traceparent)],
        )
        .await;
    assert_eq!(answer.status, 200);
    let wrong_row = json!({"context": "crm.email", "ciphertext": B64.encode(&sealed.ciphertext), "aad": B64.encode("row-2")});
    assert_eq!(
        http.post("/v1/tenants/acme:decrypt", wrong_row)
            .await
            .status,
        400
    );
    assert_eq!(
        http.post("/v1/tenants/acme/keyVersions/1:disable", json!({}))
            .await
            .status,
        400
    );
    let body = json!({"context": "crm.email", "plaintext": B64.encode("v")});
    assert_eq!(
        Http::new(&server, Some(&other_tenant))
            .post("/v1/tenants/acme:encrypt", body)
            .await
            .status,
        403
    );
    let all = records(&server);
    let http_records = &all[grpc_records.len()..];

    let comparable = |r: &AuditRecord| {
        (
            r.caller.clone(),
            r.peer.split(':').next().unwrap().to_owned(),
            r.tenant_id.clone(),
            r.operation.clone(),
            r.contexts.clone(),
            r.key_versions.clone(),
            r.item_count,
            format!("{:?}", r.outcome),
            r.aad_fingerprint.clone(),
            r.detail.clone(),
            r.trace_parent.clone(),
        )
    };
    // The key store's anchor records (system, written after a store change) are not calls.
    let calls = |records: &[AuditRecord]| -> Vec<_> {
        let calls: Vec<_> = records
            .iter()
            .filter(|r| !r.caller.starts_with("system:"))
            .map(comparable)
            .collect();
        calls[calls.len() - 4..].to_vec()
    };
    let grpc_last = calls(&grpc_records);
    let http_all = calls(http_records);
    assert_eq!(http_all, grpc_last);
    assert_eq!(http_all[0].10, traceparent);
    // The request id the HTTP caller saw is the one its record carries.
    assert_eq!(
        answer.headers["x-request-id"].to_str().unwrap(),
        http_records[0].request_id
    );
    server.stop().await;
}

#[tokio::test]
async fn rate_limits_are_shared_with_grpc_and_refusals_keep_their_retry_hints() {
    let server = TestServer::start_configured(|o| {
        o.limits.rate_limit = tenant_kms::auth::rate::RateLimit {
            per_second: 0.01,
            burst: 3,
        };
    })
    .await;
    let (_, mut admin, _) = server.clients().await;
    create_tenant(&mut admin, "acme").await;
    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "acme-app".into(),
            role: Role::Service,
            tenants: "acme".into(),
            operations: "*".into(),
            ttl_seconds: None,
        },
        server.state.options.clock.as_ref(),
    )
    .unwrap();
    let (mut keys, _, _) = server.clients_with(Some(issued.secret.as_str())).await;
    encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    let http = Http::new(&server, Some(issued.secret.as_str()));
    let body = json!({"context": "ctx", "plaintext": B64.encode("v")});
    assert_eq!(
        http.post("/v1/tenants/acme:encrypt", body.clone())
            .await
            .status,
        200
    );
    // The caller's fourth call, whichever the transport, finds its bucket empty.
    let refused = http.post("/v1/tenants/acme:encrypt", body).await;
    assert_error(&refused, 429, tonic::Code::ResourceExhausted);
    let retry_ms: u64 = refused.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_ms > 1000,
        "one token at 0.01/s is ~100 s away: {retry_ms}"
    );
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(retry_after, retry_ms.div_ceil(1000));
    let detail = &refused.json["details"][0];
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.RetryInfo");
    assert!(detail["retryDelay"].as_str().unwrap().ends_with('s'));
    assert!(
        keys.encrypt(encrypt_request("acme", "ctx", b"v", b""))
            .await
            .is_err()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 over TLS: ALPN offers h2 and http/1.1.

/// A TLS connection to `addr` verifying the server as `localhost` against `ca_pem`, offering
/// the ALPN protocols `alpn`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_over_tls_reach_the_http_api_and_grpc_over_http1_is_refused() {
    let pki = common::tls::Pki::new("test CA");
    let server_pem = pki.issue(&["localhost"], true, false);
    let files = tenant_kms::service::TlsFiles {
        cert: pki.write("server.pem", &server_pem.cert),
        key: pki.write("server.key", &server_pem.key),
        client_ca: None,
    };
    let server = TestServer::start_configured(move |o| o.tls = Some(files)).await;

    // The server prefers h2 when a client offers both, whatever the client's order; a client
    // offering http/1.1 only gets it (tonic's own acceptor offered h2 only: no protocol).
    let both = tls_connect(server.addr, &pki.ca_pem, &[b"http/1.1", b"h2"]).await;
    assert_eq!(both.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(both);
    let h1 = tls_connect(server.addr, &pki.ca_pem, &[b"http/1.1"]).await;
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(h1))
            .await
            .unwrap();
    tokio::spawn(connection);
    let token = format!("Bearer {}", server.admin_token);
    let mut send = async |path: &str, content_type: &str, body: Bytes| {
        let request = hyper::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "localhost")
            .header("content-type", content_type)
            .header("authorization", &token)
            .body(Full::new(body))
            .unwrap();
        // The connection is reused: wait until it has finished with the previous exchange.
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_11);
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        (status, headers, json)
    };

    // REST calls over HTTP/1.1 on TLS succeed and are audited like any call.
    let (status, _, tenant) = send(
        "/v1/tenants",
        "application/json",
        Bytes::from(json!({"tenantId": "acme"}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{tenant}");
    let body = json!({"context": "crm.email", "plaintext": B64.encode("over http/1.1")});
    let (status, headers, sealed) = send(
        "/v1/tenants/acme:encrypt",
        "application/json",
        Bytes::from(body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{sealed}");
    assert!(!b64(&sealed["ciphertext"]).is_empty());
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let audited = records(&server);
    let record = audited
        .iter()
        .find(|r| r.request_id == request_id)
        .expect("the HTTP/1.1 call is audited");
    assert_eq!(record.operation, "Encrypt");
    assert_eq!(record.tenant_id, "acme");
    assert!(matches!(record.outcome, tenant_kms::audit::Outcome::Ok));

    // gRPC over HTTP/1.1 is refused with a clear status, and nothing is called or audited.
    let before = records(&server).len();
    let (status, headers, error) = send(
        "/tenantkms.v1.KeyService/Encrypt",
        "application/grpc",
        Bytes::from_static(&[0, 0, 0, 0, 0]),
    )
    .await;
    assert_eq!(status, 505, "{error}");
    assert_eq!(headers["grpc-status"], "12");
    assert_eq!(error["code"], json!(tonic::Code::Unimplemented as i32));
    assert!(
        error["message"].as_str().unwrap().contains("HTTP/2"),
        "{error}"
    );
    assert_eq!(records(&server).len(), before);
    server.stop().await;
}
