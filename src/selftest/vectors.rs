//! tenant-kms's own known-answer vectors (`vectors/*.json`, schema in docs/FORMAT.md):
//! their types, the embedded copies, and a checker that runs them through the functions the
//! service uses.
//!
//! The checker cannot choose a nonce (production builds have no such seam), so it reproduces
//! each expected ciphertext from its building blocks instead: the same header encoder, AAD
//! construction and key derivation as `envelope::seal_value`, sealed by [`AeadKey`] with the
//! vector's nonce. The conformance tests additionally reproduce the bytes through the
//! fixed-nonce seams of `envelope` itself.

use serde::{Deserialize, Serialize};

use super::{CaseOutcome, SuiteReport};
use crate::audit::ChainKeys;
use crate::crypto::CryptoError;
use crate::crypto::aead::{AeadKey, NONCE_LEN};
use crate::crypto::envelope::{self, Purpose};
use crate::crypto::format::{self, Header};
use crate::crypto::kdf;
use crate::crypto::labels;
use crate::crypto::secret::{SecretBytes, SecretKey};

/// `vectors/key_check.json`, embedded.
pub const KEY_CHECK_JSON: &str = include_str!("../../vectors/key_check.json");
/// `vectors/tenant_key_wrap.json`, embedded.
pub const TENANT_KEY_WRAP_JSON: &str = include_str!("../../vectors/tenant_key_wrap.json");
/// `vectors/audit_key_wrap.json`, embedded.
pub const AUDIT_KEY_WRAP_JSON: &str = include_str!("../../vectors/audit_key_wrap.json");
/// `vectors/field_value.json`, embedded.
pub const FIELD_VALUE_JSON: &str = include_str!("../../vectors/field_value.json");
/// `vectors/data_key.json`, embedded.
pub const DATA_KEY_JSON: &str = include_str!("../../vectors/data_key.json");

/// The `expected_error` of every invalid vector: the one opaque [`crate::crypto::CryptoError`].
pub const CRYPTO_ERROR: &str = "crypto_error";

/// Serde helpers: byte strings are lowercase hex in the vector files.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes bytes as lowercase hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Reads lowercase or uppercase hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// A vector file: a schema name, a description, valid and invalid vectors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorFile<V, I> {
    /// `tenant-kms/v1/vectors/<kind>`.
    pub schema: String,
    /// What the file holds and how it was generated.
    pub description: String,
    /// Inputs and the exact bytes they must produce.
    pub valid: Vec<V>,
    /// Inputs that must be refused, with the expected error.
    pub invalid: Vec<I>,
}

/// The check value and derived wrapping keys of one master-key version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCheckVector {
    /// Unique name.
    pub name: String,
    /// Master-key version `m`.
    pub master_version: u32,
    /// The 32-byte master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// HKDF info of the check value: `lp(KEY_CHECK) ‖ be32(m)`.
    #[serde(with = "hex_bytes")]
    pub key_check_info: Vec<u8>,
    /// The key check value stored in keys.db.
    #[serde(with = "hex_bytes")]
    pub key_check_value: Vec<u8>,
    /// HKDF info of the tenant-key wrapping key: `lp(TENANT_KEY_WRAP) ‖ be32(m)`.
    #[serde(with = "hex_bytes")]
    pub tenant_key_wrapping_info: Vec<u8>,
    /// The tenant-key wrapping key.
    #[serde(with = "hex_bytes")]
    pub tenant_key_wrapping_key: Vec<u8>,
    /// HKDF info of the audit-key wrapping key: `lp(AUDIT_KEY_WRAP) ‖ be32(m)`.
    #[serde(with = "hex_bytes")]
    pub audit_key_wrapping_info: Vec<u8>,
    /// The audit-key wrapping key.
    #[serde(with = "hex_bytes")]
    pub audit_key_wrapping_key: Vec<u8>,
}

/// A master key that must not match a stored check value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCheckMismatch {
    /// Unique name.
    pub name: String,
    /// What is wrong.
    pub alteration: String,
    /// Master-key version `m`.
    pub master_version: u32,
    /// The candidate master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// The stored check value it is compared with.
    #[serde(with = "hex_bytes")]
    pub key_check_value: Vec<u8>,
    /// Always `key_check_mismatch`.
    pub expected_error: String,
}

