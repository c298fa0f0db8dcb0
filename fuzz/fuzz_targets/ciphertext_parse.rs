//! Fuzzes the v1 ciphertext parser and the open path (`crypto::format::parse`, then
//! `crypto::envelope::open_value`), and the tenant-key unwrap.
//!
//! Properties: nothing panics; a parsed header re-encodes to the bytes it came from; nothing
//! opens but the one valid ciphertext (anything else would be a GCM forgery); and a valid
//! ciphertext or wrapped key changed in any way (bits XORed, bytes cut or appended) never
//! opens, while the unchanged one does.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tenant_kms::crypto::aead::AeadKey;
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format::{self, HEADER_LEN, MIN_LEN};
use tenant_kms::crypto::labels;
use tenant_kms::crypto::secret::SecretKey;

const TENANT: &str = "acme";
const CONTEXT: &str = "crm.contacts.email";
const AAD: &[u8] = b"row:42";
const VALUE: &[u8] = b"alice@example.com";

struct Fixture {
    field: AeadKey,
    data_key: AeadKey,
    field_ct: Vec<u8>,
    wrapping: AeadKey,
    wrapped: Vec<u8>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let tk = SecretKey::from_slice(&[0x42; 32]).unwrap();
    let field = envelope::derive_value_key(&tk, Purpose::Field, TENANT, CONTEXT).unwrap();
    let data_key = envelope::derive_value_key(&tk, Purpose::DataKey, TENANT, CONTEXT).unwrap();
    // Fixed nonces (test seam): the only valid ciphertext and wrapped key under these keys
    // that the fuzzer can ever see are these, in every run.
    let field_ct = envelope::seal_value_with_fixed_nonce(
        &field,
        Purpose::Field,
        1,
        &[0x24; 12],
        TENANT,
        CONTEXT,
        AAD,
        VALUE,
    )
    .unwrap();
    let mk = SecretKey::from_slice(&[0x01; 32]).unwrap();
    let wrapping = envelope::master_wrapping_key(&mk, labels::TENANT_KEY_WRAP, 1).unwrap();
    let wrapped =
        envelope::wrap_tenant_key_with_fixed_nonce(&wrapping, 1, TENANT, 1, &tk, &[0x42; 12])
            .unwrap();
    Fixture {
        field,
        data_key,
        field_ct,
        wrapping,
        wrapped,
    }
});

/// Parses and opens under both purposes; returns the plaintext if it opened.
fn parse_and_open(bytes: &[u8]) -> Option<Vec<u8>> {
    let fx = &*FIXTURE;
    let parsed = format::parse(bytes).ok()?;
    assert!(bytes.len() >= MIN_LEN);
    assert_eq!(&parsed.header.encode(), parsed.header_bytes);
    assert_eq!(parsed.body.len(), bytes.len() - HEADER_LEN);
    assert_ne!(parsed.header.key_version, 0);
    let field = envelope::open_value(&fx.field, Purpose::Field, &parsed, TENANT, CONTEXT, AAD);
    let data = envelope::open_value(
        &fx.data_key,
        Purpose::DataKey,
        &parsed,
        TENANT,
        CONTEXT,
        b"",
    );
    assert!(data.is_err(), "a data-key open succeeded on fuzz input");
    field.ok().map(|p| p.expose_secret().to_vec())
}

/// `base` with `edit[1..]` XORed in from the start and its length changed by `edit[0]`
/// (0-127: cut that many bytes from the end; 128-255: append that many minus 127 zero bytes).
fn mutate(base: &[u8], edit: &[u8]) -> Vec<u8> {
    let (len_edit, xor) = edit.split_first().map_or((0u8, &[][..]), |(a, b)| (*a, b));
    let mut out: Vec<u8> = base.to_vec();
    if len_edit < 128 {
        out.truncate(base.len().saturating_sub(usize::from(len_edit)));
    } else {
        out.resize(base.len() + usize::from(len_edit - 127), 0);
    }
    for (b, x) in out.iter_mut().zip(xor) {
        *b ^= x;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let fx = &*FIXTURE;
    match mode % 3 {
        0 => {
            // Raw bytes open only if they are the fixture's ciphertext itself (which the fuzzer
            // learns from the comparisons in mode 1); anything else would be a GCM forgery.
            if let Some(plaintext) = parse_and_open(rest) {
                assert_eq!(rest, fx.field_ct.as_slice(), "raw fuzz input opened");
                assert_eq!(plaintext, VALUE);
            }
        }
        1 => {
            let candidate = mutate(&fx.field_ct, rest);
            match parse_and_open(&candidate) {
                Some(plaintext) => {
                    assert_eq!(candidate, fx.field_ct, "an altered ciphertext opened");
                    assert_eq!(plaintext, VALUE);
                }
                None => assert_ne!(candidate, fx.field_ct, "the valid ciphertext did not open"),
            }
        }
        _ => {
            let candidate = mutate(&fx.wrapped, rest);
            let opened = envelope::unwrap_tenant_key(&fx.wrapping, 1, TENANT, 1, &candidate);
            assert_eq!(
                opened.is_ok(),
                candidate == fx.wrapped,
                "wrapped-key authenticity"
            );
        }
    }
});
