//! The key hierarchy's cryptographic operations (DESIGN §1–2): deriving field and data-key
//! wrapping keys from a tenant key, sealing and opening v1 ciphertexts, wrapping tenant keys
//! and the audit secret under a master key, and the master key's check value.
//!
//! The master key is only ever an HKDF input (RFC 5869): the key that wraps tenant keys and
//! the check value are both derived from it under distinct labels, so no key serves two
//! primitives.

use subtle::ConstantTimeEq;

use super::CryptoError;
use super::aead::{AeadKey, NONCE_LEN, TAG_LEN, random_nonce};
use super::format::{self, Algorithm, Header};
use super::kdf;
use super::labels::{self, push_length_prefixed};
use super::secret::{KEY_LEN, SecretBytes, SecretKey};

/// What a value key is for. Each purpose has its own label, so a field key never opens a
/// wrapped data key and the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Column values (wire algorithm 1).
    Field,
    /// Data keys returned by GenerateDataKey (wire algorithm 2).
    DataKey,
}

impl Purpose {
    /// The label used in this purpose's HKDF info and AAD.
    pub fn label(self) -> &'static [u8] {
        match self {
            Purpose::Field => labels::FIELD,
            Purpose::DataKey => labels::DATA_KEY,
        }
    }

    /// The wire algorithm of this purpose's ciphertexts.
    pub fn algorithm(self) -> Algorithm {
        match self {
            Purpose::Field => Algorithm::FieldValue,
            Purpose::DataKey => Algorithm::WrappedDataKey,
        }
    }
}

/// The HKDF info of a value key: `lp(label) ‖ lp(tenant_id) ‖ lp(context)`.
pub fn value_key_info(purpose: Purpose, tenant_id: &str, context: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(purpose.label().len() + tenant_id.len() + context.len() + 12);
    push_length_prefixed(&mut info, purpose.label());
    push_length_prefixed(&mut info, tenant_id.as_bytes());
    push_length_prefixed(&mut info, context.as_bytes());
    info
}

/// Derives the AES-256-GCM key for one (tenant key version, purpose, context), by
/// HKDF-SHA256 (RFC 5869) from the tenant key.
pub fn derive_value_key(
    tenant_key: &SecretKey,
    purpose: Purpose,
    tenant_id: &str,
    context: &str,
) -> Result<AeadKey, CryptoError> {
    let derived = kdf::derive_key(tenant_key, &value_key_info(purpose, tenant_id, context))?;
    AeadKey::new(&derived)
}

/// Seals `plaintext` into a v1 ciphertext with a fresh random nonce.
pub fn seal_value(
    key: &AeadKey,
    purpose: Purpose,
    key_version: u32,
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    seal_value_with_nonce(
        key,
        purpose,
        key_version,
        &random_nonce(),
        tenant_id,
        context,
        caller_aad,
        plaintext,
    )
}

/// [`seal_value`] with a chosen nonce: only for known-answer vectors. Production code cannot
/// reach it (it exists only in test builds and behind the `test-seams` feature).
#[cfg(any(test, feature = "test-seams"))]
#[allow(clippy::too_many_arguments)]
pub fn seal_value_with_fixed_nonce(
    key: &AeadKey,
    purpose: Purpose,
    key_version: u32,
    nonce: &[u8; NONCE_LEN],
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    seal_value_with_nonce(
        key,
        purpose,
        key_version,
        nonce,
        tenant_id,
        context,
        caller_aad,
        plaintext,
    )
}

