//! Core service behaviour over real gRPC: round trips, bindings, tampering, errors, audit
//! accounting, restarts and master-key checks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use tenant_kms::pb;
use tonic::Code;

#[tokio::test]
async fn encrypt_decrypt_round_trip() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    let tenant = create_tenant(&mut tenants, "acme").await;
    assert_eq!(tenant.primary_version, 1);
    assert_eq!(tenant.state, pb::TenantState::Active as i32);
    let out = encrypt(
        &mut keys,
        "acme",
        "crm.contacts.email",
        b"alice@example.com",
        b"row-7",
    )
    .await;
    assert_eq!(out.key_version, 1);
    assert_eq!(out.ciphertext[0], 1, "format version");
    assert_eq!(out.ciphertext[1], 1, "field algorithm");
    assert_eq!(&out.ciphertext[2..6], &[0, 0, 0, 1], "key version");
    let back = decrypt(
        &mut keys,
        "acme",
        "crm.contacts.email",
        &out.ciphertext,
        b"row-7",
    )
    .await
    .unwrap();
    assert_eq!(back.plaintext, b"alice@example.com");
    assert_eq!(back.key_version, 1);
    // Empty values round-trip too.
    let out = encrypt(&mut keys, "acme", "c", b"", b"").await;
    assert_eq!(
        decrypt(&mut keys, "acme", "c", &out.ciphertext, b"")
            .await
            .unwrap()
            .plaintext,
        b""
    );
}

#[tokio::test]
async fn bindings_tenant_context_and_aad() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "a").await;
    create_tenant(&mut tenants, "b").await;
    let ct = encrypt(&mut keys, "a", "ctx", b"secret", b"aad")
        .await
        .ciphertext;
    for (tenant, context, aad) in [
        ("b", "ctx", &b"aad"[..]),
        ("a", "ctx2", b"aad"),
        ("a", "ctx", b"aae"),
        ("a", "ctx", b""),
    ] {
        let err = decrypt(&mut keys, tenant, context, &ct, aad)
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{tenant} {context}");
    }
}

#[tokio::test]
async fn every_bit_flip_truncation_and_empty_fail_alike() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let ct = encrypt(&mut keys, "acme", "ctx", b"the value", b"")
        .await
        .ciphertext;
    let reference = decrypt(&mut keys, "acme", "ctx", &[1, 1], b"")
        .await
        .status_err();
    let items: Vec<pb::DecryptBatchItem> = (0..ct.len() * 8)
        .map(|bit| {
            let mut bad = ct.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            bad
        })
        .chain((0..ct.len()).map(|len| ct[..len].to_vec()))
        .map(|ciphertext| pb::DecryptBatchItem {
            context: "ctx".into(),
            ciphertext,
            aad: vec![],
        })
        .collect();
    let results = keys
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), ct.len() * 9);
    for result in results {
        match result.result.unwrap() {
            pb::decrypt_batch_result::Result::Error(e) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                assert_eq!(e.message, reference.message());
            }
            pb::decrypt_batch_result::Result::Output(_) => panic!("tampered ciphertext decrypted"),
        }
    }
    // And unary, for a sample of flips.
    for bit in [0, 9, 17, 50, 143, ct.len() * 8 - 1] {
        let mut bad = ct.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let err = decrypt(&mut keys, "acme", "ctx", &bad, b"")
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), reference.message());
    }
}