/// A tenant key wrapped under a master-key version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyWrapVector {
    /// Unique name.
    pub name: String,
    /// Master-key version `m`.
    pub master_version: u32,
    /// The 32-byte master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// The tenant id.
    pub tenant_id: String,
    /// The tenant key version `v`.
    pub key_version: u32,
    /// The 32-byte tenant key.
    #[serde(with = "hex_bytes")]
    pub tenant_key: Vec<u8>,
    /// The 12-byte nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// The wrapping key (HKDF of the master key, see [`KeyCheckVector`]).
    #[serde(with = "hex_bytes")]
    pub wrapping_key: Vec<u8>,
    /// `lp(TENANT_KEY_WRAP) ‖ lp(tenant_id) ‖ be32(v) ‖ be32(m)`.
    #[serde(with = "hex_bytes")]
    pub aad: Vec<u8>,
    /// `nonce ‖ AES-256-GCM(tenant_key) ‖ tag`, 60 bytes.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
}

/// Wrapped tenant-key bytes that must not unwrap under the given binding.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyWrapInvalid {
    /// Unique name.
    pub name: String,
    /// What was changed relative to the valid vector it derives from.
    pub alteration: String,
    /// Master-key version the unwrap is attempted under.
    pub master_version: u32,
    /// The master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// The tenant id the unwrap binds.
    pub tenant_id: String,
    /// The tenant key version the unwrap binds.
    pub key_version: u32,
    /// The (altered) wrapped bytes.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
    /// Always [`CRYPTO_ERROR`].
    pub expected_error: String,
}

/// The audit secret wrapped under a master-key version, and the keys derived from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditKeyWrapVector {
    /// Unique name.
    pub name: String,
    /// Master-key version `m`.
    pub master_version: u32,
    /// The 32-byte master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// The 32-byte audit secret.
    #[serde(with = "hex_bytes")]
    pub audit_key: Vec<u8>,
    /// The 12-byte nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// The audit-key wrapping key.
    #[serde(with = "hex_bytes")]
    pub wrapping_key: Vec<u8>,
    /// `lp(AUDIT_KEY_WRAP) ‖ be32(m)`.
    #[serde(with = "hex_bytes")]
    pub aad: Vec<u8>,
    /// `nonce ‖ AES-256-GCM(audit_key) ‖ tag`, 60 bytes.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
    /// HKDF-SHA256(audit_key, info = AUDIT_CHAIN), the HMAC key of the audit chain.
    #[serde(with = "hex_bytes")]
    pub chain_key: Vec<u8>,
    /// HKDF-SHA256(audit_key, info = AAD_FINGERPRINT), the caller-AAD fingerprint key.
    #[serde(with = "hex_bytes")]
    pub fingerprint_key: Vec<u8>,
    /// An example caller AAD.
    #[serde(with = "hex_bytes")]
    pub example_aad: Vec<u8>,
    /// Its fingerprint in audit records: hex of the first 16 bytes of
    /// HMAC-SHA256(fingerprint_key, example_aad).
    pub example_aad_fingerprint: String,
}

/// Wrapped audit-key bytes that must not unwrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditKeyWrapInvalid {
    /// Unique name.
    pub name: String,
    /// What was changed relative to the valid vector it derives from.
    pub alteration: String,
    /// Master-key version the unwrap is attempted under.
    pub master_version: u32,
    /// The master key.
    #[serde(with = "hex_bytes")]
    pub master_key: Vec<u8>,
    /// The (altered) wrapped bytes.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
    /// Always [`CRYPTO_ERROR`].
    pub expected_error: String,
}

