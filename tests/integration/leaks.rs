//! Nothing secret in what detection hands on (issue 16; review finding): after every detector
//! has tripped on calls carrying distinctive bytes, no token, AAD, plaintext or ciphertext is
//! in the audit export (Anomaly records included), the server's log lines (WARN anomaly lines
//! included, at debug level), the SIEM stream file, or the webhook's POST bodies.

use crate::common;
use crate::detect::{CONTEXT, channel_from};
use crate::webhook::{Received, next, receiver, secret_file};

use std::time::Duration;

use base64::Engine;
use common::*;
use tenant_kms::pb;
use tenant_kms::pb::key_service_client::KeyServiceClient;

const PLAINTEXT: &[u8] = b"PLAINTEXT-7f3c91d2-the-value-itself";
const AAD: &[u8] = b"AAD-5be0a4c7-row-binding";

/// Every form a leaked secret would likely take in text: the bytes, hex, base64 (standard and
/// URL-safe, padded or not) and, for long ones, a 16-byte window of each (a truncated print).
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(secret)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(secret)
            .into_bytes(),
    ];
    if secret.len() > 24 {
        let window = &secret[secret.len() - 16..];
        forms.push(window.to_vec());
        forms.push(hex::encode(window).into_bytes());
    }
    forms
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.len() <= haystack.len() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Count of lines of `text` naming `what`.
fn lines_with(text: &str, what: &str) -> usize {
    text.lines().filter(|l| l.contains(what)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_records_log_lines_stream_and_webhook_hold_no_secret() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let stream = temp.path().join("siem.jsonl");
    let (hook, mut posts) = receiver(0, None).await;
    let config = temp.path().join("tenant-kms.toml");
    // Every detector small enough to trip here; the spike after one learned interval.
    std::fs::write(
        &config,
        format!(
            "audit_stream_file = \"{}\"\nanomaly_learning = \"0s\"\nanomaly_probe_tenants = 3\n\
             anomaly_tamper_failures = 3\nanomaly_enumeration_tenants = 100\n\
             anomaly_spike_warmup = 1\nanomaly_spike_floor = 3\nanomaly_spike_factor = 1.0\n\
             anomaly_webhook_url = \"http://{hook}/kms\"\nanomaly_webhook_secret_file = \"{}\"\n",
            stream.display(),
            secret_file(temp.path()).display()
        ),
    )
    .unwrap();
    let clock = ProcessClock::new();
    let server = BinaryServer::start_on_clock(
        &data_dir,
        &[
            "--config",
            config.to_str().unwrap(),
            "--log",
            "tenant_kms=debug",
        ],
        &clock,
    )
    .await;
    let token = server.admin_token();
    let (mut keys, mut tenants, _) = clients(&server.url(), Some(&token)).await;
    create_tenant(&mut tenants, "acme").await;
    let ct = encrypt(&mut keys, "acme", CONTEXT, PLAINTEXT, AAD)
        .await
        .ciphertext;
    // rate_spike: one decrypt learns an interval; after it, four trip (floor 3).
    let opened = decrypt(&mut keys, "acme", CONTEXT, &ct, AAD).await.unwrap();
    assert_eq!(opened.plaintext, PLAINTEXT);
    clock.advance(61);
    for _ in 0..4 {
        decrypt(&mut keys, "acme", CONTEXT, &ct, AAD).await.unwrap();
    }
    // tampering: the ciphertext under other AADs (rows), three times.
    for row in [b"row-2".as_slice(), b"row-3", b"row-4"] {
        assert!(decrypt(&mut keys, "acme", CONTEXT, &ct, row).await.is_err());
    }
    // probing: three tenant ids that do not exist (NOT_FOUND).
    for guess in ["guess-1", "guess-2", "guess-3"] {
        let refused = keys
            .decrypt(pb::DecryptRequest {
                tenant_id: guess.into(),
                context: CONTEXT.into(),
                ciphertext: ct.clone(),
                aad: AAD.to_vec(),
            })
            .await;
        assert!(refused.is_err(), "{guess}");
    }
    // new_peer: the token from another address.
    let mut moved = KeyServiceClient::with_interceptor(
        channel_from("127.0.0.2".parse().unwrap(), server.addr).await,
        Auth(Some(token.clone())),
    );
    decrypt(&mut moved, "acme", CONTEXT, &ct, AAD)
        .await
        .unwrap();

    // Every detector's alert reaches the webhook (one each).
    let mut bodies: Vec<Received> = Vec::new();
    for _ in 0..4 {
        bodies.push(next(&mut posts).await);
    }
    let mut detectors: Vec<String> = bodies
        .iter()
        .map(|p| {
            let json: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
            json["detector"].as_str().unwrap().to_owned()
        })
        .collect();
    detectors.sort();
    assert_eq!(
        detectors,
        ["new_peer", "probing", "rate_spike", "tampering"]
    );
    // The stream file holds every Anomaly record (polled: the stream runs on its own).
    let streamed = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let text = std::fs::read_to_string(&stream).unwrap_or_default();
            if lines_with(&text, "\"operation\":\"Anomaly\"") >= 4 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the stream file never held the four Anomaly records");
    drop((keys, tenants, moved));
    let log = server.terminate().await;
    assert_eq!(lines_with(&log, "anomaly detected"), 4, "{log}");
    let dir = data_dir.to_str().unwrap().to_owned();
    let (code, export, err) =
        tokio::task::spawn_blocking(move || run_cli(&["audit", "export", "--data-dir", &dir]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        lines_with(&export, "\"operation\":\"Anomaly\""),
        4,
        "{export}"
    );
    // The AAD reached the audit only as its keyed fingerprint.
    let fingerprinted = export.lines().any(|line| {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        record["aad_fingerprint"]
            .as_str()
            .is_some_and(|f| !f.is_empty())
    });
    assert!(fingerprinted, "{export}");

    let secret_token = token.strip_prefix("tkms_").unwrap().as_bytes().to_vec();
    let secrets: [(&str, &[u8]); 4] = [
        ("token", &secret_token),
        ("AAD", AAD),
        ("plaintext", PLAINTEXT),
        ("ciphertext", &ct),
    ];
    let mut outputs: Vec<(&str, Vec<u8>)> = vec![
        ("audit export", export.into_bytes()),
        ("log", log.into_bytes()),
        ("stream file", streamed.into_bytes()),
    ];
    for (i, post) in bodies.iter().enumerate() {
        let name = ["webhook 1", "webhook 2", "webhook 3", "webhook 4"][i];
        outputs.push((name, post.body.clone()));
    }
    for (what, secret) in secrets {
        for form in forms(secret) {
            for (output, text) in &outputs {
                assert!(
                    !contains(text, &form),
                    "the {what} is in the {output} (as {:?})",
                    String::from_utf8_lossy(&form)
                );
            }
        }
    }
}