#[tokio::test]
async fn batches_round_trip_with_per_item_errors() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let mut items: Vec<pb::EncryptBatchItem> = (0..100)
        .map(|i| pb::EncryptBatchItem {
            context: format!("ctx.{}", i % 3),
            plaintext: format!("value {i}").into_bytes(),
            aad: format!("row {i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    items[42].context = String::new(); // invalid: fails alone
    let results = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: items.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 100);
    let mut decrypt_items = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r.result.unwrap() {
            pb::encrypt_batch_result::Result::Output(o) => {
                assert_ne!(i, 42);
                decrypt_items.push(pb::DecryptBatchItem {
                    context: items[i].context.clone(),
                    ciphertext: o.ciphertext,
                    aad: items[i].aad.clone(),
                });
            }
            pb::encrypt_batch_result::Result::Error(e) => {
                assert_eq!(i, 42);
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
    }
    decrypt_items[5].aad = b"wrong".to_vec();
    let results = keys
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: decrypt_items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 99);
    for (j, r) in results.into_iter().enumerate() {
        let i = if j < 42 { j } else { j + 1 };
        match r.result.unwrap() {
            pb::decrypt_batch_result::Result::Output(o) => {
                assert_eq!(o.plaintext, items[i].plaintext, "item {i}");
            }
            pb::decrypt_batch_result::Result::Error(e) => {
                assert_eq!(j, 5);
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
        }
    }
}

#[tokio::test]
async fn data_keys_work_with_an_independent_aes_gcm() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let dk = generate_data_key(&mut keys, "acme", "files").await;
    assert_eq!(dk.plaintext_key.len(), 32);
    assert_eq!(dk.wrapped_key[1], 2, "wrapped data key algorithm");
    // The caller seals its own data with the key…
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&dk.plaintext_key).unwrap();
    let nonce = aes_gcm::Nonce::from_slice(&[7u8; 12]);
    let sealed = cipher
        .encrypt(
            nonce,
            Payload {
                msg: b"big file",
                aad: b"f1",
            },
        )
        .unwrap();
    // …and later gets the key back from the wrapped copy.
    let back = decrypt_data_key(&mut keys, "acme", "files", &dk.wrapped_key)
        .await
        .unwrap();
    assert_eq!(back.plaintext_key, dk.plaintext_key);
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&back.plaintext_key).unwrap();
    assert_eq!(
        cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed,
                    aad: b"f1"
                }
            )
            .unwrap(),
        b"big file"
    );
    // The wrapped key is bound to its context and is not a field ciphertext.
    let err = decrypt_data_key(&mut keys, "acme", "other", &dk.wrapped_key)
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = decrypt(&mut keys, "acme", "files", &dk.wrapped_key, b"")
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn errors_have_the_right_codes() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;

    let err = keys
        .encrypt(encrypt_request("nobody", "c", b"x", b""))
        .await
        .status_err();
    assert_eq!(err.code(), Code::NotFound);

    for token in [None, Some("tkms_wrong"), Some("")] {
        let (mut anon, _, _) = server.clients_with(token).await;
        let err = anon
            .encrypt(encrypt_request("acme", "c", b"x", b""))
            .await
            .status_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }

    for (tenant, context, size) in [
        ("Bad Tenant", "c", 1),
        ("", "c", 1),
        (&"x".repeat(65) as &str, "c", 1),
        ("acme", "", 1),
        ("acme", "tab\tchar", 1),
        ("acme", &"c".repeat(129) as &str, 1),
        ("acme", "c", 64 * 1024 + 1),
    ] {
        let err = keys
            .encrypt(encrypt_request(tenant, context, &vec![0u8; size], b""))
            .await
            .status_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{tenant:?} {context:?} {size}"
        );
    }
    let ok = keys
        .encrypt(encrypt_request("acme", "c", &[0u8; 64 * 1024], b""))
        .await;
    assert!(ok.is_ok(), "a value at the limit is accepted");

    let too_many: Vec<pb::EncryptBatchItem> = (0..10_001)
        .map(|_| pb::EncryptBatchItem {
            context: "c".into(),
            plaintext: vec![1],
            aad: vec![],
            ..Default::default()
        })
        .collect();
    let err = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: too_many,
            ..Default::default()
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![],
            ..Default::default()
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Over the 16 MiB message limit.
    let err = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (0..300)
                .map(|_| pb::EncryptBatchItem {
                    context: "c".into(),
                    plaintext: vec![0u8; 60_000],
                    aad: vec![],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    let err = try_create_tenant(&mut tenants, "acme").await.status_err();
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn every_call_is_audited_and_no_secret_reaches_the_audit() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    let (mut anon, _, _) = server.clients_with(Some("tkms_nope")).await;
    let before = server.audit_count();
    let mut calls = 0;
    create_tenant(&mut tenants, "acme").await;
    calls += 1;
    let plaintexts: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("PLAINTEXT-MARKER-{i}-{}", "q".repeat(20)).into_bytes())
        .collect();
    let aad = b"AAD-MARKER-0123456789".to_vec();
    let mut ciphertexts = Vec::new();
    for p in &plaintexts {
        ciphertexts.push(encrypt(&mut keys, "acme", "ctx", p, &aad).await.ciphertext);
        calls += 1;
    }
    for c in &ciphertexts {
        decrypt(&mut keys, "acme", "ctx", c, &aad).await.unwrap();
        calls += 1;
    }
    let dk = generate_data_key(&mut keys, "acme", "files").await;
    calls += 1;
    // Refusals: unauthenticated, invalid, not found, tampered.
    let _ = anon
        .encrypt(encrypt_request("acme", "ctx", &plaintexts[0], b""))
        .await
        .status_err();
    let _ = decrypt(&mut keys, "acme", "", b"x", b"").await.status_err();
    let _ = decrypt(&mut keys, "ghost", "ctx", &ciphertexts[0], b"")
        .await
        .status_err();
    let _ = decrypt(&mut keys, "acme", "ctx", &ciphertexts[0][..20], b"")
        .await
        .status_err();
    calls += 4;
    // Plus one `KeyStoreAnchor` record after each batch that follows a key-store change:
    // the creation and the first encryption's nonce reservation.
    assert_eq!(server.audit_count() - before, calls + 2);

    let dir = server.data_dir.clone();
    let _temp = server.stop().await;
    let audit_files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit.db")
        })
        .collect();
    assert!(!audit_files.is_empty());
    let mut needles: Vec<Vec<u8>> = plaintexts.clone();
    needles.push(aad.clone());
    needles.push(dk.plaintext_key.clone());
    needles.push(dk.wrapped_key[18..].to_vec());
    needles.extend(ciphertexts.iter().map(|c| c[18..].to_vec()));
    for needle in &needles {
        for file in &audit_files {
            // The -wal/-shm files vanish when the last connection closes.
            let Ok(bytes) = std::fs::read(file) else {
                continue;
            };
            assert!(
                !bytes.windows(needle.len()).any(|w| w == &needle[..]),
                "{} contains a secret",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn restart_keeps_keys_and_wrong_master_key_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let ct = encrypt(&mut keys, "acme", "ctx", b"kept", b"")
        .await
        .ciphertext;
    server.stop().await;

    let server = TestServer::start_with(test_options(&dir)).await;
    let (mut keys, _, _) = server.clients().await;
    assert_eq!(
        decrypt(&mut keys, "acme", "ctx", &ct, b"")
            .await
            .unwrap()
            .plaintext,
        b"kept"
    );
    server.stop().await;

    // Another keyring: refused at start, with a message that says why.
    let keyring = dir.join("master.keyring");
    let original = std::fs::read(&keyring).unwrap();
    std::fs::remove_file(&keyring).unwrap();
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("not the keyring this data directory was created with"),
        "{stderr}"
    );
    std::fs::remove_file(&keyring).unwrap();
    std::fs::write(&keyring, &original).unwrap();

    // A keyring readable by others: refused.
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = serve_refused(&dir);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("must not be accessible by group or others"),
        "{stderr}"
    );
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The environment-variable provider with the right key works.
    let text = String::from_utf8(original).unwrap();
    let hex_key = text
        .lines()
        .find(|l| l.starts_with("1 "))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    // SAFETY-free: set_var is unsafe in edition 2024 only because of threads; use a child.
    // `audit verify` with the master key given as `1:<hex>` in the environment.
    let verify_with = |hex: &str| {
        std::process::Command::new(BIN)
            .args([
                "audit",
                "verify",
                "--data-dir",
                dir.to_str().unwrap(),
                "--master-key-env",
                "TKMS_TEST_MK",
            ])
            .env("TKMS_TEST_MK", format!("1:{hex}"))
            .output()
            .unwrap()
    };
    let output = verify_with(&hex_key);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = verify_with(&"ab".repeat(32));
    assert!(!output.status.success());
}