/// A v1 ciphertext (field value or wrapped data key) with every intermediate value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueVector {
    /// Unique name.
    pub name: String,
    /// The tenant id.
    pub tenant_id: String,
    /// The context.
    pub context: String,
    /// The caller AAD (always empty for data keys: the service binds none).
    #[serde(with = "hex_bytes")]
    pub aad: Vec<u8>,
    /// The tenant key version `v`.
    pub key_version: u32,
    /// The 32-byte tenant key of version `v`.
    #[serde(with = "hex_bytes")]
    pub tenant_key: Vec<u8>,
    /// The 12-byte nonce.
    #[serde(with = "hex_bytes")]
    pub nonce: Vec<u8>,
    /// The plaintext (a 32-byte data key for data-key vectors).
    #[serde(with = "hex_bytes")]
    pub plaintext: Vec<u8>,
    /// HKDF info: `lp(label) ‖ lp(tenant_id) ‖ lp(context)`.
    #[serde(with = "hex_bytes")]
    pub info: Vec<u8>,
    /// The derived AES-256-GCM key.
    #[serde(with = "hex_bytes")]
    pub value_key: Vec<u8>,
    /// The 18 header bytes.
    #[serde(with = "hex_bytes")]
    pub header: Vec<u8>,
    /// The GCM AAD: `lp(label) ‖ header ‖ lp(tenant_id) ‖ lp(context) ‖ lp(aad)`.
    #[serde(with = "hex_bytes")]
    pub additional_data: Vec<u8>,
    /// `header ‖ ciphertext ‖ tag`.
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
}

/// One tenant key version held by the opener of an invalid vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyVersion {
    /// The version.
    pub version: u32,
    /// Its 32-byte key.
    #[serde(with = "hex_bytes")]
    pub key: Vec<u8>,
}

/// Ciphertext bytes that must not open for the given tenant, context and AAD.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueInvalid {
    /// Unique name.
    pub name: String,
    /// What was changed relative to the valid vector it derives from.
    pub alteration: String,
    /// The tenant id the opener binds.
    pub tenant_id: String,
    /// The context the opener binds.
    pub context: String,
    /// The caller AAD the opener binds.
    #[serde(with = "hex_bytes")]
    pub aad: Vec<u8>,
    /// The tenant's key versions; the opener uses the one the header names, and a version it
    /// does not hold is the same error.
    pub tenant_keys: Vec<TenantKeyVersion>,
    /// The (altered) ciphertext.
    #[serde(with = "hex_bytes")]
    pub ciphertext: Vec<u8>,
    /// Always [`CRYPTO_ERROR`].
    pub expected_error: String,
}

/// `key_check.json`.
pub type KeyCheckFile = VectorFile<KeyCheckVector, KeyCheckMismatch>;
/// `tenant_key_wrap.json`.
pub type TenantKeyWrapFile = VectorFile<TenantKeyWrapVector, TenantKeyWrapInvalid>;
/// `audit_key_wrap.json`.
pub type AuditKeyWrapFile = VectorFile<AuditKeyWrapVector, AuditKeyWrapInvalid>;
/// `field_value.json` and `data_key.json`.
pub type ValueFile = VectorFile<ValueVector, ValueInvalid>;

/// Every embedded vector file, parsed.
pub struct Embedded {
    /// key_check.json
    pub key_check: KeyCheckFile,
    /// tenant_key_wrap.json
    pub tenant_key_wrap: TenantKeyWrapFile,
    /// audit_key_wrap.json
    pub audit_key_wrap: AuditKeyWrapFile,
    /// field_value.json
    pub field_value: ValueFile,
    /// data_key.json
    pub data_key: ValueFile,
}

impl Embedded {
    /// Parses the embedded files. Fails only if a file is not valid JSON of its schema.
    pub fn load() -> Result<Self, serde_json::Error> {
        Ok(Self {
            key_check: serde_json::from_str(KEY_CHECK_JSON)?,
            tenant_key_wrap: serde_json::from_str(TENANT_KEY_WRAP_JSON)?,
            audit_key_wrap: serde_json::from_str(AUDIT_KEY_WRAP_JSON)?,
            field_value: serde_json::from_str(FIELD_VALUE_JSON)?,
            data_key: serde_json::from_str(DATA_KEY_JSON)?,
        })
    }
}

fn secret(bytes: &[u8]) -> Result<SecretKey, String> {
    SecretKey::from_slice(bytes).map_err(|_| "key is not 32 bytes".to_owned())
}

fn nonce_of(bytes: &[u8]) -> Result<[u8; NONCE_LEN], String> {
    <[u8; NONCE_LEN]>::try_from(bytes).map_err(|_| "nonce is not 12 bytes".to_owned())
}

