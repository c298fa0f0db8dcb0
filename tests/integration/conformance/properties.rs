//! Property tests (proptest): round trips over arbitrary values, contexts and AAD; every
//! single-bit flip refused with the one error; and a differential test of our AEAD layer
//! (ring) against RustCrypto's `aes-gcm`, two independent implementations that must agree
//! byte for byte, at the AEAD level and through the whole v1 envelope.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use tenant_kms::crypto::CryptoError;
use tenant_kms::crypto::aead::{AeadKey, NONCE_LEN, random_nonce};
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format::{self, Header};
use tenant_kms::crypto::kdf;
use tenant_kms::crypto::labels;
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::domain::{Context, TenantId};
use tenant_kms::error::Error;

use super::report;

/// Tenant ids as `TenantId::parse` accepts them.
fn tenant_id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_-]{0,63}"
}

/// Contexts as `Context::parse` accepts them: 1–128 printable ASCII characters.
fn context() -> impl Strategy<Value = String> {
    "[ -~]{1,128}"
}

fn purpose() -> impl Strategy<Value = Purpose> {
    prop_oneof![Just(Purpose::Field), Just(Purpose::DataKey)]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

/// Parse and open exactly as the Decrypt handler does.
fn open(
    tenant_key: &SecretKey,
    purpose: Purpose,
    tenant: &str,
    context: &str,
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let parsed = format::parse(ciphertext)?;
    let key = envelope::derive_value_key(tenant_key, purpose, tenant, context)?;
    let plaintext = envelope::open_value(&key, purpose, &parsed, tenant, context, aad)?;
    Ok(plaintext.expose_secret().to_vec())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No persistence files in the source tree; failures print the minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs a property over `cases` random inputs, panics with the minimal failing input, and
/// reports the count.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(config(cases));
    if let Err(e) = runner.run(&strategy, property) {
        panic!("{name}: {e}");
    }
    report(&format!("proptest {name}: {cases} cases passed"));
}

/// Bit flips checked by the flip properties (for the report).
static FLIPS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn round_trip_any_value_context_and_aad() {
    let inputs = (
        any::<[u8; 32]>(),
        tenant_id(),
        context(),
        bytes(256),
        bytes(2048),
        1u32..,
        purpose(),
    );
    check(
        "round trip (value, context, aad, version, purpose)",
        256,
        inputs,
        |(tk, tenant, context, aad, value, version, purpose)| {
            prop_assert!(TenantId::parse(&tenant).is_ok());
            prop_assert!(Context::parse(&context).is_ok());
            let tk = SecretKey::from_slice(&tk).unwrap();
            let key = envelope::derive_value_key(&tk, purpose, &tenant, &context).unwrap();
            let ct = envelope::seal_value(&key, purpose, version, &tenant, &context, &aad, &value)
                .unwrap();
            prop_assert_eq!(ct.len(), format::MIN_LEN + value.len());
            let parsed = format::parse(&ct).unwrap();
            prop_assert_eq!(parsed.header.key_version, version);
            prop_assert_eq!(parsed.header.algorithm, purpose.algorithm());
            prop_assert_eq!(
                open(&tk, purpose, &tenant, &context, &aad, &ct).unwrap(),
                value
            );
            Ok(())
        },
    );
}

#[test]
fn wrapped_tenant_keys_round_trip() {
    let inputs = (
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        tenant_id(),
        1u32..,
        1u32..,
    );
    check(
        "tenant key wrap round trip",
        128,
        inputs,
        |(mk, tk, tenant, version, master_version)| {
            let mk = SecretKey::from_slice(&mk).unwrap();
            let wrapping =
                envelope::master_wrapping_key(&mk, labels::TENANT_KEY_WRAP, master_version)
                    .unwrap();
            let tk = SecretKey::from_slice(&tk).unwrap();
            let wrapped =
                envelope::wrap_tenant_key(&wrapping, master_version, &tenant, version, &tk)
                    .unwrap();
            prop_assert_eq!(wrapped.len(), envelope::WRAPPED_KEY_LEN);
            let back =
                envelope::unwrap_tenant_key(&wrapping, master_version, &tenant, version, &wrapped)
                    .unwrap();
            prop_assert_eq!(back.expose_secret(), tk.expose_secret());
            Ok(())
        },
    );
}

#[test]
fn every_single_bit_flip_is_refused_with_one_error() {
    let inputs = (
        any::<[u8; 32]>(),
        tenant_id(),
        context(),
        bytes(64),
        bytes(48),
        1u32..,
        purpose(),
    );
    let before = FLIPS.load(Ordering::Relaxed);
    check(
        "single-bit flips of v1 ciphertexts",
        48,
        inputs,
        |(tk, tenant, context, aad, value, version, purpose)| {
            let tk = SecretKey::from_slice(&tk).unwrap();
            let key = envelope::derive_value_key(&tk, purpose, &tenant, &context).unwrap();
            let ct = envelope::seal_value(&key, purpose, version, &tenant, &context, &aad, &value)
                .unwrap();
            for bit in 0..ct.len() * 8 {
                let mut bad = ct.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let result = open(&tk, purpose, &tenant, &context, &aad, &bad);
                prop_assert_eq!(result.clone().err(), Some(CryptoError), "bit {}", bit);
                // ...which the service reports as the one DecryptFailed, whatever the bit.
                prop_assert!(matches!(
                    Error::failed_open(result.unwrap_err()),
                    Error::DecryptFailed
                ));
                FLIPS.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        },
    );
    report(&format!(
        "single-bit flips: {} flipped ciphertexts, each refused with the one error",
        FLIPS.load(Ordering::Relaxed) - before
    ));
}

#[test]
fn every_single_bit_flip_of_a_wrapped_key_is_refused() {
    let inputs = (any::<[u8; 32]>(), any::<[u8; 32]>(), tenant_id(), 1u32..);
    check(
        "single-bit flips of wrapped tenant keys",
        32,
        inputs,
        |(mk, tk, tenant, version)| {
            let mk = SecretKey::from_slice(&mk).unwrap();
            let wrapping = envelope::master_wrapping_key(&mk, labels::TENANT_KEY_WRAP, 1).unwrap();
            let tk = SecretKey::from_slice(&tk).unwrap();
            let wrapped = envelope::wrap_tenant_key(&wrapping, 1, &tenant, version, &tk).unwrap();
            for bit in 0..wrapped.len() * 8 {
                let mut bad = wrapped.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let result = envelope::unwrap_tenant_key(&wrapping, 1, &tenant, version, &bad);
                prop_assert!(matches!(result, Err(CryptoError)), "bit {}", bit);
            }
            Ok(())
        },
    );
}

/// ring (through `AeadKey`) and RustCrypto `aes-gcm` agree on every seal, and each opens the
/// other's output; a flipped bit is refused by both.
#[test]
fn differential_aead_ring_vs_rustcrypto() {
    let inputs = (
        any::<[u8; 32]>(),
        any::<[u8; NONCE_LEN]>(),
        bytes(300),
        bytes(1100),
        any::<prop::sample::Index>(),
    );
    check(
        "differential AES-256-GCM ring vs RustCrypto aes-gcm",
        256,
        inputs,
        |(key, nonce, aad, plaintext, flip)| {
            let ours = AeadKey::from_slice(&key).unwrap();
            let theirs = Aes256Gcm::new_from_slice(&key).unwrap();
            let nonce_ga = Nonce::from_slice(&nonce);

            let mut ring_sealed = plaintext.clone();
            ours.seal_in_place(&nonce, &aad, &mut ring_sealed).unwrap();
            let payload = Payload {
                msg: &plaintext,
                aad: &aad,
            };
            let rc_sealed = theirs.encrypt(nonce_ga, payload).unwrap();
            prop_assert_eq!(&ring_sealed, &rc_sealed);

            // Ours opened by theirs.
            let payload = Payload {
                msg: &ring_sealed,
                aad: &aad,
            };
            prop_assert_eq!(&theirs.decrypt(nonce_ga, payload).unwrap(), &plaintext);
            // Theirs opened by ours.
            let mut buf = rc_sealed.clone();
            prop_assert_eq!(
                ours.open_in_place(&nonce, &aad, &mut buf).unwrap(),
                &plaintext[..]
            );

            // Both refuse the same tampered bytes.
            let mut bad = ring_sealed.clone();
            let i = flip.index(bad.len() * 8);
            bad[i / 8] ^= 1 << (i % 8);
            let payload = Payload {
                msg: &bad,
                aad: &aad,
            };
            prop_assert!(theirs.decrypt(nonce_ga, payload).is_err());
            prop_assert!(ours.open_in_place(&nonce, &aad, &mut bad).is_err());
            Ok(())
        },
    );
}

/// The whole envelope: what `seal_value` produces opens with `aes-gcm` given the derived key
/// and the AAD as FORMAT.md constructs it, and a ciphertext built with `aes-gcm` from those
/// parts opens with `open_value`.
#[test]
fn differential_envelope_ring_vs_rustcrypto() {
    let inputs = (
        any::<[u8; 32]>(),
        tenant_id(),
        context(),
        bytes(128),
        bytes(512),
        1u32..,
        purpose(),
        any::<[u8; NONCE_LEN]>(),
    );
    check(
        "differential v1 envelope ring vs RustCrypto aes-gcm",
        128,
        inputs,
        |(tk, tenant, context, aad, value, version, purpose, nonce)| {
            let tk = SecretKey::from_slice(&tk).unwrap();
            let info = envelope::value_key_info(purpose, &tenant, &context);
            let key_bytes = kdf::derive_key(&tk, &info).unwrap();
            let theirs = Aes256Gcm::new_from_slice(key_bytes.expose_secret()).unwrap();
            let ours = envelope::derive_value_key(&tk, purpose, &tenant, &context).unwrap();

            // Ours -> theirs.
            let ct = envelope::seal_value(&ours, purpose, version, &tenant, &context, &aad, &value)
                .unwrap();
            let header: [u8; format::HEADER_LEN] = ct[..format::HEADER_LEN].try_into().unwrap();
            let gcm_aad =
                format::additional_data(purpose.label(), &header, &tenant, &context, &aad);
            let payload = Payload {
                msg: &ct[format::HEADER_LEN..],
                aad: &gcm_aad,
            };
            let opened = theirs
                .decrypt(Nonce::from_slice(&ct[6..18]), payload)
                .unwrap();
            prop_assert_eq!(&opened, &value);

            // Theirs -> ours.
            let header = Header {
                algorithm: purpose.algorithm(),
                key_version: version,
                nonce,
            }
            .encode();
            let gcm_aad =
                format::additional_data(purpose.label(), &header, &tenant, &context, &aad);
            let payload = Payload {
                msg: &value,
                aad: &gcm_aad,
            };
            let body = theirs.encrypt(Nonce::from_slice(&nonce), payload).unwrap();
            let theirs_ct = [header.as_slice(), &body].concat();
            prop_assert_eq!(
                open(&tk, purpose, &tenant, &context, &aad, &theirs_ct).unwrap(),
                value
            );
            Ok(())
        },
    );
}

#[test]
fn random_nonces_differ() {
    assert_ne!(random_nonce(), random_nonce());
}