#[tokio::test]
async fn files_are_private_and_health_and_reflection_answer() {
    let server = TestServer::start().await;
    for name in ["master.keyring", "admin.token", "keys.db", "audit.db"] {
        let mode = std::fs::metadata(server.data_dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let mode = std::fs::metadata(&server.data_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    let channel = connect(&server.url()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tenantkms.v1.KeyService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// The harness learns the port from the server's ready line; a server that cannot start
/// fails the test at once, with the server's own stderr in the message.
#[tokio::test]
#[should_panic(expected = "invalid value 'bogus' for '--audit-durability")]
async fn a_server_that_fails_to_start_fails_the_test_with_its_stderr() {
    let temp = tempfile::tempdir().unwrap();
    BinaryServer::start(&temp.path().join("data"), &["--audit-durability", "bogus"]).await;
}

#[tokio::test]
async fn binary_serves_and_client_commands_work() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let server = BinaryServer::start(&dir, &[]).await;
    let url = server.url();
    let token = dir.join("admin.token");
    let common = ["--addr", &url, "--token-file", token.to_str().unwrap()];
    let (code, out, err) = run_cli(&[&["tenant", "create", "acme"][..], &common].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"TENANT_STATE_ACTIVE\""));
    let field = ["--tenant", "acme", "--context", "crm.email", "--aad", "r1"];
    let (code, ciphertext, err) = run_cli_with_stdin(
        &[&["encrypt"][..], &field, &common].concat(),
        b"bob@example.com",
    );
    assert_eq!(code, 0, "{err}");
    let (code, plaintext, err) = run_cli_with_stdin(
        &[&["decrypt"][..], &field, &common].concat(),
        ciphertext.as_bytes(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(plaintext, "bob@example.com");
    let (code, out, _) = run_cli(&[&["tenant", "list"][..], &common].concat());
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    let stderr = server.terminate().await;
    assert!(stderr.contains("shut down"), "{stderr}");
    let (code, out, _) = run_cli(&["audit", "verify", "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    // Four calls, and a `KeyStoreAnchor` after the creation and after the first
    // encryption's nonce reservation.
    assert!(out.starts_with("OK: 6 records"), "{out}");
}