fn expect_eq(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} differs"))
    }
}

fn derived(ikm: &SecretKey, info: &[u8]) -> Result<SecretKey, String> {
    kdf::derive_key(ikm, info).map_err(|_| "HKDF failed".to_owned())
}

/// Checks a key check vector: info, check value and both wrapping keys.
pub fn check_key_check(v: &KeyCheckVector) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let m = v.master_version;
    expect_eq(
        "key_check_info",
        &envelope::master_key_info(labels::KEY_CHECK, m),
        &v.key_check_info,
    )?;
    let check = envelope::key_check_value(&master, m).map_err(|_| "check value failed")?;
    expect_eq("key_check_value", &check, &v.key_check_value)?;
    for (what, label, info, key) in [
        (
            "tenant_key_wrapping",
            labels::TENANT_KEY_WRAP,
            &v.tenant_key_wrapping_info,
            &v.tenant_key_wrapping_key,
        ),
        (
            "audit_key_wrapping",
            labels::AUDIT_KEY_WRAP,
            &v.audit_key_wrapping_info,
            &v.audit_key_wrapping_key,
        ),
    ] {
        let computed = envelope::master_key_info(label, m);
        expect_eq(what, &computed, info)?;
        expect_eq(what, derived(&master, &computed)?.expose_secret(), key)?;
    }
    Ok(())
}

/// Checks that a key check mismatch is detected (constant-time comparison, as at startup).
pub fn check_key_check_mismatch(v: &KeyCheckMismatch) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let check =
        envelope::key_check_value(&master, v.master_version).map_err(|_| "check value failed")?;
    if envelope::constant_time_eq(&check, &v.key_check_value) {
        return Err("a wrong master key matched the check value".into());
    }
    Ok(())
}

/// Checks a wrapped tenant key: AAD, wrapping key, exact bytes (resealed with the vector's
/// nonce) and the unwrap.
pub fn check_tenant_key_wrap(v: &TenantKeyWrapVector) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let m = v.master_version;
    let aad = envelope::tenant_key_wrap_aad(&v.tenant_id, v.key_version, m);
    expect_eq("aad", &aad, &v.aad)?;
    let info = envelope::master_key_info(labels::TENANT_KEY_WRAP, m);
    expect_eq(
        "wrapping_key",
        derived(&master, &info)?.expose_secret(),
        &v.wrapping_key,
    )?;
    let wrapping = envelope::master_wrapping_key(&master, labels::TENANT_KEY_WRAP, m)
        .map_err(|_| "wrapping key failed")?;
    let nonce = nonce_of(&v.nonce)?;
    let mut resealed = v.tenant_key.clone();
    AeadKey::from_slice(&v.wrapping_key)
        .and_then(|k| k.seal_in_place(&nonce, &aad, &mut resealed))
        .map_err(|_| "reseal failed")?;
    let mut expected = v.nonce.clone();
    expected.extend_from_slice(&resealed);
    expect_eq("wrapped", &expected, &v.wrapped)?;
    let key = envelope::unwrap_tenant_key(&wrapping, m, &v.tenant_id, v.key_version, &v.wrapped)
        .map_err(|_| "unwrap failed")?;
    expect_eq("unwrapped key", key.expose_secret(), &v.tenant_key)
}

/// Checks that an altered wrapped tenant key is refused.
pub fn check_tenant_key_wrap_invalid(v: &TenantKeyWrapInvalid) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let wrapping =
        envelope::master_wrapping_key(&master, labels::TENANT_KEY_WRAP, v.master_version)
            .map_err(|_| "wrapping key failed")?;
    match envelope::unwrap_tenant_key(
        &wrapping,
        v.master_version,
        &v.tenant_id,
        v.key_version,
        &v.wrapped,
    ) {
        Ok(_) => Err("an altered wrapped key unwrapped".into()),
        Err(_) => Ok(()),
    }
}

