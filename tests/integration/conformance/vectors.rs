//! Our own known-answer vectors (`vectors/*.json`, specified in docs/FORMAT.md).
//!
//! `generated_vector_files_are_current` rebuilds every file from the fixed inputs below with
//! the test-only fixed-nonce seams and compares it with the committed file; with
//! `TENANT_KMS_WRITE_VECTORS=1` it writes the files instead:
//!
//! ```text
//! TENANT_KMS_WRITE_VECTORS=1 cargo test --release --test integration conformance::vectors::generated_vector_files_are_current
//! ```
//!
//! `vector_files_hold` checks every committed vector through the functions the service uses:
//! the fixed-nonce seams reproduce the exact bytes, and the open path (`format::parse`, key
//! version lookup, `envelope::derive_value_key`, `envelope::open_value`, `unwrap_tenant_key`,
//! `unwrap_audit_key`) opens the valid ones and refuses the invalid ones with the one error.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tenant_kms::audit::ChainKeys;
use tenant_kms::crypto::CryptoError;
use tenant_kms::crypto::aead::NONCE_LEN;
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format::{self, Header};
use tenant_kms::crypto::kdf;
use tenant_kms::crypto::labels;
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::error::Error;
use tenant_kms::selftest::vectors as check;
use tenant_kms::selftest::vectors::{
    AuditKeyWrapFile, AuditKeyWrapInvalid, AuditKeyWrapVector, CRYPTO_ERROR, Embedded,
    KeyCheckFile, KeyCheckMismatch, KeyCheckVector, TenantKeyVersion, TenantKeyWrapFile,
    TenantKeyWrapInvalid, TenantKeyWrapVector, ValueFile, ValueInvalid, ValueVector, VectorFile,
};
use tenant_kms::service::status;

use super::report;

const REGENERATE: &str = "TENANT_KMS_WRITE_VECTORS=1 cargo test --release --test integration \
                          conformance::vectors::generated_vector_files_are_current";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

// ---------------------------------------------------------------------------------------
// Fixed inputs.

/// 32 bytes that differ per name and look random, so byte-order mistakes show.
fn fixed_bytes(name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tenant-kms test vector input/");
    h.update(name.as_bytes());
    h.finalize().into()
}

fn fixed_nonce(name: &str) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&fixed_bytes(&format!("nonce/{name}"))[..NONCE_LEN]);
    nonce
}

/// Master keys: (version, key).
fn master_keys() -> Vec<(u32, Vec<u8>)> {
    vec![
        (1, (0x00..=0x1f).collect()),
        (2, (0x20..=0x3f).collect()),
        (258, fixed_bytes("master/258").to_vec()),
    ]
}

fn master_key(version: u32) -> Vec<u8> {
    master_keys()
        .into_iter()
        .find(|(v, _)| *v == version)
        .unwrap()
        .1
}

/// The tenant keys of the scenario: (tenant, version).
const TENANT_KEYS: &[(&str, u32)] = &[
    ("acme", 1),
    ("acme", 2),
    ("globex-eu", 1),
    ("t", 7),
    ("initech_42", 65536),
    (
        "a123456789b123456789c123456789d123456789e123456789f123456789g123",
        1,
    ),
];

fn tenant_key(tenant: &str, version: u32) -> Vec<u8> {
    assert!(
        TENANT_KEYS.contains(&(tenant, version)),
        "{tenant} v{version}"
    );
    fixed_bytes(&format!("tenant-key/{tenant}/{version}")).to_vec()
}

fn secret(bytes: &[u8]) -> SecretKey {
    SecretKey::from_slice(bytes).unwrap()
}

const LONG_CONTEXT: &str = "reports.q3 ~ {\"col\": [1, 2]} | a-b_c.d/e\\f !#$%&'()*+,-./:;<=>?@[]^`x \
                            0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ";

/// One value vector's inputs.
struct ValueInput {
    name: &'static str,
    tenant: &'static str,
    version: u32,
    context: &'static str,
    aad: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    plaintext: Vec<u8>,
}

