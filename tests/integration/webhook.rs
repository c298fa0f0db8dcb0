//! The anomaly webhook (issue 16, item 2) through the real server: a receiver in the test gets
//! the signed POST after a detector trips (plain HTTP and HTTPS with a named CA), a receiver
//! that fails the first attempts gets retries of the same delivery, a graceful stop gives the
//! alert waiting for its retry one last attempt, and a dead receiver neither slows nor fails
//! calls (its alerts are dropped and counted).

use crate::common;
use crate::detect::{CONTEXT, Refused, START_MICROS, anomalies, issue, quick, server_configured};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tenant_kms::auth::Role;
use tenant_kms::metrics::WebhookEvent;
use tenant_kms::webhook::WebhookConfig;
use tokio::sync::mpsc;
use tonic::Code;

pub(crate) const SECRET: &str = "5d1f0c8e4b7a29f3a6c0d8e1b2f4a7c9e3d5b8a1c6f0e2d4b7a9c1e3f5d7b9a0";

/// One POST as the receiver saw it.
#[derive(Clone)]
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) content_type: String,
    pub(crate) timestamp: String,
    pub(crate) signature: String,
    pub(crate) delivery: String,
    pub(crate) body: Vec<u8>,
}

/// A receiver on loopback: answers 503 to the first `fail_first` POSTs, 204 to the rest, and
/// hands each POST to the test. With `tls` (certificate and key PEM) it speaks HTTPS.
pub(crate) async fn receiver(
    fail_first: usize,
    identity: Option<&tls::Pem>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = identity.map(|pem| {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, seen, acceptor) = (tx.clone(), Arc::clone(&seen), acceptor.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    let (tx, seen) = (tx.clone(), Arc::clone(&seen));
                    async move {
                        let header = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let mut received = Received {
                            path: request.uri().path().to_owned(),
                            content_type: header("content-type"),
                            timestamp: header("x-tenant-kms-timestamp"),
                            signature: header("x-tenant-kms-signature"),
                            delivery: header("x-tenant-kms-delivery"),
                            body: Vec::new(),
                        };
                        let body: hyper::body::Incoming = request.into_body();
                        received.body = body.collect().await.unwrap().to_bytes().to_vec();
                        let status = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                            503
                        } else {
                            204
                        };
                        let _ = tx.send(received);
                        hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    None => {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = http.serve_connection(io, service).await;
                    }
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        let io = hyper_util::rt::TokioIo::new(tls);
                        let _ = http.serve_connection(io, service).await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// The next POST, or a failed test if none comes (a hang guard, not a speed assertion).
pub(crate) async fn next(posts: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(120), posts.recv())
        .await
        .expect("no webhook POST arrived within two minutes")
        .expect("the receiver stopped")
}

/// The secret file (0600), in `dir`.
pub(crate) fn secret_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("webhook.secret");
    tenant_kms::fsutil::write_private_file(&path, format!("{SECRET}\n").as_bytes()).unwrap();
    path
}

/// Whether `signature` is the HMAC-SHA256 of `timestamp.body` under `secret`, checked with
/// ring's constant-time verify, as a receiver would (independently of the server's code).
fn verifies(secret: &[u8], r: &Received) -> bool {
    let Some(hex) = r.signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = hex::decode(hex) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let message = [r.timestamp.as_bytes(), b".", &r.body].concat();
    ring::hmac::verify(&key, &message, &tag).is_ok()
}

/// Trips `probing` once: a service token scoped to `acme` tries `tenants` (three of them,
/// the quick policy's threshold) and is refused each time. Returns the token's audit name.
async fn probe(server: &TestServer, tenants: [&str; 3]) -> String {
    let (token, caller) = issue(server, Role::Service, "acme");
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    for t in tenants {
        let err = keys
            .encrypt(encrypt_request(t, CONTEXT, b"v", b""))
            .await
            .refused();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    caller
}

async fn with_tenants(server: &TestServer) {
    let (_, mut tenants, _) = server.clients().await;
    for t in ["acme", "globex", "initech", "umbrella"] {
        create_tenant(&mut tenants, t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anomaly_is_posted_to_the_webhook_signed_over_http_and_https() {
    for https in [false, true] {
        let pki = tls::Pki::new("webhook test CA");
        let server_pem = pki.issue(&["localhost"], true, false);
        let (addr, mut posts) = receiver(0, https.then_some(&server_pem)).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = WebhookConfig::new(
            format!(
                "{}://{addr}/hooks/kms?team=sec",
                if https { "https" } else { "http" }
            ),
            secret_file(dir.path()),
        );
        config.tls_ca = https.then(|| pki.write("ca.pem", &pki.ca_pem));
        let delivered = tenant_kms::metrics::global().webhook_count(WebhookEvent::Delivered);
        let (server, _clock) = server_configured(quick(), |o| o.webhook = Some(config)).await;
        with_tenants(&server).await;
        let caller = probe(&server, ["globex", "initech", "umbrella"]).await;

        let post = next(&mut posts).await;
        assert_eq!(post.path, "/hooks/kms");
        assert_eq!(post.content_type, "application/json");
        // Signed at the server's (manual) clock, over the timestamp and the exact body.
        assert_eq!(post.timestamp, (START_MICROS / 1_000_000).to_string());
        assert!(verifies(SECRET.as_bytes(), &post), "https={https}");
        assert!(!verifies(
            b"another secret of the same length, or any other!!",
            &post
        ));
        let mut replayed = post.clone();
        replayed.timestamp = (START_MICROS / 1_000_000 + 600).to_string();
        assert!(
            !verifies(SECRET.as_bytes(), &replayed),
            "the body at another time"
        );
        let mut edited = post.clone();
        edited.body.push(b' ');
        assert!(!verifies(SECRET.as_bytes(), &edited), "an edited body");

        // The anomaly's fields, matching its audit record.
        let json: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
        let (_, _, mut audit) = server.clients().await;
        let record = anomalies(&mut audit, "umbrella").await;
        assert_eq!(record.len(), 1);
        assert_eq!(json["event"], "anomaly");
        assert_eq!(json["detector"], "probing");
        assert_eq!(json["caller"], caller.as_str());
        assert_eq!(json["tenant_id"], "umbrella");
        assert_eq!(json["peer"], "127.0.0.1");
        assert_eq!(json["audit_seq"], record[0].seq);
        assert_eq!(json["request_id"], record[0].request_id.as_str());
        assert_eq!(json["delivery"], post.delivery.as_str());
        assert!(
            json["figures"]
                .as_str()
                .unwrap()
                .contains("refused_tenants=3"),
            "{json}"
        );
        assert_eq!(json["time"], "2030-03-17T17:46:40.000000Z");
        server.stop().await;
        assert!(tenant_kms::metrics::global().webhook_count(WebhookEvent::Delivered) > delivered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_the_first_attempts_gets_retries_of_the_same_delivery() {
    let (addr, mut posts) = receiver(2, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = WebhookConfig::new(format!("http://{addr}/"), secret_file(dir.path()));
    config.retries = 3;
    config.backoff = Duration::from_millis(20);
    let retried = tenant_kms::metrics::global().webhook_count(WebhookEvent::Retried);
    let (server, _clock) = server_configured(quick(), |o| o.webhook = Some(config)).await;
    with_tenants(&server).await;
    probe(&server, ["globex", "initech", "umbrella"]).await;
    let first = next(&mut posts).await; // answered 503
    let second = next(&mut posts).await; // answered 503
    let third = next(&mut posts).await; // answered 204: delivered
    for post in [&first, &second, &third] {
        assert!(verifies(SECRET.as_bytes(), post), "each attempt is signed");
        assert_eq!(post.delivery, first.delivery, "one alert, three attempts");
        assert_eq!(post.body, first.body);
    }
    assert!(tenant_kms::metrics::global().webhook_count(WebhookEvent::Retried) >= retried + 2);
    server.stop().await;
    assert!(posts.try_recv().is_err(), "no attempt after the delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_gives_the_alert_waiting_for_its_retry_one_last_attempt() {
    let (addr, mut posts) = receiver(1, None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = WebhookConfig::new(format!("http://{addr}/"), secret_file(dir.path()));
    // The retry would come only in an hour: only the stop can bring it sooner.
    config.backoff = Duration::from_secs(3600);
    let delivered = tenant_kms::metrics::global().webhook_count(WebhookEvent::Delivered);
    let (server, _clock) = server_configured(quick(), |o| o.webhook = Some(config)).await;
    with_tenants(&server).await;
    probe(&server, ["globex", "initech", "umbrella"]).await;
    let first = next(&mut posts).await; // answered 503
    server.stop().await;
    let last = posts
        .try_recv()
        .expect("the stop gave the alert one last attempt before the server ended");
    assert_eq!(last.delivery, first.delivery, "the same alert");
    assert!(verifies(SECRET.as_bytes(), &last));
    assert!(tenant_kms::metrics::global().webhook_count(WebhookEvent::Delivered) > delivered);
    assert!(posts.try_recv().is_err(), "one last attempt, not more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_neither_slows_nor_fails_calls_and_drops_are_counted() {
    // Accepts connections and never answers: every attempt hangs until its timeout (an hour).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut config = WebhookConfig::new(format!("http://{addr}/"), secret_file(dir.path()));
    config.timeout = Duration::from_secs(3600);
    config.queue = 1;
    let dropped = tenant_kms::metrics::global().webhook_count(WebhookEvent::Dropped);
    let (server, _clock) = server_configured(quick(), |o| o.webhook = Some(config)).await;
    with_tenants(&server).await;
    // Four callers trip four anomalies: the first alert hangs on the dead endpoint, one waits
    // in the queue, the others are dropped. Had any call waited for its alert, it would never
    // be answered: the guard fails the test instead of hanging.
    let attack = async {
        for _ in 0..4 {
            probe(&server, ["globex", "initech", "umbrella"]).await;
        }
        let (mut keys, _, mut audit) = server.clients().await;
        encrypt(&mut keys, "acme", CONTEXT, b"still served", b"").await;
        anomalies(&mut audit, "umbrella").await.len()
    };
    let found = tokio::time::timeout(Duration::from_secs(300), attack)
        .await
        .expect("calls waited for the dead webhook");
    assert_eq!(found, 4, "every anomaly is still recorded");
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "the webhook was tried"
    );
    assert!(
        tenant_kms::metrics::global().webhook_count(WebhookEvent::Dropped) >= dropped + 2,
        "two of four alerts cannot be queued"
    );
    // The stop gives up on the hung attempt and the queued alert within its bound (a hang
    // guard, not a speed assertion): both are counted as dropped.
    tokio::time::timeout(Duration::from_secs(120), server.stop())
        .await
        .expect("the stop waited for the dead webhook");
    assert!(
        tenant_kms::metrics::global().webhook_count(WebhookEvent::Dropped) >= dropped + 4,
        "the two alerts left at the stop are counted too"
    );
    holder.abort();
}