/// Checks a wrapped audit key and the audit keys derived from it.
pub fn check_audit_key_wrap(v: &AuditKeyWrapVector) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let m = v.master_version;
    let aad = envelope::audit_key_wrap_aad(m);
    expect_eq("aad", &aad, &v.aad)?;
    let info = envelope::master_key_info(labels::AUDIT_KEY_WRAP, m);
    expect_eq(
        "wrapping_key",
        derived(&master, &info)?.expose_secret(),
        &v.wrapping_key,
    )?;
    let nonce = nonce_of(&v.nonce)?;
    let mut resealed = v.audit_key.clone();
    AeadKey::from_slice(&v.wrapping_key)
        .and_then(|k| k.seal_in_place(&nonce, &aad, &mut resealed))
        .map_err(|_| "reseal failed")?;
    let mut expected = v.nonce.clone();
    expected.extend_from_slice(&resealed);
    expect_eq("wrapped", &expected, &v.wrapped)?;
    let wrapping = envelope::master_wrapping_key(&master, labels::AUDIT_KEY_WRAP, m)
        .map_err(|_| "wrapping key failed")?;
    let audit =
        envelope::unwrap_audit_key(&wrapping, m, &v.wrapped).map_err(|_| "unwrap failed")?;
    expect_eq("unwrapped key", audit.expose_secret(), &v.audit_key)?;
    expect_eq(
        "chain_key",
        derived(&audit, labels::AUDIT_CHAIN)?.expose_secret(),
        &v.chain_key,
    )?;
    expect_eq(
        "fingerprint_key",
        derived(&audit, labels::AAD_FINGERPRINT)?.expose_secret(),
        &v.fingerprint_key,
    )?;
    let chain = ChainKeys::derive(&audit).map_err(|_| "chain keys failed")?;
    expect_eq(
        "example_aad_fingerprint",
        chain.aad_fingerprint(&v.example_aad).as_bytes(),
        v.example_aad_fingerprint.as_bytes(),
    )
}

/// Checks that an altered wrapped audit key is refused.
pub fn check_audit_key_wrap_invalid(v: &AuditKeyWrapInvalid) -> Result<(), String> {
    let master = secret(&v.master_key)?;
    let wrapping = envelope::master_wrapping_key(&master, labels::AUDIT_KEY_WRAP, v.master_version)
        .map_err(|_| "wrapping key failed")?;
    match envelope::unwrap_audit_key(&wrapping, v.master_version, &v.wrapped) {
        Ok(_) => Err("an altered wrapped audit key unwrapped".into()),
        Err(_) => Ok(()),
    }
}

/// Checks a value vector: info, derived key, header, AAD, the exact ciphertext (resealed from
/// its parts with the vector's nonce) and the open.
pub fn check_value(purpose: Purpose, v: &ValueVector) -> Result<(), String> {
    let tenant_key = secret(&v.tenant_key)?;
    let info = envelope::value_key_info(purpose, &v.tenant_id, &v.context);
    expect_eq("info", &info, &v.info)?;
    expect_eq(
        "value_key",
        derived(&tenant_key, &info)?.expose_secret(),
        &v.value_key,
    )?;
    let nonce = nonce_of(&v.nonce)?;
    let header = Header {
        algorithm: purpose.algorithm(),
        key_version: v.key_version,
        nonce,
    }
    .encode();
    expect_eq("header", &header, &v.header)?;
    let aad = format::additional_data(purpose.label(), &header, &v.tenant_id, &v.context, &v.aad);
    expect_eq("additional_data", &aad, &v.additional_data)?;
    let mut body = v.plaintext.clone();
    AeadKey::from_slice(&v.value_key)
        .and_then(|k| k.seal_in_place(&nonce, &aad, &mut body))
        .map_err(|_| "reseal failed")?;
    let mut expected = header.to_vec();
    expected.extend_from_slice(&body);
    expect_eq("ciphertext", &expected, &v.ciphertext)?;
    let keys = [TenantKeyVersion {
        version: v.key_version,
        key: v.tenant_key.clone(),
    }];
    let plaintext = open_like_service(
        purpose,
        &keys,
        &v.tenant_id,
        &v.context,
        &v.aad,
        &v.ciphertext,
    )
    .map_err(|_| "open failed")?;
    expect_eq("plaintext", plaintext.expose_secret(), &v.plaintext)
}

