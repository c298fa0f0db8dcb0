//! The Rust client against a real server in process: every typed call, token and TLS
//! set-up, retries on the server's `retry-after-ms`, and the envelope helper end to end.

// Test code: a failed set-up step should panic with its cause (as in the server's tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
#[path = "../../../tests/common/tls.rs"]
#[allow(dead_code)]
mod tls;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use support::Server;
use tenant_kms_client::envelope::Envelope;
use tenant_kms_client::envelope::cache::{CachePolicy, DataKeyCache, ManualClock};
use tenant_kms_client::{Client, ClientConfig, ConnectFailure, Error, RetryPolicy, pb};
use tonic::Code;
use zeroize::Zeroizing;

async fn admin(server: &Server) -> Client {
    ClientConfig::new(server.addr.to_string())
        .token(Zeroizing::new(server.admin_token.clone()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn tenant(client: &Client, id: &str) {
    client
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .unwrap();
}

fn code(error: Error) -> Code {
    match error {
        Error::Rpc(status) => status.code(),
        other => panic!("expected a status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_has_a_typed_call_that_reaches_the_server() {
    let server = Server::start(|_| {}).await;
    let c = admin(&server).await;
    let t = |s: &str| s.to_owned();

    let created = c
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: t("acme"),
        })
        .await
        .unwrap();
    assert_eq!(created.primary_version, 1);
    assert_eq!(
        c.get_tenant(pb::GetTenantRequest {
            tenant_id: t("acme")
        })
        .await
        .unwrap()
        .tenant_id,
        "acme"
    );
    let listed = c
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.tenants.len(), 1);

    let sealed = c
        .encrypt(pb::EncryptRequest {
            tenant_id: t("acme"),
            context: t("crm.email"),
            plaintext: b"a@example.com".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let opened = c
        .decrypt(pb::DecryptRequest {
            tenant_id: t("acme"),
            context: t("crm.email"),
            ciphertext: sealed.ciphertext.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"a@example.com");
    let batch = c
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: t("acme"),
            items: vec![pb::EncryptBatchItem {
                context: t("crm.email"),
                plaintext: b"x".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let Some(pb::encrypt_batch_result::Result::Output(item)) = &batch.results[0].result else {
        panic!("batch item failed");
    };
    let decrypted = c
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: t("acme"),
            items: vec![pb::DecryptBatchItem {
                context: t("crm.email"),
                ciphertext: item.ciphertext.clone(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    assert!(matches!(
        &decrypted.results[0].result,
        Some(pb::decrypt_batch_result::Result::Output(o)) if o.plaintext == b"x"
    ));

    let dk = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            tenant_id: t("acme"),
            context: t("files"),
        })
        .await
        .unwrap();
    let unwrapped = c
        .decrypt_data_key(pb::DecryptDataKeyRequest {
            tenant_id: t("acme"),
            context: t("files"),
            wrapped_key: dk.wrapped_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(unwrapped.plaintext_key, dk.plaintext_key);
    let wrapped_only = c
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            tenant_id: t("acme"),
            context: t("files"),
            aad: b"row-1".to_vec(),
        })
        .await
        .unwrap();
    assert!(!wrapped_only.wrapped_key.is_empty());

    let rotated = c
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: t("acme"),
        })
        .await
        .unwrap();
    assert_eq!(rotated.primary_version, 2);
    let rewrapped = c
        .rewrap(pb::RewrapRequest {
            tenant_id: t("acme"),
            context: t("crm.email"),
            ciphertext: sealed.ciphertext.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rewrapped.key_version, 2);
    let rewrapped_batch = c
        .rewrap_batch(pb::RewrapBatchRequest {
            tenant_id: t("acme"),
            items: vec![pb::RewrapBatchItem {
                context: t("crm.email"),
                ciphertext: sealed.ciphertext.clone(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    assert_eq!(rewrapped_batch.results.len(), 1);
    let versions = c
        .list_key_versions(pb::ListKeyVersionsRequest {
            tenant_id: t("acme"),
        })
        .await
        .unwrap();
    assert_eq!(versions.versions.len(), 2);
    let version = |version| pb::DisableKeyVersionRequest {
        tenant_id: t("acme"),
        version,
    };
    c.disable_key_version(version(1)).await.unwrap();
    c.enable_key_version(pb::EnableKeyVersionRequest {
        tenant_id: t("acme"),
        version: 1,
    })
    .await
    .unwrap();
    let destroyed = c
        .destroy_key_version(pb::DestroyKeyVersionRequest {
            tenant_id: t("acme"),
            version: 1,
        })
        .await
        .unwrap();
    assert_eq!(destroyed.state, pb::KeyVersionState::Destroyed as i32);
    c.set_rotation_policy(pb::SetRotationPolicyRequest {
        tenant_id: t("acme"),
        rotation_period_seconds: 86_400,
        ..Default::default()
    })
    .await
    .unwrap();

    c.declare_blind_index(pb::DeclareBlindIndexRequest {
        tenant_id: t("acme"),
        name: t("email"),
        bits: 32,
        normalization: t("exact"),
    })
    .await
    .unwrap();
    let indexes = c
        .list_blind_indexes(pb::ListBlindIndexesRequest {
            tenant_id: t("acme"),
        })
        .await
        .unwrap();
    assert_eq!(indexes.definitions.len(), 1);
    let computed = c
        .compute_blind_index(pb::ComputeBlindIndexRequest {
            tenant_id: t("acme"),
            index_name: t("email"),
            values: vec![b"a@example.com".to_vec()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(computed.results.len(), 1);

    c.suspend_tenant(pb::SuspendTenantRequest {
        tenant_id: t("acme"),
    })
    .await
    .unwrap();
    c.resume_tenant(pb::ResumeTenantRequest {
        tenant_id: t("acme"),
    })
    .await
    .unwrap();
    c.schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest {
        tenant_id: t("acme"),
        waiting_period_seconds: Some(3600),
    })
    .await
    .unwrap();
    c.cancel_tenant_deletion(pb::CancelTenantDeletionRequest {
        tenant_id: t("acme"),
    })
    .await
    .unwrap();

    let events = c
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: t("acme"),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        events
            .events
            .iter()
            .any(|e| e.operation == "GenerateDataKey")
    );
    let chain = c
        .verify_audit_chain(pb::VerifyAuditChainRequest::default())
        .await
        .unwrap();
    assert!(chain.ok);

    // A refusal is the server's status, unchanged and not retried.
    let again = c
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: t("acme"),
        })
        .await
        .unwrap_err();
    assert_eq!(code(again), Code::AlreadyExists);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_the_environment_names_and_a_bad_one_is_refused() {
    let server = Server::start(|_| {}).await;
    let addr = server.addr.to_string();
    let token = server.admin_token.clone();
    let env = |name: &str| match name {
        "TENANT_KMS_ADDR" => Some(addr.clone()),
        "TENANT_KMS_TOKEN" => Some(token.clone()),
        _ => None,
    };
    let client = ClientConfig::from_lookup(env)
        .unwrap()
        .connect()
        .await
        .unwrap();
    tenant(&client, "acme").await;

    let wrong = ClientConfig::new(server.addr.to_string())
        .token(Zeroizing::new("tkms_not_a_token".into()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let refused = wrong
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(refused), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_named_ca_and_a_client_certificate() {
    let pki = tls::Pki::new("client-test-ca");
    let server_pem = pki.issue(&["localhost"], true, false);
    let client_pem = pki.issue(&["app"], false, false);
    let files = tenant_kms::service::TlsFiles {
        cert: pki.write("server.pem", &server_pem.cert),
        key: pki.write("server.key", &server_pem.key),
        client_ca: Some(pki.write("ca.pem", &pki.ca_pem)),
    };
    let server = Server::start(|o| o.tls = Some(files)).await;
    let ca = pki.write("ca-for-client.pem", &pki.ca_pem);
    let cert = pki.write("client.pem", &client_pem.cert);
    let key = pki.write("client.key", &client_pem.key);

    // host:port with a CA becomes https.
    let client = ClientConfig::new(server.addr.to_string())
        .ca_cert_file(&ca)
        .unwrap()
        .client_cert_files(&cert, &key)
        .unwrap()
        .token(Zeroizing::new(server.admin_token.clone()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tenant(&client, "acme").await;

    // Another CA: the handshake fails and says so.
    let other = tls::Pki::new("other-ca");
    let other_ca = other.write("ca.pem", &other.ca_pem);
    let failed = ClientConfig::new(server.addr.to_string())
        .ca_cert_file(&other_ca)
        .unwrap()
        .client_cert_files(&cert, &key)
        .unwrap()
        .retry(RetryPolicy::never())
        .connect()
        .await;
    assert!(
        matches!(
            failed,
            Err(Error::Connect {
                failure: ConnectFailure::UnknownCa,
                ..
            })
        ),
        "untrusted server certificate"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_with_retry_after_ms_are_retried_after_the_hint() {
    // One call per second per caller: the second of two calls in a row is refused at
    // admission with a hint, before it does anything.
    let server = Server::start(|o| {
        o.limits.rate_limit = tenant_kms::auth::rate::RateLimit {
            per_second: 2.0,
            burst: 1,
        }
    })
    .await;
    let patient = admin(&server).await;
    let impatient = ClientConfig::new(server.addr.to_string())
        .token(Zeroizing::new(server.admin_token.clone()))
        .unwrap()
        .retry(RetryPolicy::never())
        .connect()
        .await
        .unwrap();
    // Without retries, a burst is refused with the hint (this is what the retry honours).
    let mut refused = None;
    for _ in 0..3 {
        if let Err(Error::Rpc(status)) = impatient
            .list_tenants(pb::ListTenantsRequest::default())
            .await
        {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a burst past the limit is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let hint = tenant_kms_client::retry::retry_after(&refused).expect("retry-after-ms");
    assert!(hint > Duration::ZERO && hint <= Duration::from_secs(1));

    // With the default policy the same burst succeeds, CreateTenant included (not
    // idempotent, but a hinted refusal did nothing).
    for i in 0..3 {
        patient
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: format!("t{i}"),
            })
            .await
            .unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_client_reports_an_unreachable_server_as_unavailable_after_its_retries() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = ClientConfig::new(format!("127.0.0.1:{port}"))
        .retry(RetryPolicy {
            base_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        })
        .connect_lazy()
        .unwrap();
    let answer = client
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(answer), Code::Unavailable);
    let eager = ClientConfig::new(format!("127.0.0.1:{port}"))
        .connect()
        .await;
    assert!(matches!(
        eager,
        Err(Error::Connect { failure: ConnectFailure::Refused, detail }) if detail.contains(&port.to_string())
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_of_values_and_files_round_trip_through_the_server() {
    let server = Server::start(|_| {}).await;
    let client = admin(&server).await;
    tenant(&client, "acme").await;
    tenant(&client, "globex").await;
    let envelope = Envelope::new(client.clone())
        .with_segment_size(1024)
        .unwrap();

    let value: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let sealed = envelope
        .encrypt_value("acme", "crm.files", &value)
        .await
        .unwrap();
    assert_eq!(
        envelope
            .decrypt_value("acme", "crm.files", &sealed)
            .await
            .unwrap()
            .as_slice(),
        value
    );
    // The header names its tenant and context; another expectation is refused before any
    // key is asked for.
    for (t, c) in [("globex", "crm.files"), ("acme", "crm.other")] {
        assert!(matches!(
            envelope.decrypt_value(t, c, &sealed).await,
            Err(Error::Format(_))
        ));
    }

    // A file larger than many segments, streamed both ways.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.bin");
    let mut file = std::fs::File::create(&plain).unwrap();
    for i in 0..300u32 {
        file.write_all(&[(i % 256) as u8; 1000]).unwrap();
    }
    drop(file);
    let sealed_path = dir.path().join("sealed.tke");
    let opened_path = dir.path().join("opened.bin");
    let n = envelope
        .encrypt_file("acme", "crm.files", &plain, &sealed_path)
        .await
        .unwrap();
    assert_eq!(n, 300_000);
    envelope
        .decrypt_file("acme", "crm.files", &sealed_path, &opened_path)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(&opened_path).unwrap(),
        std::fs::read(&plain).unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&opened_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "plaintext output is private");
    }

    // A truncated file does not open, and leaves no output behind.
    let mut cut = std::fs::read(&sealed_path).unwrap();
    cut.truncate(cut.len() - 1100);
    let cut_path = dir.path().join("cut.tke");
    std::fs::write(&cut_path, &cut).unwrap();
    let out = dir.path().join("from-cut.bin");
    assert!(matches!(
        envelope
            .decrypt_file("acme", "crm.files", &cut_path, &out)
            .await,
        Err(Error::Decrypt)
    ));
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file left");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_spares_server_calls_within_its_limits_only() {
    let server = Server::start(|_| {}).await;
    let client = admin(&server).await;
    tenant(&client, "acme").await;
    let clock = Arc::new(ManualClock::default());
    let cache = DataKeyCache::with_clock(
        CachePolicy {
            max_age: Duration::from_secs(60),
            max_messages: 3,
            max_bytes: 1 << 20,
            capacity: 10,
        },
        clock.clone(),
    );
    let envelope = Envelope::new(client.clone()).with_cache(cache);
    let data_key_calls = || {
        let client = client.clone();
        async move {
            client
                .list_audit_events(pb::ListAuditEventsRequest {
                    tenant_id: "acme".into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .events
                .iter()
                .filter(|e| e.operation == "GenerateDataKey" || e.operation == "DecryptDataKey")
                .count()
        }
    };
    let mut sealed = Vec::new();
    for i in 0..4u8 {
        sealed.push(
            envelope
                .encrypt_value("acme", "c", &[i; 100])
                .await
                .unwrap(),
        );
    }
    // Messages 1-3 share a key; the fourth needs a new one.
    assert_eq!(data_key_calls().await, 2);
    assert_eq!(wrapped_key(&sealed[0]), wrapped_key(&sealed[2]));
    assert_ne!(wrapped_key(&sealed[2]), wrapped_key(&sealed[3]));
    // Opening: one DecryptDataKey per distinct key within the limits.
    for s in &sealed {
        envelope.decrypt_value("acme", "c", s).await.unwrap();
    }
    assert_eq!(data_key_calls().await, 4);
    // Past the age limit nothing cached is used.
    clock.advance(Duration::from_secs(60));
    envelope.encrypt_value("acme", "c", b"x").await.unwrap();
    envelope
        .decrypt_value("acme", "c", &sealed[3])
        .await
        .unwrap();
    assert_eq!(data_key_calls().await, 6);
    server.stop().await;
}

fn wrapped_key(envelope: &[u8]) -> Vec<u8> {
    let mut input = envelope;
    tenant_kms_client::envelope::stream::read_header(&mut input)
        .unwrap()
        .0
        .wrapped_key
}