#[allow(clippy::too_many_arguments)]
fn seal_value_with_nonce(
    key: &AeadKey,
    purpose: Purpose,
    key_version: u32,
    nonce: &[u8; NONCE_LEN],
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if key_version == 0 {
        return Err(CryptoError);
    }
    let header = Header {
        algorithm: purpose.algorithm(),
        key_version,
        nonce: *nonce,
    }
    .encode();
    // One allocation, laid out once: header, then the plaintext sealed in place, then the tag.
    let mut out = Vec::with_capacity(format::HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(plaintext);
    let body = out.get_mut(format::HEADER_LEN..).ok_or(CryptoError)?;
    let tag = format::with_additional_data(
        purpose.label(),
        &header,
        tenant_id,
        context,
        caller_aad,
        |aad| key.seal_in_place_separate_tag(nonce, aad, body),
    )?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a parsed v1 ciphertext with the key of the version its header names.
///
/// Fails, with the one opaque error, if the algorithm is not `purpose`'s, if any header byte,
/// the tenant, the context or the caller AAD differs from sealing, or if the tag is wrong.
pub fn open_value(
    key: &AeadKey,
    purpose: Purpose,
    parsed: &format::Parsed<'_>,
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
) -> Result<SecretBytes, CryptoError> {
    if parsed.header.algorithm != purpose.algorithm() {
        return Err(CryptoError);
    }
    let mut buf = SecretBytes::new(parsed.body.to_vec());
    let plaintext_len = format::with_additional_data(
        purpose.label(),
        parsed.header_bytes,
        tenant_id,
        context,
        caller_aad,
        |aad| {
            key.open_in_place(&parsed.header.nonce, aad, buf.expose_secret_mut())
                .map(|p| p.len())
        },
    )?;
    buf.truncate(plaintext_len);
    Ok(buf)
}

/// The HKDF info of a key derived from one master-key version: `lp(label) ‖ be32(m)`. Used
/// with [`labels::TENANT_KEY_WRAP`] and [`labels::AUDIT_KEY_WRAP`] (wrapping keys) and
/// [`labels::KEY_CHECK`] (the check value).
pub fn master_key_info(label: &[u8], master_version: u32) -> Vec<u8> {
    let mut info = Vec::with_capacity(label.len() + 8);
    push_length_prefixed(&mut info, label);
    info.extend_from_slice(&master_version.to_be_bytes());
    info
}

/// The key that wraps secrets under one master-key version: HKDF(master, lp(label) ‖ be32(m)).
pub fn master_wrapping_key(
    master: &SecretKey,
    label: &[u8],
    master_version: u32,
) -> Result<AeadKey, CryptoError> {
    AeadKey::new(&kdf::derive_key(
        master,
        &master_key_info(label, master_version),
    )?)
}

/// The AAD binding a wrapped tenant key to its tenant, version and master version:
/// `lp(TENANT_KEY_WRAP) ‖ lp(tenant_id) ‖ be32(key_version) ‖ be32(master_version)`.
pub fn tenant_key_wrap_aad(tenant_id: &str, key_version: u32, master_version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(labels::TENANT_KEY_WRAP.len() + tenant_id.len() + 16);
    push_length_prefixed(&mut aad, labels::TENANT_KEY_WRAP);
    push_length_prefixed(&mut aad, tenant_id.as_bytes());
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad.extend_from_slice(&master_version.to_be_bytes());
    aad
}

/// Length of a wrapped tenant key: nonce ‖ sealed 32-byte key ‖ tag.
pub const WRAPPED_KEY_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

/// Wraps a tenant key under a master-key version's wrapping key (see [`master_wrapping_key`]
/// with [`labels::TENANT_KEY_WRAP`]). The result is public: useless without the master key.
pub fn wrap_tenant_key(
    wrapping_key: &AeadKey,
    master_version: u32,
    tenant_id: &str,
    key_version: u32,
    tenant_key: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    let aad = tenant_key_wrap_aad(tenant_id, key_version, master_version);
    wrap_secret(wrapping_key, &random_nonce(), &aad, tenant_key)
}

/// [`wrap_tenant_key`] with a chosen nonce: only for known-answer vectors.
#[cfg(any(test, feature = "test-seams"))]
pub fn wrap_tenant_key_with_fixed_nonce(
    wrapping_key: &AeadKey,
    master_version: u32,
    tenant_id: &str,
    key_version: u32,
    tenant_key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, CryptoError> {
    let aad = tenant_key_wrap_aad(tenant_id, key_version, master_version);
    wrap_secret(wrapping_key, nonce, &aad, tenant_key)
}

/// Unwraps a tenant key; fails unless tenant, version and master version match the wrapping.
pub fn unwrap_tenant_key(
    wrapping_key: &AeadKey,
    master_version: u32,
    tenant_id: &str,
    key_version: u32,
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    let aad = tenant_key_wrap_aad(tenant_id, key_version, master_version);
    unwrap_secret(wrapping_key, &aad, wrapped)
}

/// The AAD binding the wrapped audit secret to its master version:
/// `lp(AUDIT_KEY_WRAP) ‖ be32(master_version)`.
pub fn audit_key_wrap_aad(master_version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(labels::AUDIT_KEY_WRAP.len() + 8);
    push_length_prefixed(&mut aad, labels::AUDIT_KEY_WRAP);
    aad.extend_from_slice(&master_version.to_be_bytes());
    aad
}

/// Wraps the audit secret under a master-key version's wrapping key (label
/// [`labels::AUDIT_KEY_WRAP`]).
pub fn wrap_audit_key(
    wrapping_key: &AeadKey,
    master_version: u32,
    audit_key: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    wrap_secret(
        wrapping_key,
        &random_nonce(),
        &audit_key_wrap_aad(master_version),
        audit_key,
    )
}

/// [`wrap_audit_key`] with a chosen nonce: only for known-answer vectors.
#[cfg(any(test, feature = "test-seams"))]
pub fn wrap_audit_key_with_fixed_nonce(
    wrapping_key: &AeadKey,
    master_version: u32,
    audit_key: &SecretKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, CryptoError> {
    wrap_secret(
        wrapping_key,
        nonce,
        &audit_key_wrap_aad(master_version),
        audit_key,
    )
}

/// Unwraps the audit secret.
pub fn unwrap_audit_key(
    wrapping_key: &AeadKey,
    master_version: u32,
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    unwrap_secret(wrapping_key, &audit_key_wrap_aad(master_version), wrapped)
}

fn wrap_secret(
    wrapping_key: &AeadKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    secret: &SecretKey,
) -> Result<Vec<u8>, CryptoError> {
    let mut body = Vec::with_capacity(WRAPPED_KEY_LEN);
    body.extend_from_slice(secret.expose_secret());
    // If sealing failed the buffer would still hold the key: clear it either way.
    let sealed = wrapping_key.seal_in_place(nonce, aad, &mut body);
    if sealed.is_err() {
        zeroize::Zeroize::zeroize(&mut body);
        return Err(CryptoError);
    }
    let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
    out.extend_from_slice(nonce);
    out.append(&mut body);
    Ok(out)
}

fn unwrap_secret(
    wrapping_key: &AeadKey,
    aad: &[u8],
    wrapped: &[u8],
) -> Result<SecretKey, CryptoError> {
    if wrapped.len() != WRAPPED_KEY_LEN {
        return Err(CryptoError);
    }
    let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
    let mut buf = SecretBytes::new(sealed.to_vec());
    let plaintext = wrapping_key.open_in_place(nonce, aad, buf.expose_secret_mut())?;
    SecretKey::from_slice(plaintext)
}

/// The key check value of a master-key version: HKDF(master, lp(KEY_CHECK) ‖ be32(m)).
/// Stored in the key store so a start with the wrong master key fails at once.
pub fn key_check_value(master: &SecretKey, master_version: u32) -> Result<[u8; 32], CryptoError> {
    let derived = kdf::derive_key(master, &master_key_info(labels::KEY_CHECK, master_version))?;
    Ok(*derived.expose_secret())
}

/// Compares two check values (or any two MACs) in constant time.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_key() -> SecretKey {
        SecretKey::from_slice(&[0x42; 32]).unwrap()
    }

    #[test]
    fn field_round_trip_binds_everything() {
        let tk = tenant_key();
        let key = derive_value_key(&tk, Purpose::Field, "acme", "crm.email").unwrap();
        let ct = seal_value(
            &key,
            Purpose::Field,
            3,
            "acme",
            "crm.email",
            b"row-1",
            b"a@b.c",
        )
        .unwrap();
        let parsed = format::parse(&ct).unwrap();
        assert_eq!(parsed.header.key_version, 3);
        let pt = open_value(&key, Purpose::Field, &parsed, "acme", "crm.email", b"row-1").unwrap();
        assert_eq!(pt.expose_secret(), b"a@b.c");
        assert!(open_value(&key, Purpose::Field, &parsed, "acme", "crm.email", b"row-2").is_err());
        assert!(open_value(&key, Purpose::Field, &parsed, "acmf", "crm.email", b"row-1").is_err());
        assert!(open_value(&key, Purpose::Field, &parsed, "acme", "crm.phone", b"row-1").is_err());
        assert!(
            open_value(
                &key,
                Purpose::DataKey,
                &parsed,
                "acme",
                "crm.email",
                b"row-1"
            )
            .is_err()
        );
        let other = derive_value_key(&tk, Purpose::Field, "acme", "crm.phone").unwrap();
        assert!(
            open_value(
                &other,
                Purpose::Field,
                &parsed,
                "acme",
                "crm.email",
                b"row-1"
            )
            .is_err()
        );
    }

    #[test]
    fn every_bit_flip_fails() {
        let tk = tenant_key();
        let key = derive_value_key(&tk, Purpose::Field, "t", "c").unwrap();
        let ct = seal_value(&key, Purpose::Field, 1, "t", "c", b"", b"secret value").unwrap();
        for bit in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result = format::parse(&bad)
                .and_then(|p| open_value(&key, Purpose::Field, &p, "t", "c", b""));
            assert!(result.is_err(), "bit {bit}");
        }
    }

    #[test]
    fn tenant_key_wrap_binds_tenant_version_and_master() {
        let mk = SecretKey::from_slice(&[1; 32]).unwrap();
        let wk = master_wrapping_key(&mk, labels::TENANT_KEY_WRAP, 1).unwrap();
        let tk = tenant_key();
        let wrapped = wrap_tenant_key(&wk, 1, "acme", 2, &tk).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_KEY_LEN);
        let back = unwrap_tenant_key(&wk, 1, "acme", 2, &wrapped).unwrap();
        assert_eq!(back.expose_secret(), tk.expose_secret());
        assert!(unwrap_tenant_key(&wk, 1, "acme", 3, &wrapped).is_err());
        assert!(unwrap_tenant_key(&wk, 2, "acme", 2, &wrapped).is_err());
        assert!(unwrap_tenant_key(&wk, 1, "acmf", 2, &wrapped).is_err());
    }

    #[test]
    fn check_values_differ_per_key_and_version() {
        let a = SecretKey::from_slice(&[1; 32]).unwrap();
        let b = SecretKey::from_slice(&[2; 32]).unwrap();
        assert_ne!(
            key_check_value(&a, 1).unwrap(),
            key_check_value(&b, 1).unwrap()
        );
        assert_ne!(
            key_check_value(&a, 1).unwrap(),
            key_check_value(&a, 2).unwrap()
        );
        assert!(constant_time_eq(
            &key_check_value(&a, 1).unwrap(),
            &key_check_value(&a, 1).unwrap()
        ));
    }
}