fn field_inputs() -> Vec<ValueInput> {
    let max_tenant = TENANT_KEYS[5].0;
    vec![
        ValueInput {
            name: "acme-v1-email",
            tenant: "acme",
            version: 1,
            context: "crm.contacts.email",
            aad: b"row:42".to_vec(),
            nonce: fixed_nonce("acme-v1-email"),
            plaintext: b"alice@example.com".to_vec(),
        },
        ValueInput {
            name: "acme-v1-email-no-aad",
            tenant: "acme",
            version: 1,
            context: "crm.contacts.email",
            aad: vec![],
            nonce: fixed_nonce("acme-v1-email"),
            plaintext: b"alice@example.com".to_vec(),
        },
        ValueInput {
            name: "acme-v2-email",
            tenant: "acme",
            version: 2,
            context: "crm.contacts.email",
            aad: b"row:42".to_vec(),
            nonce: fixed_nonce("acme-v2-email"),
            plaintext: b"alice@example.com".to_vec(),
        },
        ValueInput {
            name: "acme-v1-phone",
            tenant: "acme",
            version: 1,
            context: "crm.contacts.phone",
            aad: b"row:42".to_vec(),
            nonce: fixed_nonce("acme-v1-phone"),
            plaintext: b"+1 555 0100".to_vec(),
        },
        ValueInput {
            name: "acme-v1-empty-value",
            tenant: "acme",
            version: 1,
            context: "crm.contacts.note",
            aad: vec![],
            nonce: fixed_nonce("acme-v1-empty-value"),
            plaintext: vec![],
        },
        ValueInput {
            name: "globex-eu-v1-binary-256",
            tenant: "globex-eu",
            version: 1,
            context: "billing.iban",
            aad: vec![0x00, 0xff, 0x00, 0x01],
            nonce: fixed_nonce("globex-eu-v1-binary-256"),
            plaintext: (0u8..=255).collect(),
        },
        ValueInput {
            name: "t-v7-one-byte",
            tenant: "t",
            version: 7,
            context: "x",
            aad: vec![],
            nonce: [0u8; NONCE_LEN],
            plaintext: vec![0x00],
        },
        ValueInput {
            name: "initech-v65536-long-context",
            tenant: "initech_42",
            version: 65536,
            context: LONG_CONTEXT,
            aad: (0u8..100).map(|i| i.wrapping_mul(37)).collect(),
            nonce: [0xffu8; NONCE_LEN],
            plaintext: b"seventeen bytes!!".to_vec(),
        },
        ValueInput {
            name: "max-length-tenant-id",
            tenant: max_tenant,
            version: 1,
            context: "hr.salary",
            aad: b"employee/0001".to_vec(),
            nonce: fixed_nonce("max-length-tenant-id"),
            plaintext: b"sixteen bytes!!!".to_vec(),
        },
    ]
}

