//! Searchable encrypted columns (issue 15, docs/SEARCHABLE.md) through the real server: blind
//! index definitions, ComputeBlindIndex, indexes and deterministic ciphertexts returned by
//! Encrypt/EncryptBatch/Rewrap/RewrapBatch, a full rotation flow, lifecycle rules, bad input,
//! audit records and token scopes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;

use common::*;
use tenant_kms::auth::{Role, TokenSpec, issue_token};
use tenant_kms::crypto::blind_index::{Normalization, index_of};
use tenant_kms::pb;
use tonic::Code;

async fn declare(
    tenants: &mut Tenants,
    tenant: &str,
    name: &str,
    bits: u32,
    normalization: &str,
) -> Result<pb::BlindIndexDefinition, tonic::Status> {
    tenants
        .declare_blind_index(pb::DeclareBlindIndexRequest {
            tenant_id: tenant.into(),
            name: name.into(),
            bits,
            normalization: normalization.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn compute(
    keys: &mut Keys,
    tenant: &str,
    index: &str,
    values: &[&[u8]],
    all_versions: bool,
) -> Result<Vec<pb::ComputeBlindIndexResult>, tonic::Status> {
    keys.compute_blind_index(pb::ComputeBlindIndexRequest {
        tenant_id: tenant.into(),
        index_name: index.into(),
        values: values.iter().map(|v| v.to_vec()).collect(),
        all_enabled_versions: all_versions,
    })
    .await
    .map(|r| r.into_inner().results)
}

/// The indexes of one successful result.
fn indexes(result: &pb::ComputeBlindIndexResult) -> Vec<pb::BlindIndex> {
    match &result.result {
        Some(pb::compute_blind_index_result::Result::Output(o)) => o.indexes.clone(),
        other => panic!("expected indexes, got {other:?}"),
    }
}

/// The one index of each value under the primary version.
async fn index_values(
    keys: &mut Keys,
    tenant: &str,
    index: &str,
    values: &[&[u8]],
) -> Vec<Vec<u8>> {
    compute(keys, tenant, index, values, false)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let found = indexes(r);
            assert_eq!(found.len(), 1);
            found[0].index.clone()
        })
        .collect()
}

fn deterministic(tenant: &str, context: &str, plaintext: &[u8], aad: &[u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        deterministic: true,
        ..encrypt_request(tenant, context, plaintext, aad)
    }
}

fn item_error(result: &pb::ComputeBlindIndexResult) -> &pb::ItemError {
    match &result.result {
        Some(pb::compute_blind_index_result::Result::Error(e)) => e,
        other => panic!("expected an item error, got {other:?}"),
    }
}

#[tokio::test]
async fn definitions_are_declared_listed_and_never_changed() {
    let server = TestServer::start().await;
    let (_keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "globex").await;

    let all = declare(&mut tenants, "", "email", 32, "casefold_trim")
        .await
        .unwrap();
    assert_eq!(
        (all.bits, all.normalization.as_str(), all.tenant_id.as_str()),
        (32, "casefold_trim", "")
    );
    // Re-declaring the same definition returns the one in force.
    let again = declare(&mut tenants, "", "email", 32, "casefold_trim")
        .await
        .unwrap();
    assert_eq!(again, all);
    let same_for_one = declare(&mut tenants, "acme", "email", 32, "casefold_trim")
        .await
        .unwrap();
    assert_eq!(
        same_for_one, all,
        "an identical all-tenants definition is already in force"
    );
    // A changed definition under the same name is refused, at either scope.
    for (tenant, bits, norm) in [
        ("", 16, "casefold_trim"),
        ("", 32, "exact"),
        ("acme", 64, "casefold_trim"),
    ] {
        let err = declare(&mut tenants, tenant, "email", bits, norm)
            .await
            .status_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        assert!(err.message().contains("new name"), "{}", err.message());
    }
    let phone = declare(&mut tenants, "acme", "phone", 64, "exact")
        .await
        .unwrap();
    assert_eq!(phone.tenant_id, "acme");

    let listed = |tenant: &str| pb::ListBlindIndexesRequest {
        tenant_id: tenant.into(),
    };
    let acme = tenants
        .list_blind_indexes(listed("acme"))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = acme
        .definitions
        .iter()
        .map(|d| (d.name.as_str(), d.tenant_id.as_str()))
        .collect();
    assert_eq!(names, [("email", ""), ("phone", "acme")]);
    let globex = tenants
        .list_blind_indexes(listed("globex"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        globex.definitions.len(),
        1,
        "acme's own index does not serve globex"
    );
    let every = tenants
        .list_blind_indexes(listed(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(every.definitions.len(), 2);

    // Bad definitions: a clear INVALID_ARGUMENT, nothing stored.
    for (name, bits, norm, needle) in [
        ("email2", 7, "exact", "bits"),
        ("email2", 257, "exact", "bits"),
        ("Email2", 32, "exact", "index name"),
        ("email2", 32, "lowercase", "normalization"),
    ] {
        let err = declare(&mut tenants, "acme", name, bits, norm)
            .await
            .status_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{}", err.message());
    }
    let err = declare(&mut tenants, "nobody", "email2", 32, "exact")
        .await
        .status_err();
    assert_eq!(err.code(), Code::NotFound);
    let every_after = tenants
        .list_blind_indexes(listed(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        every_after.definitions, every.definitions,
        "refused declarations stored nothing"
    );
}

#[tokio::test]
async fn equal_within_unrelated_across_tenants_indexes_and_versions() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "globex").await;
    declare(&mut tenants, "", "email", 256, "casefold_trim")
        .await
        .unwrap();
    declare(&mut tenants, "", "email_exact", 256, "exact")
        .await
        .unwrap();

    let values: [&[u8]; 3] = [
        b"Alice@Example.com",
        b"  alice@example.COM ",
        b"bob@example.com",
    ];
    let acme = index_values(&mut keys, "acme", "email", &values).await;
    assert_eq!(acme[0], acme[1], "case-fold and trim make these equal");
    assert_ne!(acme[0], acme[2]);
    assert_eq!(acme[0].len(), 32);
    let again = index_values(&mut keys, "acme", "email", &values).await;
    assert_eq!(
        acme, again,
        "the same value, tenant, index and version: the same index"
    );

    let globex = index_values(&mut keys, "globex", "email", &values).await;
    assert_ne!(acme[0], globex[0], "tenants are unlinkable");
    let exact = index_values(&mut keys, "acme", "email_exact", &values).await;
    assert_ne!(
        exact[0], exact[1],
        "exact normalization keeps case and spaces"
    );
    assert_ne!(exact[2], acme[2], "another index name gives another key");

    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let v2 = index_values(&mut keys, "acme", "email", &values).await;
    assert_ne!(v2[0], acme[0], "another key version gives another index");
    assert_eq!(v2[0], v2[1]);
    // Every enabled version on request: the primary first, then the older ones.
    let both = compute(&mut keys, "acme", "email", &values[..1], true)
        .await
        .unwrap();
    let both = indexes(&both[0]);
    let versions: Vec<_> = both.iter().map(|i| i.key_version).collect();
    assert_eq!(versions, [2, 1]);
    assert_eq!(both[0].index, v2[0]);
    assert_eq!(both[1].index, acme[0]);

    // Deterministic ciphertexts: equal within (tenant, context, aad, version), else unrelated.
    let ct = |r: tonic::Response<pb::EncryptResponse>| r.into_inner().ciphertext;
    let a = ct(keys
        .encrypt(deterministic("acme", "crm.email", b"v", b""))
        .await
        .unwrap());
    let b = ct(keys
        .encrypt(deterministic("acme", "crm.email", b"v", b""))
        .await
        .unwrap());
    assert_eq!(a, b);
    assert_eq!(a[1], 3, "algorithm byte 3");
    let others = [
        deterministic("globex", "crm.email", b"v", b""),
        deterministic("acme", "crm.name", b"v", b""),
        deterministic("acme", "crm.email", b"v", b"row-2"),
        deterministic("acme", "crm.email", b"w", b""),
    ];
    for other in others {
        let c = ct(keys.encrypt(other).await.unwrap());
        assert_ne!(a[18..], c[18..]);
    }
    let randomized = ct(keys
        .encrypt(encrypt_request("acme", "crm.email", b"v", b""))
        .await
        .unwrap());
    let randomized2 = ct(keys
        .encrypt(encrypt_request("acme", "crm.email", b"v", b""))
        .await
        .unwrap());
    assert_ne!(randomized, randomized2, "deterministic only on request");
    // It decrypts like any other ciphertext.
    let back = decrypt(&mut keys, "acme", "crm.email", &a, b"")
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"v");
    assert_eq!(back.key_version, 2);
}

#[tokio::test]
async fn the_service_computes_exactly_the_specified_index() {
    // The server applies each index's declared bits and normalization: its answers equal the
    // crypto core's computation with that index's key, are ceil(bits / 8) bytes long and have
    // every bit past the declared length zero. (The derivation itself is checked against
    // known-answer vectors and a second implementation: vectors/blind_index.json.)
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    for bits in [8u32, 12, 13, 31, 64, 255, 256] {
        declare(&mut tenants, "acme", &format!("b{bits}"), bits, "exact")
            .await
            .unwrap();
    }
    let entry = server
        .state
        .keys
        .tenant(&tenant_kms::domain::TenantId::parse("acme").unwrap())
        .unwrap();
    let key = entry.index_key(1, "b256").unwrap();
    let full = index_of(&key, 256, Normalization::Exact, b"x").unwrap();
    for bits in [8u32, 12, 13, 31, 64, 255, 256] {
        let got = index_values(&mut keys, "acme", &format!("b{bits}"), &[b"x"])
            .await
            .remove(0);
        let key = entry.index_key(1, &format!("b{bits}")).unwrap();
        let want = index_of(&key, bits as u16, Normalization::Exact, b"x").unwrap();
        assert_eq!(got, want, "{bits} bits");
        assert_eq!(
            got.len(),
            (bits as usize).div_ceil(8),
            "{bits} bits: ceil(bits/8) bytes"
        );
        let spare = (8 - bits % 8) % 8;
        assert_eq!(
            got.last().unwrap() & ((1u8 << spare) - 1),
            0,
            "{bits} bits: the rest is zero"
        );
    }
    assert_eq!(
        index_values(&mut keys, "acme", "b256", &[b"x"]).await[0],
        full
    );
}

#[tokio::test]
async fn full_rotation_flow_with_rewrap_batch() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    declare(&mut tenants, "", "email", 32, "casefold_trim")
        .await
        .unwrap();

    // Write rows: ciphertext plus index, in one round trip.
    let emails: Vec<String> = (0..20).map(|i| format!("User{i}@Example.com")).collect();
    let written = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: emails
                .iter()
                .enumerate()
                .map(|(i, e)| pb::EncryptBatchItem {
                    context: "crm.contacts.email".into(),
                    plaintext: e.as_bytes().to_vec(),
                    aad: format!("row-{i}").into_bytes(),
                    blind_indexes: vec!["email".into()],
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A table: row id -> (ciphertext, index under the version that sealed it).
    let mut table: HashMap<usize, (Vec<u8>, Vec<u8>)> = HashMap::new();
    for (i, r) in written.results.into_iter().enumerate() {
        let Some(pb::encrypt_batch_result::Result::Output(o)) = r.result else {
            panic!()
        };
        assert_eq!(o.blind_indexes.len(), 1);
        assert_eq!(o.blind_indexes[0].key_version, 1);
        table.insert(i, (o.ciphertext, o.blind_indexes[0].index.clone()));
    }
    let lookup = |table: &HashMap<usize, (Vec<u8>, Vec<u8>)>, index: &[u8]| -> Vec<usize> {
        let mut rows: Vec<usize> = table
            .iter()
            .filter(|(_, (_, x))| x == index)
            .map(|(r, _)| *r)
            .collect();
        rows.sort();
        rows
    };
    let probe = index_values(&mut keys, "acme", "email", &[b"user7@example.com"])
        .await
        .remove(0);
    assert_eq!(lookup(&table, &probe), [7]);

    rotate_tenant(&mut tenants, "acme").await.unwrap();
    // During the rotation: look up under every enabled version (`IN (...)`).
    let during = compute(&mut keys, "acme", "email", &[b"USER7@example.com"], true)
        .await
        .unwrap();
    let during = indexes(&during[0]);
    assert_eq!(during.len(), 2);
    assert!(during.iter().any(|i| lookup(&table, &i.index) == [7]));

    // Re-encrypt and re-index every row without the plaintext leaving the service.
    let rewrapped = keys
        .rewrap_batch(pb::RewrapBatchRequest {
            tenant_id: "acme".into(),
            items: (0..emails.len())
                .map(|i| pb::RewrapBatchItem {
                    context: "crm.contacts.email".into(),
                    ciphertext: table[&i].0.clone(),
                    aad: format!("row-{i}").into_bytes(),
                    blind_indexes: vec!["email".into()],
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    for (i, r) in rewrapped.results.into_iter().enumerate() {
        let Some(pb::rewrap_batch_result::Result::Output(o)) = r.result else {
            panic!("{i}")
        };
        assert_eq!(o.key_version, 2);
        assert_eq!(o.blind_indexes.len(), 1);
        assert_eq!(o.blind_indexes[0].key_version, 2);
        table.insert(i, (o.ciphertext, o.blind_indexes[0].index.clone()));
    }
    // Every row is found by its new index.
    let all: Vec<&[u8]> = emails.iter().map(|e| e.as_bytes()).collect();
    let new_indexes = index_values(&mut keys, "acme", "email", &all).await;
    for (i, index) in new_indexes.iter().enumerate() {
        assert_eq!(lookup(&table, index), [i], "row {i}");
    }
    // The old version can go: lookups and decryption keep working.
    disable_key_version(&mut tenants, "acme", 1).await.unwrap();
    let probe = index_values(&mut keys, "acme", "email", &[b" user3@EXAMPLE.com"])
        .await
        .remove(0);
    assert_eq!(lookup(&table, &probe), [3]);
    let only_enabled = compute(&mut keys, "acme", "email", &[b"x"], true)
        .await
        .unwrap();
    assert_eq!(
        indexes(&only_enabled[0]).len(),
        1,
        "a disabled version computes nothing"
    );
    let back = decrypt(
        &mut keys,
        "acme",
        "crm.contacts.email",
        &table[&3].0,
        b"row-3",
    )
    .await
    .unwrap();
    assert_eq!(back.plaintext, emails[3].as_bytes());

    // Single Rewrap returns the new version's index too.
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let one = keys
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: "crm.contacts.email".into(),
            ciphertext: table[&3].0.clone(),
            aad: b"row-3".to_vec(),
            blind_indexes: vec!["email".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.key_version, 3);
    assert_eq!(one.blind_indexes[0].key_version, 3);
    let probe = index_values(&mut keys, "acme", "email", &[b"user3@example.com"])
        .await
        .remove(0);
    assert_eq!(one.blind_indexes[0].index, probe);
}

#[tokio::test]
async fn deterministic_values_through_rotation_and_lifecycle() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    declare(&mut tenants, "acme", "email", 16, "exact")
        .await
        .unwrap();

    let v1 = keys
        .encrypt(deterministic("acme", "c", b"same", b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v1.key_version, 1);
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    // Every enabled version on request: the primary's ciphertext, then the others'.
    let both = keys
        .encrypt(pb::EncryptRequest {
            all_enabled_versions: true,
            blind_indexes: vec!["email".into()],
            ..deterministic("acme", "c", b"same", b"")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(both.key_version, 2);
    assert_eq!(both.other_versions.len(), 1);
    assert_eq!(both.other_versions[0].key_version, 1);
    assert_eq!(
        both.other_versions[0].ciphertext, v1.ciphertext,
        "byte-identical under version 1"
    );
    let index_versions: Vec<_> = both.blind_indexes.iter().map(|i| i.key_version).collect();
    assert_eq!(index_versions, [2, 1]);

    // Batch: deterministic for every item, equal plaintexts give equal ciphertexts.
    let batch = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            deterministic: true,
            items: [b"same".as_slice(), b"other", b"same"]
                .iter()
                .map(|p| pb::EncryptBatchItem {
                    context: "c".into(),
                    plaintext: p.to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cts: Vec<Vec<u8>> = batch
        .results
        .into_iter()
        .map(|r| match r.result {
            Some(pb::encrypt_batch_result::Result::Output(o)) => o.ciphertext,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(cts[0], both.ciphertext);
    assert_eq!(cts[0], cts[2]);
    assert_ne!(cts[0], cts[1]);

    // Rewrap keeps the mode: the version-1 value becomes exactly the version-2 value.
    let rewrapped = keys
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: "c".into(),
            ciphertext: v1.ciphertext.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rewrapped.ciphertext, both.ciphertext);

    // Disable: the old version's values no longer open; destroy: never again.
    disable_key_version(&mut tenants, "acme", 1).await.unwrap();
    let err = decrypt(&mut keys, "acme", "c", &v1.ciphertext, b"")
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    enable_key_version(&mut tenants, "acme", 1).await.unwrap();
    assert_eq!(
        decrypt(&mut keys, "acme", "c", &v1.ciphertext, b"")
            .await
            .unwrap()
            .plaintext,
        b"same"
    );
    destroy_key_version(&mut tenants, "acme", 1).await.unwrap();
    let err = decrypt(&mut keys, "acme", "c", &v1.ciphertext, b"")
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A flipped bit anywhere is the one generic decryption error, and changes nothing.
    let audit_before = server.audit_count();
    for bit in [0, 9, 8 * 6, 8 * 18 + 3, 8 * (both.ciphertext.len() - 1)] {
        let mut bad = both.ciphertext.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let err = decrypt(&mut keys, "acme", "c", &bad, b"")
            .await
            .status_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "bit {bit}: {err:?}"
        );
    }
    assert_eq!(
        server.audit_count(),
        audit_before + 5,
        "each refusal audited once"
    );
    assert_eq!(
        decrypt(&mut keys, "acme", "c", &both.ciphertext, b"")
            .await
            .unwrap()
            .plaintext,
        b"same"
    );
}

#[tokio::test]
async fn destroyed_or_suspended_tenant_computes_nothing() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    declare(&mut tenants, "", "email", 32, "exact")
        .await
        .unwrap();
    assert_eq!(
        index_values(&mut keys, "acme", "email", &[b"a"])
            .await
            .len(),
        1
    );

    suspend_tenant(&mut tenants, "acme").await.unwrap();
    let err = compute(&mut keys, "acme", "email", &[b"a"], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("SUSPENDED"), "{}", err.message());
    resume_tenant(&mut tenants, "acme").await.unwrap();

    schedule_deletion(&mut tenants, "acme", Some(0))
        .await
        .unwrap();
    let err = compute(&mut keys, "acme", "email", &[b"a"], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("destroyed"), "{}", err.message());
    let err = keys
        .encrypt(deterministic("acme", "c", b"a", b""))
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = declare(&mut tenants, "acme", "phone", 32, "exact")
        .await
        .status_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let server = TestServer::start_configured(|o| o.limits.max_field_bytes = 1024).await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    declare(&mut tenants, "", "email", 32, "casefold_trim")
        .await
        .unwrap();
    let encryptions = |tenants: &mut Tenants| {
        let mut t = tenants.clone();
        async move { key_versions(&mut t, "acme").await[0].encryptions }
    };
    let before = encryptions(&mut tenants).await;

    // Unknown index: NOT_FOUND, for ComputeBlindIndex and for Encrypt (nothing sealed).
    let err = compute(&mut keys, "acme", "nope", &[b"a"], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("blind index"), "{}", err.message());
    let err = keys
        .encrypt(pb::EncryptRequest {
            blind_indexes: vec!["nope".into()],
            ..encrypt_request("acme", "c", b"a", b"")
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = compute(&mut keys, "acme", "Bad Name", &[b"a"], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // No values, and too many indexes per value.
    let err = compute(&mut keys, "acme", "email", &[], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = keys
        .encrypt(pb::EncryptRequest {
            blind_indexes: vec!["email".into(); 9],
            ..encrypt_request("acme", "c", b"a", b"")
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // At most 8 different indexes per call, checked before anything is sealed.
    for i in 0..9 {
        declare(&mut tenants, "acme", &format!("i{i}"), 16, "exact")
            .await
            .unwrap();
    }
    let err = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (0..9)
                .map(|i| pb::EncryptBatchItem {
                    context: "c".into(),
                    plaintext: b"v".to_vec(),
                    blind_indexes: vec![format!("i{i}")],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("at most 8 different"),
        "{}",
        err.message()
    );

    // Oversize and non-UTF-8 values fail alone, with a clear message; the others succeed.
    let big = vec![b'a'; 1025];
    let results = compute(
        &mut keys,
        "acme",
        "email",
        &[b"ok", &big, &[0xff, 0xfe]],
        false,
    )
    .await
    .unwrap();
    assert_eq!(indexes(&results[0]).len(), 1);
    let e = item_error(&results[1]);
    assert_eq!(e.code, Code::InvalidArgument as i32);
    assert!(e.message.contains("1025 bytes"), "{}", e.message);
    let e = item_error(&results[2]);
    assert_eq!(e.code, Code::InvalidArgument as i32);
    assert!(e.message.contains("UTF-8"), "{}", e.message);
    let err = keys
        .encrypt(pb::EncryptRequest {
            blind_indexes: vec!["email".into()],
            ..encrypt_request("acme", "c", &[0xff], b"")
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        encryptions(&mut tenants).await,
        before,
        "no refused call spent nonce budget"
    );

    // A deterministic ciphertext with a flipped bit: the generic decryption error.
    let ct = keys
        .encrypt(deterministic("acme", "c", b"v", b""))
        .await
        .unwrap()
        .into_inner();
    let mut bad = ct.ciphertext.clone();
    *bad.last_mut().unwrap() ^= 1;
    let err = decrypt(&mut keys, "acme", "c", &bad, b"")
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("ciphertext is invalid"),
        "{}",
        err.message()
    );
    let err = keys
        .rewrap(pb::RewrapRequest {
            tenant_id: "acme".into(),
            context: "c".into(),
            ciphertext: bad,
            ..Default::default()
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        encryptions(&mut tenants).await,
        before,
        "deterministic seals spend no nonce budget"
    );
}

#[tokio::test]
async fn audited_without_values_and_scoped_by_token() {
    let server = TestServer::start().await;
    let (mut keys, mut tenants, mut audit) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    declare(&mut tenants, "", "email", 32, "exact")
        .await
        .unwrap();
    let secret = b"very-secret-value@example.com";
    compute(&mut keys, "acme", "email", &[secret, secret], true)
        .await
        .unwrap();
    keys.encrypt(deterministic("acme", "crm.email", secret, b""))
        .await
        .unwrap();

    let events = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let computed = events
        .iter()
        .find(|e| e.operation == "ComputeBlindIndex")
        .unwrap();
    assert_eq!(computed.contexts, ["blind-index:email"]);
    assert_eq!(computed.key_versions, [1]);
    assert_eq!(computed.item_count, 2);
    assert_eq!(computed.outcome, "ok");
    let det = events
        .iter()
        .find(|e| e.operation == "EncryptDeterministic")
        .unwrap();
    assert_eq!(det.contexts, ["crm.email"]);
    assert_eq!(det.key_versions, [1]);
    let declared = events.iter().any(|e| e.operation == "DeclareBlindIndex");
    assert!(!declared, "an all-tenants declaration names no tenant");
    // Never the value or the index in the audit files.
    let index = index_values(&mut keys, "acme", "email", &[secret])
        .await
        .remove(0);
    let dir = &server.data_dir;
    assert!(files_containing(dir, secret).is_empty());
    assert!(files_containing(dir, &index).is_empty());

    // Token scopes: a service token needs the new permissions.
    let issue = |operations: &str| {
        issue_token(
            server.state.keys.store().as_ref(),
            &TokenSpec {
                name: "svc".into(),
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
    let encrypt_only = issue("encrypt");
    let (mut k, mut t, _) = server.clients_with(Some(&encrypt_only)).await;
    keys_ok(&mut k).await;
    let err = compute(&mut k, "acme", "email", &[b"a"], false)
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("compute-blind-index"),
        "{}",
        err.message()
    );
    let err = k
        .encrypt(deterministic("acme", "c", b"a", b""))
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = k
        .encrypt(pb::EncryptRequest {
            blind_indexes: vec!["email".into()],
            ..encrypt_request("acme", "c", b"a", b"")
        })
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = declare(&mut t, "acme", "x", 32, "exact").await.status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = t
        .list_blind_indexes(pb::ListBlindIndexesRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.definitions.len(),
        1,
        "a service token may list its tenant's indexes"
    );

    let searcher = issue("encrypt,compute-blind-index,encrypt-deterministic");
    let (mut k, _, _) = server.clients_with(Some(&searcher)).await;
    compute(&mut k, "acme", "email", &[b"a"], false)
        .await
        .unwrap();
    k.encrypt(deterministic("acme", "c", b"a", b""))
        .await
        .unwrap();
}

async fn keys_ok(keys: &mut Keys) {
    keys.encrypt(encrypt_request("acme", "c", b"a", b""))
        .await
        .unwrap();
}