/// Checks that an altered ciphertext (or a wrong binding) is refused.
pub fn check_value_invalid(purpose: Purpose, v: &ValueInvalid) -> Result<(), String> {
    match open_like_service(
        purpose,
        &v.tenant_keys,
        &v.tenant_id,
        &v.context,
        &v.aad,
        &v.ciphertext,
    ) {
        Ok(_) => Err("an invalid ciphertext opened".into()),
        Err(_) => Ok(()),
    }
}

/// Opens a ciphertext the way the Decrypt and DecryptDataKey handlers do: parse, pick the key
/// version the header names (a version the tenant does not hold is the same opaque error),
/// derive the value key, open.
pub fn open_like_service(
    purpose: Purpose,
    tenant_keys: &[TenantKeyVersion],
    tenant_id: &str,
    context: &str,
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, CryptoError> {
    let parsed = format::parse(ciphertext)?;
    let held = tenant_keys
        .iter()
        .find(|k| k.version == parsed.header.key_version)
        .ok_or(CryptoError)?;
    let tenant_key = SecretKey::from_slice(&held.key)?;
    let key = envelope::derive_value_key(&tenant_key, purpose, tenant_id, context)?;
    envelope::open_value(&key, purpose, &parsed, tenant_id, context, aad)
}

fn expected_error_is_crypto(name: &str, expected: &str) -> Result<(), String> {
    if expected == CRYPTO_ERROR || expected == "key_check_mismatch" {
        Ok(())
    } else {
        Err(format!("{name}: unknown expected_error {expected:?}"))
    }
}

/// One vector file as one suite: every valid vector must pass `check_valid`; every invalid
/// one must name the one opaque error and pass `check_invalid` (be refused).
fn file_suite<V, I>(
    suite: &'static str,
    file: &VectorFile<V, I>,
    valid_name: fn(&V) -> &str,
    check_valid: impl Fn(&V) -> Result<(), String>,
    invalid_name_and_error: fn(&I) -> (&str, &str),
    check_invalid: impl Fn(&I) -> Result<(), String>,
) -> SuiteReport {
    let mut report = SuiteReport::new(suite);
    let valid = file.valid.iter().map(|v| (valid_name(v), check_valid(v)));
    let invalid = file.invalid.iter().map(|v| {
        let (name, expected) = invalid_name_and_error(v);
        let outcome = expected_error_is_crypto(name, expected).and_then(|()| check_invalid(v));
        (name, outcome)
    });
    for (name, outcome) in valid.chain(invalid) {
        report.record(match outcome {
            Ok(()) => CaseOutcome::Passed,
            Err(why) => CaseOutcome::Failed(format!("{name}: {why}")),
        });
    }
    report
}

/// Runs every embedded vector file as one suite per file.
pub fn run_all() -> Vec<SuiteReport> {
    let embedded = match Embedded::load() {
        Ok(embedded) => embedded,
        Err(e) => {
            let mut report = SuiteReport::new("vectors: vectors/*.json");
            report.record(CaseOutcome::Failed(format!("cannot parse: {e}")));
            return vec![report];
        }
    };
    let mut reports = vec![
        file_suite(
            "vectors: key_check.json",
            &embedded.key_check,
            |v| &v.name,
            check_key_check,
            |v| (&v.name, &v.expected_error),
            check_key_check_mismatch,
        ),
        file_suite(
            "vectors: tenant_key_wrap.json",
            &embedded.tenant_key_wrap,
            |v| &v.name,
            check_tenant_key_wrap,
            |v| (&v.name, &v.expected_error),
            check_tenant_key_wrap_invalid,
        ),
        file_suite(
            "vectors: audit_key_wrap.json",
            &embedded.audit_key_wrap,
            |v| &v.name,
            check_audit_key_wrap,
            |v| (&v.name, &v.expected_error),
            check_audit_key_wrap_invalid,
        ),
    ];
    for (suite, purpose, file) in [
        (
            "vectors: field_value.json",
            Purpose::Field,
            &embedded.field_value,
        ),
        (
            "vectors: data_key.json",
            Purpose::DataKey,
            &embedded.data_key,
        ),
    ] {
        reports.push(file_suite(
            suite,
            file,
            |v| &v.name,
            |v| check_value(purpose, v),
            |v| (&v.name, &v.expected_error),
            |v| check_value_invalid(purpose, v),
        ));
    }
    reports
}