fn data_key_inputs() -> Vec<ValueInput> {
    let dk = |name: &str| fixed_bytes(&format!("data-key/{name}")).to_vec();
    vec![
        ValueInput {
            name: "acme-v1-data-key",
            tenant: "acme",
            version: 1,
            context: "crm.contacts.email",
            aad: vec![],
            nonce: fixed_nonce("acme-v1-email"),
            plaintext: dk("acme-v1"),
        },
        ValueInput {
            name: "acme-v2-data-key",
            tenant: "acme",
            version: 2,
            context: "s3.exports",
            aad: vec![],
            nonce: fixed_nonce("acme-v2-data-key"),
            plaintext: dk("acme-v2"),
        },
        ValueInput {
            name: "globex-eu-v1-data-key",
            tenant: "globex-eu",
            version: 1,
            context: "s3.objects",
            aad: vec![],
            nonce: fixed_nonce("globex-eu-v1-data-key"),
            plaintext: dk("globex-eu-v1"),
        },
        ValueInput {
            name: "t-v7-data-key",
            tenant: "t",
            version: 7,
            context: "x",
            aad: vec![],
            nonce: [0u8; NONCE_LEN],
            plaintext: dk("t-v7"),
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Generation (through the fixed-nonce seams).

fn value_vector(purpose: Purpose, input: &ValueInput) -> ValueVector {
    let tk = secret(&tenant_key(input.tenant, input.version));
    let info = envelope::value_key_info(purpose, input.tenant, input.context);
    let value_key = kdf::derive_key(&tk, &info).unwrap();
    let header = Header {
        algorithm: purpose.algorithm(),
        key_version: input.version,
        nonce: input.nonce,
    }
    .encode();
    let key = envelope::derive_value_key(&tk, purpose, input.tenant, input.context).unwrap();
    let ciphertext = envelope::seal_value_with_fixed_nonce(
        &key,
        purpose,
        input.version,
        &input.nonce,
        input.tenant,
        input.context,
        &input.aad,
        &input.plaintext,
    )
    .unwrap();
    ValueVector {
        name: input.name.into(),
        tenant_id: input.tenant.into(),
        context: input.context.into(),
        aad: input.aad.clone(),
        key_version: input.version,
        tenant_key: tenant_key(input.tenant, input.version),
        nonce: input.nonce.to_vec(),
        plaintext: input.plaintext.clone(),
        info: info.clone(),
        value_key: value_key.expose_secret().to_vec(),
        header: header.to_vec(),
        additional_data: format::additional_data(
            purpose.label(),
            &header,
            input.tenant,
            input.context,
            &input.aad,
        ),
        ciphertext,
    }
}

fn holder(tenant: &str) -> Vec<TenantKeyVersion> {
    TENANT_KEYS
        .iter()
        .filter(|(t, _)| *t == tenant)
        .map(|(t, v)| TenantKeyVersion {
            version: *v,
            key: tenant_key(t, *v),
        })
        .collect()
}

fn flip(bytes: &[u8], index: usize, mask: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[index] ^= mask;
    out
}

fn set(bytes: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at..at + with.len()].copy_from_slice(with);
    out
}

/// Invalid vectors derived from `base` (a valid vector whose tenant holds several versions):
/// each header field altered, body and tag bits flipped, truncations, and wrong bindings.
fn value_invalid(purpose: Purpose, base: &ValueVector, other: &ValueVector) -> Vec<ValueInvalid> {
    let ct = &base.ciphertext;
    let n = ct.len();
    let other_algorithm = match purpose {
        Purpose::Field => 2,
        Purpose::DataKey => 1,
    };
    // (name, alteration, ciphertext, tenant, context, aad)
    type Case = (String, String, Vec<u8>, String, String, Vec<u8>);
    let mut cases: Vec<Case> = Vec::new();
    let mut altered = |name: &str, why: &str, bytes: Vec<u8>| {
        cases.push((
            name.into(),
            why.into(),
            bytes,
            base.tenant_id.clone(),
            base.context.clone(),
            base.aad.clone(),
        ));
    };
    altered(
        "format-version-0",
        "byte 0 (format version) = 0x00",
        set(ct, 0, &[0]),
    );
    altered(
        "format-version-2",
        "byte 0 (format version) = 0x02",
        set(ct, 0, &[2]),
    );
    altered(
        "format-version-ff",
        "byte 0 (format version) = 0xff",
        set(ct, 0, &[0xff]),
    );
    altered("algorithm-0", "byte 1 (algorithm) = 0x00", set(ct, 1, &[0]));
    altered(
        "algorithm-other-purpose",
        "byte 1 (algorithm) set to the other purpose's algorithm",
        set(ct, 1, &[other_algorithm]),
    );
    altered("algorithm-3", "byte 1 (algorithm) = 0x03", set(ct, 1, &[3]));
    altered(
        "algorithm-ff",
        "byte 1 (algorithm) = 0xff",
        set(ct, 1, &[0xff]),
    );
    altered(
        "key-version-0",
        "bytes 2-5 (key version) = 0",
        set(ct, 2, &[0, 0, 0, 0]),
    );
    altered(
        "key-version-other-held",
        "bytes 2-5 (key version) name another version the tenant holds",
        set(ct, 2, &other.key_version.to_be_bytes()),
    );
    altered(
        "key-version-not-held",
        "bytes 2-5 (key version) = 3, which the tenant does not hold",
        set(ct, 2, &3u32.to_be_bytes()),
    );
    altered(
        "key-version-byte-order",
        "bytes 2-5 (key version) little-endian instead of big-endian",
        set(ct, 2, &base.key_version.to_le_bytes()),
    );
    altered(
        "nonce-first-bit",
        "byte 6 (nonce) bit 0 flipped",
        flip(ct, 6, 0x01),
    );
    altered(
        "nonce-last-bit",
        "byte 17 (nonce) bit 7 flipped",
        flip(ct, 17, 0x80),
    );
    altered(
        "body-first-bit",
        "byte 18 (first ciphertext byte) bit 0 flipped",
        flip(ct, 18, 1),
    );
    altered(
        "tag-first-bit",
        "first tag byte bit 0 flipped",
        flip(ct, n - 16, 0x01),
    );
    altered(
        "tag-last-bit",
        "last tag byte bit 7 flipped",
        flip(ct, n - 1, 0x80),
    );
    altered("truncated-empty", "no bytes at all", vec![]);
    altered(
        "truncated-1",
        "only the format version byte",
        ct[..1].to_vec(),
    );
    altered(
        "truncated-17",
        "header minus its last byte",
        ct[..17].to_vec(),
    );
    altered(
        "truncated-header-only",
        "the 18 header bytes, no body or tag",
        ct[..18].to_vec(),
    );
    altered(
        "truncated-33",
        "header and 15 bytes (shorter than a tag)",
        ct[..33].to_vec(),
    );
    altered(
        "truncated-last-byte",
        "last tag byte removed",
        ct[..n - 1].to_vec(),
    );
    altered(
        "extended",
        "one 0x00 byte appended",
        [ct.as_slice(), &[0]].concat(),
    );
    altered(
        "header-swapped",
        "header of another valid ciphertext of the same tenant and context",
        [&other.ciphertext[..18], &ct[18..]].concat(),
    );
    let mut bound = |name: &str, why: &str, tenant: &str, context: &str, aad: &[u8]| {
        cases.push((
            name.into(),
            why.into(),
            ct.clone(),
            tenant.into(),
            context.into(),
            aad.to_vec(),
        ));
    };
    bound(
        "wrong-tenant",
        "opened as tenant acmf",
        "acmf",
        &base.context,
        &base.aad,
    );
    bound(
        "wrong-context",
        "opened under another context",
        &base.tenant_id,
        "crm.contacts.phone",
        &base.aad,
    );
    bound(
        "wrong-context-trailing-space",
        "opened under the context with a trailing space",
        &base.tenant_id,
        &format!("{} ", base.context),
        &base.aad,
    );
    bound(
        "tenant-context-boundary",
        "tenant and context concatenate to the same string, split elsewhere",
        &format!("{}crm", base.tenant_id),
        base.context.trim_start_matches("crm"),
        &base.aad,
    );
    match purpose {
        Purpose::Field => {
            bound(
                "wrong-aad",
                "opened with aad row:43",
                &base.tenant_id,
                &base.context,
                b"row:43",
            );
            bound(
                "aad-missing",
                "opened with empty aad",
                &base.tenant_id,
                &base.context,
                b"",
            );
        }
        Purpose::DataKey => bound(
            "aad-not-empty",
            "opened with a non-empty aad (data keys bind none)",
            &base.tenant_id,
            &base.context,
            b"row:42",
        ),
    }
    let mut out: Vec<ValueInvalid> = cases
        .into_iter()
        .map(
            |(name, alteration, ciphertext, tenant_id, context, aad)| ValueInvalid {
                name: format!("{}/{name}", base.name),
                alteration,
                tenant_keys: holder(&base.tenant_id),
                tenant_id,
                context,
                aad,
                ciphertext,
                expected_error: CRYPTO_ERROR.into(),
            },
        )
        .collect();
    // The right bytes and bindings, but the key of another tenant under the same version.
    out.push(ValueInvalid {
        name: format!("{}/wrong-tenant-key", base.name),
        alteration: "the opener holds another tenant's key under this version".into(),
        tenant_id: base.tenant_id.clone(),
        context: base.context.clone(),
        aad: base.aad.clone(),
        tenant_keys: vec![TenantKeyVersion {
            version: base.key_version,
            key: tenant_key("globex-eu", 1),
        }],
        ciphertext: ct.clone(),
        expected_error: CRYPTO_ERROR.into(),
    });
    out
}

/// A valid vector of the other purpose, opened as this purpose: refused.
fn cross_purpose(other_purpose_vector: &ValueVector, as_name: &str) -> ValueInvalid {
    ValueInvalid {
        name: format!(
            "{}/opened-as-{}",
            other_purpose_vector.name,
            as_name.replace(' ', "-")
        ),
        alteration: format!("a valid ciphertext of the other purpose opened as a {as_name}"),
        tenant_id: other_purpose_vector.tenant_id.clone(),
        context: other_purpose_vector.context.clone(),
        aad: other_purpose_vector.aad.clone(),
        tenant_keys: holder(&other_purpose_vector.tenant_id),
        ciphertext: other_purpose_vector.ciphertext.clone(),
        expected_error: CRYPTO_ERROR.into(),
    }
}

fn key_check_file() -> KeyCheckFile {
    let valid = master_keys()
        .into_iter()
        .map(|(m, key)| {
            let master = secret(&key);
            let info = |label| envelope::master_key_info(label, m);
            let derive = |label| {
                kdf::derive_key(&master, &info(label))
                    .unwrap()
                    .expose_secret()
                    .to_vec()
            };
            KeyCheckVector {
                name: format!("master-v{m}"),
                master_version: m,
                master_key: key.clone(),
                key_check_info: info(labels::KEY_CHECK),
                key_check_value: envelope::key_check_value(&master, m).unwrap().to_vec(),
                tenant_key_wrapping_info: info(labels::TENANT_KEY_WRAP),
                tenant_key_wrapping_key: derive(labels::TENANT_KEY_WRAP),
                audit_key_wrapping_info: info(labels::AUDIT_KEY_WRAP),
                audit_key_wrapping_key: derive(labels::AUDIT_KEY_WRAP),
            }
        })
        .collect::<Vec<_>>();
    let check_of = |m: u32| {
        envelope::key_check_value(&secret(&master_key(m)), m)
            .unwrap()
            .to_vec()
    };
    let invalid = vec![
        KeyCheckMismatch {
            name: "wrong-master-key".into(),
            alteration: "master key version 2's key checked against version 1's check value".into(),
            master_version: 1,
            master_key: master_key(2),
            key_check_value: check_of(1),
            expected_error: "key_check_mismatch".into(),
        },
        KeyCheckMismatch {
            name: "wrong-master-version".into(),
            alteration: "master key 1 checked as version 2 against version 2's check value".into(),
            master_version: 2,
            master_key: master_key(1),
            key_check_value: check_of(2),
            expected_error: "key_check_mismatch".into(),
        },
    ];
    VectorFile {
        schema: "tenant-kms/v1/vectors/key-check".into(),
        description: format!(
            "Key check values and wrapping keys derived from master-key versions \
             (docs/FORMAT.md section 'Master-key derivations'). Generated by: {REGENERATE}"
        ),
        valid,
        invalid,
    }
}

fn tenant_wrap_file() -> TenantKeyWrapFile {
    let cases: [(&str, u32, u32); 6] = [
        ("acme", 1, 1),
        ("acme", 2, 1),
        ("acme", 1, 2),
        ("globex-eu", 1, 2),
        ("t", 7, 258),
        ("initech_42", 65536, 1),
    ];
    let valid: Vec<TenantKeyWrapVector> = cases
        .iter()
        .map(|&(tenant, v, m)| {
            let name = format!("{tenant}-v{v}-under-master-v{m}");
            let master = secret(&master_key(m));
            let wrapping =
                envelope::master_wrapping_key(&master, labels::TENANT_KEY_WRAP, m).unwrap();
            let nonce = fixed_nonce(&name);
            let tk = tenant_key(tenant, v);
            let wrapped = envelope::wrap_tenant_key_with_fixed_nonce(
                &wrapping,
                m,
                tenant,
                v,
                &secret(&tk),
                &nonce,
            )
            .unwrap();
            TenantKeyWrapVector {
                name,
                master_version: m,
                master_key: master_key(m),
                tenant_id: tenant.into(),
                key_version: v,
                tenant_key: tk,
                nonce: nonce.to_vec(),
                wrapping_key: kdf::derive_key(
                    &master,
                    &envelope::master_key_info(labels::TENANT_KEY_WRAP, m),
                )
                .unwrap()
                .expose_secret()
                .to_vec(),
                aad: envelope::tenant_key_wrap_aad(tenant, v, m),
                wrapped,
            }
        })
        .collect();
    let base = &valid[0];
    let w = &base.wrapped;
    let inv =
        |name: &str, why: &str, m: u32, key: Vec<u8>, tenant: &str, v: u32, bytes: Vec<u8>| {
            TenantKeyWrapInvalid {
                name: format!("{}/{name}", base.name),
                alteration: why.into(),
                master_version: m,
                master_key: key,
                tenant_id: tenant.into(),
                key_version: v,
                wrapped: bytes,
                expected_error: CRYPTO_ERROR.into(),
            }
        };
    let mk1 = master_key(1);
    let invalid = vec![
        inv(
            "wrong-tenant",
            "unwrapped as tenant globex-eu",
            1,
            mk1.clone(),
            "globex-eu",
            1,
            w.clone(),
        ),
        inv(
            "wrong-key-version",
            "unwrapped as key version 2",
            1,
            mk1.clone(),
            "acme",
            2,
            w.clone(),
        ),
        inv(
            "wrong-master-version",
            "unwrapped with master key 1 labelled version 2",
            2,
            mk1.clone(),
            "acme",
            1,
            w.clone(),
        ),
        inv(
            "wrong-master-key",
            "unwrapped with master key 2 as version 1",
            1,
            master_key(2),
            "acme",
            1,
            w.clone(),
        ),
        inv(
            "nonce-bit",
            "byte 0 (nonce) bit 0 flipped",
            1,
            mk1.clone(),
            "acme",
            1,
            flip(w, 0, 1),
        ),
        inv(
            "body-bit",
            "byte 12 (first sealed key byte) bit 0 flipped",
            1,
            mk1.clone(),
            "acme",
            1,
            flip(w, 12, 1),
        ),
        inv(
            "tag-bit",
            "byte 59 (last tag byte) bit 7 flipped",
            1,
            mk1.clone(),
            "acme",
            1,
            flip(w, 59, 0x80),
        ),
        inv(
            "truncated",
            "last byte removed (59 bytes)",
            1,
            mk1.clone(),
            "acme",
            1,
            w[..59].to_vec(),
        ),
        inv(
            "extended",
            "one 0x00 byte appended (61 bytes)",
            1,
            mk1.clone(),
            "acme",
            1,
            [w.as_slice(), &[0]].concat(),
        ),
        inv("empty", "no bytes", 1, mk1.clone(), "acme", 1, vec![]),
        inv(
            "other-tenants-wrap",
            "globex-eu's wrapped key (under master 2) presented as acme v1 under master 1",
            1,
            mk1,
            "acme",
            1,
            valid[3].wrapped.clone(),
        ),
    ];
    VectorFile {
        schema: "tenant-kms/v1/vectors/tenant-key-wrap".into(),
        description: format!(
            "Tenant keys wrapped under master-key versions (docs/FORMAT.md section 'Wrapped \
             tenant keys'). Generated by: {REGENERATE}"
        ),
        valid,
        invalid,
    }
}

fn audit_wrap_file(tenant_wraps: &TenantKeyWrapFile) -> AuditKeyWrapFile {
    let audit_key = fixed_bytes("audit-key").to_vec();
    let example_aad = b"row:42".to_vec();
    let valid: Vec<AuditKeyWrapVector> = [1u32, 2]
        .iter()
        .map(|&m| {
            let name = format!("audit-key-under-master-v{m}");
            let master = secret(&master_key(m));
            let wrapping =
                envelope::master_wrapping_key(&master, labels::AUDIT_KEY_WRAP, m).unwrap();
            let nonce = fixed_nonce(&name);
            let audit = secret(&audit_key);
            let derive = |ikm: &SecretKey, info: &[u8]| {
                kdf::derive_key(ikm, info).unwrap().expose_secret().to_vec()
            };
            AuditKeyWrapVector {
                name,
                master_version: m,
                master_key: master_key(m),
                audit_key: audit_key.clone(),
                nonce: nonce.to_vec(),
                wrapping_key: derive(
                    &master,
                    &envelope::master_key_info(labels::AUDIT_KEY_WRAP, m),
                ),
                aad: envelope::audit_key_wrap_aad(m),
                wrapped: envelope::wrap_audit_key_with_fixed_nonce(&wrapping, m, &audit, &nonce)
                    .unwrap(),
                chain_key: derive(&audit, labels::AUDIT_CHAIN),
                fingerprint_key: derive(&audit, labels::AAD_FINGERPRINT),
                example_aad: example_aad.clone(),
                example_aad_fingerprint: ChainKeys::derive(&audit)
                    .unwrap()
                    .aad_fingerprint(&example_aad),
            }
        })
        .collect();
    let w = &valid[0].wrapped;
    let inv = |name: &str, why: &str, m: u32, key: Vec<u8>, bytes: Vec<u8>| AuditKeyWrapInvalid {
        name: format!("{}/{name}", valid[0].name),
        alteration: why.into(),
        master_version: m,
        master_key: key,
        wrapped: bytes,
        expected_error: CRYPTO_ERROR.into(),
    };
    let invalid = vec![
        inv(
            "wrong-master-version",
            "unwrapped with master key 1 labelled version 2",
            2,
            master_key(1),
            w.clone(),
        ),
        inv(
            "wrong-master-key",
            "unwrapped with master key 2 as version 1",
            1,
            master_key(2),
            w.clone(),
        ),
        inv(
            "nonce-bit",
            "byte 0 (nonce) bit 0 flipped",
            1,
            master_key(1),
            flip(w, 0, 1),
        ),
        inv(
            "tag-bit",
            "byte 59 (last tag byte) bit 7 flipped",
            1,
            master_key(1),
            flip(w, 59, 0x80),
        ),
        inv(
            "truncated",
            "last byte removed (59 bytes)",
            1,
            master_key(1),
            w[..59].to_vec(),
        ),
        inv(
            "tenant-key-wrap-as-audit-key",
            "a wrapped tenant key under master 1 presented as the audit key (label separation)",
            1,
            master_key(1),
            tenant_wraps.valid[0].wrapped.clone(),
        ),
    ];
    VectorFile {
        schema: "tenant-kms/v1/vectors/audit-key-wrap".into(),
        description: format!(
            "The audit secret wrapped under master-key versions, and the audit-chain and \
             AAD-fingerprint keys derived from it (docs/FORMAT.md section 'Audit keys'). \
             Generated by: {REGENERATE}"
        ),
        valid,
        invalid,
    }
}

fn value_file(
    purpose: Purpose,
    inputs: &[ValueInput],
    other_purpose_valid: &[ValueVector],
) -> ValueFile {
    let valid: Vec<ValueVector> = inputs.iter().map(|i| value_vector(purpose, i)).collect();
    // The base is the first vector; `other` is a valid vector of the same tenant and context
    // under the tenant's other version.
    let base = &valid[0];
    let other = valid
        .iter()
        .find(|v| {
            v.tenant_id == base.tenant_id
                && v.key_version != base.key_version
                && v.context == base.context
        })
        .or_else(|| {
            valid
                .iter()
                .find(|v| v.tenant_id == base.tenant_id && v.key_version != base.key_version)
        })
        .unwrap();
    let mut invalid = value_invalid(purpose, base, other);
    let (schema, label, section, as_name) = match purpose {
        Purpose::Field => ("field-value", "field", "Field values", "field value"),
        Purpose::DataKey => (
            "data-key",
            "data-key",
            "Wrapped data keys",
            "wrapped data key",
        ),
    };
    invalid.push(cross_purpose(&other_purpose_valid[0], as_name));
    VectorFile {
        schema: format!("tenant-kms/v1/vectors/{schema}"),
        description: format!(
            "v1 ciphertexts of label tenant-kms/v1/{label} with every intermediate value \
             (docs/FORMAT.md section '{section}'). Generated by: {REGENERATE}"
        ),
        valid,
        invalid,
    }
}

/// Every vector file's name and generated text.
fn generate() -> Vec<(&'static str, String)> {
    let key_check = key_check_file();
    let tenant_wraps = tenant_wrap_file();
    let audit_wraps = audit_wrap_file(&tenant_wraps);
    let field_valid: Vec<ValueVector> = field_inputs()
        .iter()
        .map(|i| value_vector(Purpose::Field, i))
        .collect();
    let data_valid: Vec<ValueVector> = data_key_inputs()
        .iter()
        .map(|i| value_vector(Purpose::DataKey, i))
        .collect();
    let field = value_file(Purpose::Field, &field_inputs(), &data_valid);
    let data = value_file(Purpose::DataKey, &data_key_inputs(), &field_valid);
    vec![
        ("key_check.json", json(&key_check)),
        ("tenant_key_wrap.json", json(&tenant_wraps)),
        ("audit_key_wrap.json", json(&audit_wraps)),
        ("field_value.json", json(&field)),
        ("data_key.json", json(&data)),
    ]
}

/// Pretty JSON with a final newline.
fn json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    text
}

#[test]
fn generated_vector_files_are_current() {
    let write = std::env::var("TENANT_KMS_WRITE_VECTORS").is_ok_and(|v| v == "1");
    for (name, text) in generate() {
        let path = vectors_dir().join(name);
        if write {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap();
        assert!(
            committed == text,
            "{} differs from what the generator produces: the wire format changed? If that \
             is intended (it breaks every stored ciphertext), regenerate with: {REGENERATE}",
            path.display()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Checking the committed files.

fn assert_decrypt_failed(name: &str, result: Result<impl Sized, CryptoError>) {
    let Err(e) = result else {
        panic!("{name}: opened");
    };
    // What the service makes of it: one error, one status, one message.
    let error = Error::failed_open(e);
    assert!(matches!(error, Error::DecryptFailed), "{name}");
    assert_eq!(status::code(&error), tonic::Code::InvalidArgument, "{name}");
    assert_eq!(
        status::client_message(&error, "r"),
        "ciphertext is invalid or does not match the tenant, context and aad"
    );
}

#[test]
fn vector_files_hold() {
    let files = Embedded::load().unwrap();
    let mut counts = Vec::new();

    for v in &files.key_check.valid {
        check::check_key_check(v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
    for v in &files.key_check.invalid {
        assert_eq!(v.expected_error, "key_check_mismatch");
        check::check_key_check_mismatch(v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
    counts.push((
        "key_check",
        files.key_check.valid.len(),
        files.key_check.invalid.len(),
    ));

    for v in &files.tenant_key_wrap.valid {
        check::check_tenant_key_wrap(v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let master = secret(&v.master_key);
        let wrapping =
            envelope::master_wrapping_key(&master, labels::TENANT_KEY_WRAP, v.master_version)
                .unwrap();
        let nonce: [u8; NONCE_LEN] = v.nonce.as_slice().try_into().unwrap();
        let again = envelope::wrap_tenant_key_with_fixed_nonce(
            &wrapping,
            v.master_version,
            &v.tenant_id,
            v.key_version,
            &secret(&v.tenant_key),
            &nonce,
        )
        .unwrap();
        assert_eq!(again, v.wrapped, "{}", v.name);
    }
    for v in &files.tenant_key_wrap.invalid {
        assert_eq!(v.expected_error, CRYPTO_ERROR);
        let wrapping = envelope::master_wrapping_key(
            &secret(&v.master_key),
            labels::TENANT_KEY_WRAP,
            v.master_version,
        )
        .unwrap();
        let result = envelope::unwrap_tenant_key(
            &wrapping,
            v.master_version,
            &v.tenant_id,
            v.key_version,
            &v.wrapped,
        );
        assert!(result.is_err(), "{}: unwrapped", v.name);
    }
    counts.push((
        "tenant_key_wrap",
        files.tenant_key_wrap.valid.len(),
        files.tenant_key_wrap.invalid.len(),
    ));

    for v in &files.audit_key_wrap.valid {
        check::check_audit_key_wrap(v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let wrapping = envelope::master_wrapping_key(
            &secret(&v.master_key),
            labels::AUDIT_KEY_WRAP,
            v.master_version,
        )
        .unwrap();
        let nonce: [u8; NONCE_LEN] = v.nonce.as_slice().try_into().unwrap();
        let again = envelope::wrap_audit_key_with_fixed_nonce(
            &wrapping,
            v.master_version,
            &secret(&v.audit_key),
            &nonce,
        )
        .unwrap();
        assert_eq!(again, v.wrapped, "{}", v.name);
    }
    for v in &files.audit_key_wrap.invalid {
        assert_eq!(v.expected_error, CRYPTO_ERROR);
        check::check_audit_key_wrap_invalid(v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    }
    counts.push((
        "audit_key_wrap",
        files.audit_key_wrap.valid.len(),
        files.audit_key_wrap.invalid.len(),
    ));

    for (file, purpose, name) in [
        (&files.field_value, Purpose::Field, "field_value"),
        (&files.data_key, Purpose::DataKey, "data_key"),
    ] {
        for v in &file.valid {
            check::check_value(purpose, v).unwrap_or_else(|e| panic!("{}: {e}", v.name));
            let tk = secret(&v.tenant_key);
            let key = envelope::derive_value_key(&tk, purpose, &v.tenant_id, &v.context).unwrap();
            let nonce: [u8; NONCE_LEN] = v.nonce.as_slice().try_into().unwrap();
            let again = envelope::seal_value_with_fixed_nonce(
                &key,
                purpose,
                v.key_version,
                &nonce,
                &v.tenant_id,
                &v.context,
                &v.aad,
                &v.plaintext,
            )
            .unwrap();
            assert_eq!(again, v.ciphertext, "{}", v.name);
            if purpose == Purpose::DataKey {
                assert!(v.aad.is_empty() && v.plaintext.len() == 32, "{}", v.name);
            }
        }
        for v in &file.invalid {
            assert_eq!(v.expected_error, CRYPTO_ERROR);
            let result = check::open_like_service(
                purpose,
                &v.tenant_keys,
                &v.tenant_id,
                &v.context,
                &v.aad,
                &v.ciphertext,
            );
            assert_decrypt_failed(&v.name, result);
        }
        counts.push((name, file.valid.len(), file.invalid.len()));
    }

    let valid: usize = counts.iter().map(|c| c.1).sum();
    let invalid: usize = counts.iter().map(|c| c.2).sum();
    let per_file: Vec<String> = counts
        .iter()
        .map(|(n, v, i)| format!("{n} {v}+{i}"))
        .collect();
    report(&format!(
        "vectors/: {valid} valid vectors reproduced byte for byte and opened, {invalid} \
         invalid vectors refused with the one error ({})",
        per_file.join(", ")
    ));
}

#[test]
fn vector_names_are_unique_and_files_parse_strictly() {
    let files = Embedded::load().unwrap();
    let mut names: Vec<&str> = Vec::new();
    names.extend(files.key_check.valid.iter().map(|v| v.name.as_str()));
    names.extend(files.key_check.invalid.iter().map(|v| v.name.as_str()));
    names.extend(files.tenant_key_wrap.valid.iter().map(|v| v.name.as_str()));
    names.extend(
        files
            .tenant_key_wrap
            .invalid
            .iter()
            .map(|v| v.name.as_str()),
    );
    names.extend(files.audit_key_wrap.valid.iter().map(|v| v.name.as_str()));
    names.extend(files.audit_key_wrap.invalid.iter().map(|v| v.name.as_str()));
    for f in [&files.field_value, &files.data_key] {
        names.extend(f.valid.iter().map(|v| v.name.as_str()));
        names.extend(f.invalid.iter().map(|v| v.name.as_str()));
    }
    let total = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total, "duplicate vector names");
    assert!(files.field_value.valid.len() >= 8);
    assert!(files.field_value.invalid.len() >= 30);
}

// ---------------------------------------------------------------------------------------
// docs/FORMAT.md: labels, files and the worked example.

fn format_md() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md"))
        .expect("docs/FORMAT.md")
}

/// Every `b"tenant-kms/v1/..."` string literal under src/.
fn labels_in_source() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices("b\"tenant-kms/v") {
                    let rest = &text[i + 2..];
                    let end = rest.find('"').unwrap();
                    // Skip prefixes such as b"tenant-kms/v1/" in a starts_with check.
                    if !rest[..end].ends_with('/') {
                        out.push(rest[..end].to_owned());
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out.sort();
    out.dedup();
    out
}

#[test]
fn format_md_documents_every_label_and_vector_file() {
    let doc = format_md();
    for label in labels::ALL {
        let label = std::str::from_utf8(label).unwrap();
        assert!(
            doc.contains(&format!("`{label}`")),
            "FORMAT.md lacks label {label}"
        );
    }
    let in_source = labels_in_source();
    assert!(in_source.len() >= labels::ALL.len());
    for label in &in_source {
        assert!(
            doc.contains(&format!("`{label}`")),
            "FORMAT.md lacks label {label} (src/)"
        );
    }
    for (name, _) in generate() {
        assert!(
            doc.contains(&format!("`vectors/{name}`")),
            "FORMAT.md lacks {name}"
        );
    }
    for schema in [
        "tenant-kms/v1/vectors/key-check",
        "tenant-kms/v1/vectors/tenant-key-wrap",
        "tenant-kms/v1/vectors/audit-key-wrap",
        "tenant-kms/v1/vectors/field-value",
        "tenant-kms/v1/vectors/data-key",
    ] {
        assert!(doc.contains(schema), "FORMAT.md lacks schema {schema}");
    }
}

/// The hex of a worked-example line in FORMAT.md: lines of the form `name: hex hex ...`
/// inside the fenced block after `<!-- worked-example: VECTOR -->`.
fn worked_example(doc: &str, vector: &str) -> Vec<(String, String)> {
    let marker = format!("<!-- worked-example: {vector} -->");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("FORMAT.md lacks {marker}"));
    let block = &doc[start..];
    let open = block.find("```text\n").unwrap() + "```text\n".len();
    let close = open + block[open..].find("```").unwrap();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in block[open..close].lines() {
        if let Some((name, value)) = line.split_once(':')
            && !name.starts_with(' ')
        {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        } else if let Some(last) = fields.last_mut() {
            // continuation line
            last.1.push(' ');
            last.1.push_str(line.trim());
        }
    }
    fields
        .into_iter()
        .map(|(n, v)| (n, v.split_whitespace().collect::<String>()))
        .collect()
}

#[test]
fn format_md_worked_examples_match_the_vectors() {
    let doc = format_md();
    let files = Embedded::load().unwrap();
    let field = &files.field_value.valid[0];
    let fields = worked_example(&doc, &field.name);
    let get = |fields: &[(String, String)], name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("worked example lacks {name}"))
            .1
            .clone()
    };
    for (name, bytes) in [
        ("tenant_key", &field.tenant_key),
        ("nonce", &field.nonce),
        ("info", &field.info),
        ("value_key", &field.value_key),
        ("header", &field.header),
        ("additional_data", &field.additional_data),
        ("ciphertext", &field.ciphertext),
    ] {
        assert_eq!(get(&fields, name), hex::encode(bytes), "FORMAT.md {name}");
    }
    let wrap = &files.tenant_key_wrap.valid[0];
    let fields = worked_example(&doc, &wrap.name);
    for (name, bytes) in [
        ("master_key", &wrap.master_key),
        ("wrapping_key", &wrap.wrapping_key),
        ("aad", &wrap.aad),
        ("wrapped", &wrap.wrapped),
    ] {
        assert_eq!(get(&fields, name), hex::encode(bytes), "FORMAT.md {name}");
    }
    let check = &files.key_check.valid[0];
    let fields = worked_example(&doc, &check.name);
    assert_eq!(
        get(&fields, "key_check_info"),
        hex::encode(&check.key_check_info)
    );
    assert_eq!(
        get(&fields, "key_check_value"),
        hex::encode(&check.key_check_value)
    );
}
