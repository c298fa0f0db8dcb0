//! Issue 16's anomaly detectors through the real server (in process, on a manual clock): each
//! detector fires on its pattern and leaves an Anomaly record found through ListAuditEvents;
//! a detector switched off stays silent; opt-in containment throttles the caller and says so
//! in the record; a steady mixed load over simulated hours at the defaults finds nothing, and
//! the same load at the defaults does find a spike; over mTLS a new client certificate is a
//! new peer. The webhook's tests (`webhook.rs`) reuse this module's helpers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tenant_kms::auth::rate::RateLimit;
use tenant_kms::auth::{Role, TokenSpec, issue_token};
use tenant_kms::detect::{Detector, Policy};
use tenant_kms::pb;
use tenant_kms::pb::key_service_client::KeyServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The status of a call that must fail (responses carrying plaintext have no `Debug`).
pub(crate) trait Refused {
    fn refused(self) -> tonic::Status;
}

impl<T> Refused for Result<T, tonic::Status> {
    fn refused(self) -> tonic::Status {
        match self {
            Ok(_) => panic!("the call succeeded"),
            Err(status) => status,
        }
    }
}

pub(crate) const START_MICROS: i64 = 1_900_000_000_000_000;
const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const CONTEXT: &str = "crm.contacts.email";

/// A token of `role` for `tenants`; returns (secret, audit caller name).
pub(crate) fn issue(server: &TestServer, role: Role, tenants: &str) -> (String, String) {
    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "detect".into(),
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

/// A server on a manual clock with detector settings `policy`.
async fn server_with(policy: Policy) -> (TestServer, Arc<ManualClock>) {
    server_configured(policy, |_| {}).await
}

/// A server on a manual clock with detector settings `policy`, and `configure` applied to
/// its options.
pub(crate) async fn server_configured(
    policy: Policy,
    configure: impl FnOnce(&mut tenant_kms::service::ServiceOptions),
) -> (TestServer, Arc<ManualClock>) {
    let clock = ManualClock::at_micros(START_MICROS);
    let shared: SharedClock = clock.clone();
    let server = TestServer::start_configured(|options| {
        options.clock = shared;
        options.detect = policy;
        configure(options);
    })
    .await;
    (server, clock)
}

/// The Anomaly events of `tenant` through the API (as an operator investigating would).
pub(crate) async fn anomalies(audit: &mut Audit, tenant: &str) -> Vec<pb::AuditEvent> {
    audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: tenant.into(),
            operation: "Anomaly".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

pub(crate) fn detector_of(event: &pb::AuditEvent) -> &str {
    event
        .contexts
        .iter()
        .find_map(|c| c.strip_prefix("detector:"))
        .unwrap_or("")
}

/// Policies with every detector at a test-friendly setting and warm-ups short.
pub(crate) fn quick() -> Policy {
    let mut p = Policy::default();
    p.spike.floor = 20;
    p.spike.warmup = 3;
    p.enumeration.new_tenants = 5;
    p.enumeration.learning_micros = 0;
    p.probing.tenants = 3;
    p.tamper.failures = 3;
    p.peer.learning_micros = 60_000_000;
    p
}

async fn decrypt_ok(keys: &mut Keys, tenant: &str, ciphertext: &[u8]) {
    decrypt(keys, tenant, CONTEXT, ciphertext, b"")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrypt_spike_far_above_the_callers_baseline_is_an_anomaly() {
    let (server, clock) = server_with(quick()).await;
    let (_, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let (token, caller) = issue(&server, Role::Service, "acme");
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    let ct = encrypt(&mut keys, "acme", CONTEXT, b"v", b"")
        .await
        .ciphertext;
    let before = tenant_kms::metrics::global().anomalies(Detector::RateSpike);
    // Five minutes at 5 decrypts a minute: the baseline.
    for _ in 0..5 {
        for _ in 0..5 {
            decrypt_ok(&mut keys, "acme", &ct).await;
        }
        clock.advance(MINUTE);
    }
    assert!(anomalies(&mut audit, "acme").await.is_empty());
    // Then 50 in one minute (10 × 5 = 50, the threshold): still nothing; the 51st trips.
    for _ in 0..50 {
        decrypt_ok(&mut keys, "acme", &ct).await;
    }
    assert!(anomalies(&mut audit, "acme").await.is_empty());
    decrypt_ok(&mut keys, "acme", &ct).await;
    let found = anomalies(&mut audit, "acme").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let event = &found[0];
    assert_eq!(detector_of(event), "rate_spike");
    assert_eq!(event.caller, caller);
    assert!(event.detail.contains("decrypted=51"), "{}", event.detail);
    assert!(event.detail.contains("baseline=5.0"), "{}", event.detail);
    assert!(tenant_kms::metrics::global().anomalies(Detector::RateSpike) > before);
    // More of the same within the repeat window: no second record.
    for _ in 0..20 {
        decrypt_ok(&mut keys, "acme", &ct).await;
    }
    assert_eq!(anomalies(&mut audit, "acme").await.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_naming_many_new_tenants_is_enumerating() {
    let (server, _clock) = server_with(quick()).await;
    let (_, mut tenants, mut audit) = server.clients().await;
    // The admin creates them: a tenant one creates is not "new" to it.
    for i in 0..6 {
        create_tenant(&mut tenants, &format!("t{i}")).await;
    }
    assert!(anomalies(&mut audit, "t5").await.is_empty());
    // A second all-tenant caller reads them one after another; the fifth new one trips.
    let (token, caller) = issue(&server, Role::Service, "*");
    let (_, mut reader, _) = server.clients_with(Some(&token)).await;
    for i in 0..5 {
        get_tenant(&mut reader, &format!("t{i}")).await.unwrap();
    }
    let found = anomalies(&mut audit, "t4").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(detector_of(&found[0]), "enumeration");
    assert_eq!(found[0].caller, caller);
    assert!(
        found[0].detail.contains("new_tenants=5"),
        "{}",
        found[0].detail
    );
    // Tenants it already named are not new.
    for i in 0..5 {
        get_tenant(&mut reader, &format!("t{i}")).await.unwrap();
    }
    get_tenant(&mut reader, "t5").await.unwrap();
    assert!(anomalies(&mut audit, "t5").await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_across_tenant_ids_are_probing_and_a_detector_switched_off_is_silent() {
    for off in [false, true] {
        let mut policy = quick();
        if off {
            policy.off = vec![Detector::Probing];
        }
        let (server, _clock) = server_with(policy).await;
        let (_, mut tenants, mut audit) = server.clients().await;
        for t in ["acme", "globex", "initech", "umbrella"] {
            create_tenant(&mut tenants, t).await;
        }
        let (token, caller) = issue(&server, Role::Service, "acme");
        let (mut keys, _, _) = server.clients_with(Some(&token)).await;
        for t in ["globex", "initech", "umbrella"] {
            let err = keys
                .encrypt(encrypt_request(t, CONTEXT, b"v", b""))
                .await
                .refused();
            assert_eq!(err.code(), Code::PermissionDenied);
        }
        let found = anomalies(&mut audit, "umbrella").await;
        if off {
            assert!(found.is_empty(), "{found:?}");
        } else {
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(detector_of(&found[0]), "probing");
            assert_eq!(found[0].caller, caller);
            assert!(found[0].detail.contains("refused_tenants=3"));
        }
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertexts_that_do_not_open_in_a_burst_are_tampering() {
    let (server, _clock) = server_with(quick()).await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "globex").await;
    let ct = encrypt(&mut keys, "acme", CONTEXT, b"v", b"row-1")
        .await
        .ciphertext;
    // Moved to another tenant, another row, another context: each fails alike.
    let err = decrypt(&mut keys, "globex", CONTEXT, &ct, b"row-1")
        .await
        .refused();
    assert_eq!(err.code(), Code::InvalidArgument);
    decrypt(&mut keys, "acme", CONTEXT, &ct, b"row-2")
        .await
        .refused();
    decrypt(&mut keys, "acme", "crm.other", &ct, b"row-1")
        .await
        .refused();
    assert!(
        anomalies(&mut audit, "acme").await.is_empty(),
        "2 for acme so far"
    );
    // A batch counts its failed items: one more for acme trips it.
    let response = keys
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![
                pb::DecryptBatchItem {
                    context: CONTEXT.into(),
                    ciphertext: ct.clone(),
                    aad: b"row-1".to_vec(),
                },
                pb::DecryptBatchItem {
                    context: CONTEXT.into(),
                    ciphertext: ct.clone(),
                    aad: b"row-9".to_vec(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 2);
    let found = anomalies(&mut audit, "acme").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(detector_of(&found[0]), "tampering");
    assert!(
        found[0].detail.contains("failed_opens=3"),
        "{}",
        found[0].detail
    );
    assert!(
        anomalies(&mut audit, "globex").await.is_empty(),
        "1 for globex"
    );
    server.stop().await;
}

/// A channel to `addr` whose connections come from `source` (another loopback address).
pub(crate) async fn channel_from(source: IpAddr, addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(
            move |_: tonic::codegen::http::Uri| async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                let stream = socket.connect(addr).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            },
        ))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_from_a_new_address_after_learning_is_an_anomaly() {
    let (server, clock) = server_with(quick()).await;
    let (_, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let (token, caller) = issue(&server, Role::Service, "*");
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    // Past the learning minute, the same address is fine...
    clock.advance(2 * MINUTE);
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    assert!(anomalies(&mut audit, "acme").await.is_empty());
    // ...and another one is not.
    let channel = channel_from("127.0.0.2".parse().unwrap(), server.addr).await;
    let mut stolen = KeyServiceClient::with_interceptor(channel, Auth(Some(token.clone())));
    stolen
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .unwrap();
    let found = anomalies(&mut audit, "acme").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(detector_of(&found[0]), "new_peer");
    assert_eq!(found[0].caller, caller);
    assert_eq!(found[0].peer, "127.0.0.2");
    assert!(found[0].detail.contains("127.0.0.2"), "{}", found[0].detail);
    server.stop().await;
}

/// Over mTLS the peer is the address and the client certificate's identity (its SAN names):
/// a token used from the same address but with another service's certificate is a new peer;
/// the certificate it learned with is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_used_with_another_client_certificate_is_a_new_peer() {
    let pki = tls::Pki::new("detect test CA");
    let server_pem = pki.issue(&["localhost"], true, false);
    let files = tenant_kms::service::TlsFiles {
        cert: pki.write("server.pem", &server_pem.cert),
        key: pki.write("server.key", &server_pem.key),
        client_ca: Some(pki.write("ca.pem", &pki.ca_pem)),
    };
    let (server, clock) = server_configured(quick(), |o| o.tls = Some(files)).await;
    let own = pki.issue(&["ingest.svc.internal"], false, false);
    let other = pki.issue(&["billing.svc.internal"], false, false);
    let mut tenants = pb::tenant_service_client::TenantServiceClient::with_interceptor(
        tls::tls_channel(server.addr, &pki.ca_pem, Some(&own))
            .await
            .unwrap(),
        Auth(Some(server.admin_token.clone())),
    );
    create_tenant(&mut tenants, "acme").await;
    let mut audit = pb::audit_service_client::AuditServiceClient::with_interceptor(
        tls::tls_channel(server.addr, &pki.ca_pem, Some(&own))
            .await
            .unwrap(),
        Auth(Some(server.admin_token.clone())),
    );
    let (token, caller) = issue(&server, Role::Service, "acme");
    let mut keys = KeyServiceClient::with_interceptor(
        tls::tls_channel(server.addr, &pki.ca_pem, Some(&own))
            .await
            .unwrap(),
        Auth(Some(token.clone())),
    );
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    // Past the learning minute: its own certificate again, from a new connection, is fine.
    clock.advance(2 * MINUTE);
    let mut again = KeyServiceClient::with_interceptor(
        tls::tls_channel(server.addr, &pki.ca_pem, Some(&own))
            .await
            .unwrap(),
        Auth(Some(token.clone())),
    );
    encrypt(&mut again, "acme", CONTEXT, b"v", b"").await;
    assert!(anomalies(&mut audit, "acme").await.is_empty());
    // The same token, the same address, another service's certificate.
    let mut stolen = KeyServiceClient::with_interceptor(
        tls::tls_channel(server.addr, &pki.ca_pem, Some(&other))
            .await
            .unwrap(),
        Auth(Some(token.clone())),
    );
    encrypt(&mut stolen, "acme", CONTEXT, b"v", b"").await;
    let found = anomalies(&mut audit, "acme").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(detector_of(&found[0]), "new_peer");
    assert_eq!(found[0].caller, caller);
    assert_eq!(found[0].peer, "127.0.0.1");
    assert!(
        found[0]
            .detail
            .contains("client certificate billing.svc.internal"),
        "{}",
        found[0].detail
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containment_throttles_the_caller_and_is_audited() {
    let mut policy = quick();
    policy.throttle = vec![Detector::Probing];
    policy.throttle_rate = RateLimit {
        per_second: 0.001,
        burst: 1,
    };
    policy.throttle_micros = 600_000_000;
    let (server, clock) = server_with(policy).await;
    let (mut admin_keys, mut tenants, mut audit) = server.clients().await;
    for t in ["acme", "globex", "initech", "umbrella"] {
        create_tenant(&mut tenants, t).await;
    }
    let (token, _) = issue(&server, Role::Service, "acme");
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    for t in ["globex", "initech", "umbrella"] {
        keys.encrypt(encrypt_request(t, CONTEXT, b"v", b""))
            .await
            .refused();
    }
    let found = anomalies(&mut audit, "umbrella").await;
    assert_eq!(found.len(), 1);
    assert!(
        found[0].detail.contains("contained: caller throttled"),
        "{}",
        found[0].detail
    );
    // The throttle's burst of one, then RESOURCE_EXHAUSTED naming why; others unaffected.
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    let err = keys
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .refused();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("throttled"), "{}", err.message());
    encrypt(&mut admin_keys, "acme", CONTEXT, b"v", b"").await;
    // The refusal is audited like any other call (refused before its tenant was read).
    let caller = found[0].caller.clone();
    let refused = events_of(&mut audit, "Encrypt")
        .await
        .into_iter()
        .filter(|e| e.caller == caller && e.outcome == "exhausted")
        .count();
    assert_eq!(refused, 1);
    // When the throttle ends, the caller is served again.
    clock.advance(11 * MINUTE);
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    assert_eq!(
        get_tenant(&mut tenants, "acme").await.unwrap().state,
        pb::TenantState::Active as i32
    );
    server.stop().await;
}

/// The steady, mixed traffic of the false-positive tests (the churn soak's shape): two
/// all-tenant services decrypt batches whose size wanders ±25% (1,200 to 1,799 items per
/// caller, tenant and minute) and encrypt, for `minutes` simulated minutes; every ten minutes
/// the admin rotates a tenant and creates a new one that it suspends, and a service is refused
/// on it (FAILED_PRECONDITION). Returns the services with their audit names and the
/// ciphertexts they decrypt, per tenant, for what a test does next.
async fn steady_mixed_load(
    server: &TestServer,
    clock: &ManualClock,
    minutes: u32,
) -> (Vec<(Keys, String)>, Vec<(&'static str, Vec<u8>)>) {
    let (_, mut tenants, _) = server.clients().await;
    let names = ["acme", "globex", "initech"];
    for t in names {
        create_tenant(&mut tenants, t).await;
    }
    let mut services = Vec::new();
    for _ in 0..2 {
        let (token, caller) = issue(server, Role::Service, "*");
        services.push((server.clients_with(Some(&token)).await.0, caller));
    }
    let mut kept = Vec::new();
    for t in names {
        let ct = encrypt(&mut services[0].0, t, CONTEXT, b"value", b"")
            .await
            .ciphertext;
        kept.push((t, ct));
    }
    let mut seed = 0x9e37_79b9_u64;
    for minute in 0..minutes {
        for (keys, _) in services.iter_mut() {
            for (tenant, ct) in &kept {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let items = 1200 + (seed >> 33) % 600; // 1,200 to 1,799 a minute
                let items = (0..items)
                    .map(|_| pb::DecryptBatchItem {
                        context: CONTEXT.into(),
                        ciphertext: ct.clone(),
                        aad: Vec::new(),
                    })
                    .collect();
                keys.decrypt_batch(pb::DecryptBatchRequest {
                    tenant_id: (*tenant).into(),
                    items,
                })
                .await
                .unwrap();
                encrypt(keys, tenant, CONTEXT, b"value", b"").await;
            }
        }
        if minute % 10 == 5 {
            rotate_tenant(&mut tenants, "globex").await.unwrap();
            let new = format!("new{minute}");
            create_tenant(&mut tenants, &new).await;
            // A suspended tenant refuses (FAILED_PRECONDITION), as in the churn soak.
            suspend_tenant(&mut tenants, &new).await.unwrap();
            let err = services[1]
                .0
                .encrypt(encrypt_request(&new, CONTEXT, b"v", b""))
                .await
                .refused();
            assert_eq!(err.code(), Code::FailedPrecondition);
        }
        clock.advance(MINUTE);
    }
    (services, kept)
}

/// The normal suite's short version of the false-positive soak: at the default settings,
/// 75 simulated minutes (past every warm-up and learning period) of [`steady_mixed_load`]
/// leave no Anomaly record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_mixed_load_at_the_defaults_finds_nothing() {
    let (server, clock) = server_with(Policy::default()).await;
    let (_, _, mut audit) = server.clients().await;
    steady_mixed_load(&server, &clock, 75).await;
    let all = events_of(&mut audit, "Anomaly").await;
    assert!(all.is_empty(), "false positives: {all:?}");
    server.stop().await;
}

/// The counterpart of the test above: the same harness at the same defaults does trip. After
/// 12 minutes of steady load (past the 10-interval warm-up), one service decrypts 24,000 items
/// of one tenant within a minute, more than 10 × its baseline (at most 1,799 a minute) and
/// than the floor of 1,000: exactly one `rate_spike` Anomaly, naming that service and tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_steady_load_at_the_defaults_trips_on_a_spike() {
    let (server, clock) = server_with(Policy::default()).await;
    let (_, _, mut audit) = server.clients().await;
    let (mut services, kept) = steady_mixed_load(&server, &clock, 12).await;
    let quiet = events_of(&mut audit, "Anomaly").await;
    assert!(
        quiet.is_empty(),
        "false positives before the spike: {quiet:?}"
    );
    let (tenant, ct) = &kept[0];
    let (keys, caller) = &mut services[0];
    for _ in 0..3 {
        let items = (0..8_000)
            .map(|_| pb::DecryptBatchItem {
                context: CONTEXT.into(),
                ciphertext: ct.clone(),
                aad: Vec::new(),
            })
            .collect();
        keys.decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: (*tenant).into(),
            items,
        })
        .await
        .unwrap();
    }
    let found = events_of(&mut audit, "Anomaly").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(detector_of(&found[0]), "rate_spike");
    assert_eq!(found[0].caller, *caller);
    assert_eq!(found[0].tenant_id, *tenant);
    assert!(
        found[0].detail.contains("threshold="),
        "{}",
        found[0].detail
    );
    server.stop().await;
}

/// The events of `operation` (every tenant; the admin's view).
async fn events_of(audit: &mut Audit, operation: &str) -> Vec<pb::AuditEvent> {
    audit
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: operation.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

fn cli_on(dir: &std::path::Path, verb: &str, id: &str) -> (i32, String, String) {
    run_cli(&["token", verb, id, "--data-dir", dir.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_release_and_contain_by_hand_are_audited_and_survive_a_restart() {
    let server = TestServer::start().await;
    let dir = server.data_dir.clone();
    let (_, mut tenants, _) = server.clients().await;
    for t in ["acme", "globex", "initech"] {
        create_tenant(&mut tenants, t).await;
    }
    let (token, caller) = issue(&server, Role::Service, "acme,globex");
    let id = caller.strip_prefix("token:").unwrap().to_owned();
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await; // cached in the server now

    let (code, _, stderr) = cli_on(&dir, "quarantine", &id);
    assert_eq!(code, 0, "{stderr}");
    let err = keys
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("quarantined"), "{}", err.message());
    assert!(err.message().contains(&id), "{}", err.message());

    // Stored with the token: a restart keeps it refused.
    let temp = server.stop().await;
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    let err = keys
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    let (_, mut tenants, mut audit) = server.clients().await;
    let refused: Vec<_> = events_of(&mut audit, "Encrypt")
        .await
        .into_iter()
        .filter(|e| e.caller.ends_with("(quarantined)"))
        .collect();
    assert_eq!(refused.len(), 2, "each refusal audited by name");
    assert_eq!(refused[0].outcome, "denied");

    let (code, _, stderr) = cli_on(&dir, "release", &id);
    assert_eq!(code, 0, "{stderr}");
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;

    // Contain: quarantine and suspend what the token reaches, nothing else, nothing destroyed.
    let (code, stdout, stderr) = cli_on(&dir, "contain", &id);
    assert_eq!(code, 0, "{stderr}");
    let done: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(done["quarantined"], true);
    assert_eq!(done["suspended"], serde_json::json!(["acme", "globex"]));
    for (t, state) in [
        ("acme", pb::TenantState::Suspended),
        ("globex", pb::TenantState::Suspended),
        ("initech", pb::TenantState::Active),
    ] {
        assert_eq!(
            get_tenant(&mut tenants, t).await.unwrap().state,
            state as i32,
            "{t}"
        );
    }
    let err = keys
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(events_of(&mut audit, "TokenQuarantine").await.len(), 2);
    assert_eq!(events_of(&mut audit, "TokenRelease").await.len(), 1);
    let suspended = events_of(&mut audit, "SuspendTenant").await;
    assert_eq!(suspended.len(), 2);
    assert!(
        suspended
            .iter()
            .all(|e| e.detail.contains(&format!("token {id}")))
    );
    // Undone by a release and a resume.
    assert_eq!(cli_on(&dir, "release", &id).0, 0);
    resume_tenant(&mut tenants, "acme").await.unwrap();
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    assert_eq!(cli_on(&dir, "quarantine", "nosuchtoken").0, 1);
    server.stop().await;
    drop(temp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_configured_to_quarantine_refuses_the_token_until_released() {
    let mut policy = quick();
    policy.quarantine = vec![Detector::Tampering];
    let (server, _clock) = server_with(policy).await;
    let (mut admin, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let ct = encrypt(&mut admin, "acme", CONTEXT, b"v", b"row-1")
        .await
        .ciphertext;
    let (token, caller) = issue(&server, Role::Service, "acme");
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    for row in ["row-2", "row-3", "row-4"] {
        decrypt(&mut keys, "acme", CONTEXT, &ct, row.as_bytes())
            .await
            .refused();
    }
    let found = anomalies(&mut audit, "acme").await;
    assert_eq!(found.len(), 1);
    assert!(
        found[0].detail.contains("token quarantined"),
        "{}",
        found[0].detail
    );
    let quarantines = events_of(&mut audit, "TokenQuarantine").await;
    assert_eq!(quarantines.len(), 1);
    assert_eq!(quarantines[0].caller, "server:detector");
    assert!(quarantines[0].seq > found[0].seq, "the cause first");
    let err = decrypt(&mut keys, "acme", CONTEXT, &ct, b"row-1")
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Released by an admin, it works again; nothing was destroyed.
    let (code, _, stderr) = cli_on(
        &server.data_dir,
        "release",
        caller.strip_prefix("token:").unwrap(),
    );
    assert_eq!(code, 0, "{stderr}");
    decrypt(&mut keys, "acme", CONTEXT, &ct, b"row-1")
        .await
        .unwrap();
    server.stop().await;
}

#[test]
fn the_breach_drill_passes_and_fails_when_detectors_are_switched_off() {
    let (code, stdout, stderr) = run_cli(&["drill", "--json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["audit_chain_verified"], true);
    let scenarios = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "cross_tenant_decrypt",
            "ciphertext_moved",
            "revoked_token",
            "expired_token",
            "tenant_enumeration",
            "decrypt_spike"
        ]
    );
    let spike = &scenarios[5];
    assert_eq!(spike["blocked"], "PermissionDenied");
    assert_eq!(spike["contained"], "token quarantined");
    assert!(
        spike["detected"].as_str().unwrap().contains("rate_spike"),
        "{spike}"
    );
    assert!(
        scenarios[1]["detected"]
            .as_str()
            .unwrap()
            .contains("tampering")
    );

    // With the detectors that see cross-tenant probing off, the drill says so and fails.
    let (code, stdout, stderr) = run_cli(&["drill", "--detectors-off", "probing,enumeration"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(stdout.contains("result: FAIL"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("cross_tenant_decrypt"))
        .unwrap();
    assert!(row.contains("NOT DETECTED"), "{row}");
    assert!(row.contains("PermissionDenied"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_containment_rpcs_are_admin_only_validated_and_audited() {
    let server = TestServer::start().await;
    let (_, mut tenants, mut audit) = server.clients().await;
    for t in ["acme", "globex"] {
        create_tenant(&mut tenants, t).await;
    }
    let (token, caller) = issue(&server, Role::Service, "acme");
    let id = caller.strip_prefix("token:").unwrap().to_owned();
    let (mut keys, mut svc_tenants, _) = server.clients_with(Some(&token)).await;
    // A service token may not contain anyone.
    let err = svc_tenants
        .quarantine_token(pb::QuarantineTokenRequest {
            token_id: id.clone(),
        })
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    for (bad, code) in [
        ("tkms_not-an-id", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("00000000000000ff", Code::NotFound),
    ] {
        let err = tenants
            .quarantine_token(pb::QuarantineTokenRequest {
                token_id: bad.into(),
            })
            .await
            .refused();
        assert_eq!(err.code(), code, "{bad}");
        assert!(!err.message().contains("tkms_"), "{}", err.message());
    }
    let changed = tenants
        .quarantine_token(pb::QuarantineTokenRequest {
            token_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .changed;
    assert!(changed);
    let err = keys
        .encrypt(encrypt_request("acme", CONTEXT, b"v", b""))
        .await
        .refused();
    assert_eq!(err.code(), Code::PermissionDenied);
    let released = tenants
        .release_token(pb::ReleaseTokenRequest {
            token_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.changed);
    encrypt(&mut keys, "acme", CONTEXT, b"v", b"").await;
    let contained = tenants
        .contain_token(pb::ContainTokenRequest {
            token_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(contained.quarantined);
    assert_eq!(contained.suspended_tenant_ids, ["acme"]);
    assert_eq!(
        get_tenant(&mut tenants, "globex").await.unwrap().state,
        pb::TenantState::Active as i32
    );
    for op in ["QuarantineToken", "ReleaseToken", "ContainToken"] {
        let calls = events_of(&mut audit, op).await;
        assert!(calls.iter().any(|e| e.outcome == "ok"), "{op}: {calls:?}");
    }
    assert_eq!(events_of(&mut audit, "TokenQuarantine").await.len(), 2);
    server.stop().await;
}
