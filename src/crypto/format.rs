//! The v1 ciphertext wire format (docs/FORMAT.md):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version = 1 |
//! | 1 | 1 | algorithm (1 = field value, 2 = wrapped data key, 3 = deterministic value) |
//! | 2 | 4 | tenant key version, big-endian |
//! | 6 | 12 | nonce (all zero for algorithm 3) |
//! | 18 | n | ciphertext |
//! | 18+n | 16 | GCM tag (algorithm 3: the 16-byte SIV comes first, then the ciphertext) |
//!
//! Parsing is total: any malformed input is the one opaque [`CryptoError`].

use super::CryptoError;
use super::aead::{NONCE_LEN, TAG_LEN};
use super::labels::push_length_prefixed;

/// The only format version this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 2 + 4 + NONCE_LEN;
/// The shortest valid ciphertext: a header and a tag around an empty value.
pub const MIN_LEN: usize = HEADER_LEN + TAG_LEN;

/// What a ciphertext holds, and so which key derivation and label opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// A column value sealed with AES-256-GCM under a field key.
    FieldValue = 1,
    /// A 256-bit data key sealed with AES-256-GCM under a data-key wrapping key.
    WrappedDataKey = 2,
    /// A column value sealed deterministically with AES-256-SIV (RFC 5297) under a
    /// deterministic key (`crypto::siv`); the header's nonce field is all zero.
    DeterministicValue = 3,
}

impl Algorithm {
    /// The byte written at offset 1.
    pub fn byte(self) -> u8 {
        self as u8
    }

    fn from_byte(byte: u8) -> Result<Self, CryptoError> {
        match byte {
            1 => Ok(Self::FieldValue),
            2 => Ok(Self::WrappedDataKey),
            3 => Ok(Self::DeterministicValue),
            _ => Err(CryptoError),
        }
    }
}

/// The 18-byte header of a v1 ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the body is.
    pub algorithm: Algorithm,
    /// The tenant key version that sealed it.
    pub key_version: u32,
    /// The GCM nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// The header's exact bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = FORMAT_VERSION;
        out[1] = self.algorithm.byte();
        out[2..6].copy_from_slice(&self.key_version.to_be_bytes());
        out[6..].copy_from_slice(&self.nonce);
        out
    }
}

/// A ciphertext split into its header and its body (ciphertext ‖ tag), borrowing the input.
#[derive(Debug, Clone, Copy)]
pub struct Parsed<'a> {
    /// The decoded header.
    pub header: Header,
    /// The header exactly as it was on the wire (it is authenticated as part of the AAD).
    pub header_bytes: &'a [u8; HEADER_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub body: &'a [u8],
}

/// Splits a v1 ciphertext. Refuses a wrong format version, an unknown algorithm, version 0 and
/// anything shorter than [`MIN_LEN`].
pub fn parse(bytes: &[u8]) -> Result<Parsed<'_>, CryptoError> {
    let (header_bytes, body) = bytes.split_first_chunk::<HEADER_LEN>().ok_or(CryptoError)?;
    if body.len() < TAG_LEN || header_bytes[0] != FORMAT_VERSION {
        return Err(CryptoError);
    }
    let algorithm = Algorithm::from_byte(header_bytes[1])?;
    let mut version = [0u8; 4];
    version.copy_from_slice(&header_bytes[2..6]);
    let key_version = u32::from_be_bytes(version);
    if key_version == 0 {
        return Err(CryptoError);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&header_bytes[6..]);
    // SIV takes no nonce: a deterministic value has exactly one encoding, with a zero field.
    if algorithm == Algorithm::DeterministicValue && nonce != [0u8; NONCE_LEN] {
        return Err(CryptoError);
    }
    Ok(Parsed {
        header: Header {
            algorithm,
            key_version,
            nonce,
        },
        header_bytes,
        body,
    })
}

/// The GCM additional data of a v1 ciphertext:
/// `lp(label) ‖ header ‖ lp(tenant_id) ‖ lp(context) ‖ lp(caller_aad)`, where `lp` is a
/// 4-byte big-endian length followed by the bytes. Every header byte and every binding is
/// authenticated.
pub fn additional_data(
    label: &[u8],
    header: &[u8; HEADER_LEN],
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        label.len() + HEADER_LEN + tenant_id.len() + context.len() + caller_aad.len() + 16,
    );
    push_length_prefixed(&mut aad, label);
    aad.extend_from_slice(header);
    push_length_prefixed(&mut aad, tenant_id.as_bytes());
    push_length_prefixed(&mut aad, context.as_bytes());
    push_length_prefixed(&mut aad, caller_aad);
    aad
}

/// Calls `f` with exactly the bytes of [`additional_data`], built on the stack when they fit
/// (typical tenant ids, contexts and caller AAD do), so the hot path builds the AAD without a
/// heap allocation, and on the heap otherwise.
pub fn with_additional_data<R>(
    label: &[u8],
    header: &[u8; HEADER_LEN],
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let len = label.len() + HEADER_LEN + tenant_id.len() + context.len() + caller_aad.len() + 16;
    // Two stack sizes, so the common case zeroes only a small buffer.
    if len <= 128 {
        aad_on_stack::<128, R>(label, header, tenant_id, context, caller_aad, f)
    } else {
        aad_on_stack::<384, R>(label, header, tenant_id, context, caller_aad, f)
    }
}

fn aad_on_stack<const N: usize, R>(
    label: &[u8],
    header: &[u8; HEADER_LEN],
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let mut stack = [0u8; N];
    let mut written = 0;
    let mut fits = true;
    let mut put = |part: &[u8]| match stack.get_mut(written..written + part.len()) {
        Some(place) => {
            place.copy_from_slice(part);
            written += part.len();
        }
        None => fits = false,
    };
    let prefix = |part: &[u8]| u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes();
    put(&prefix(label));
    put(label);
    put(header);
    put(&prefix(tenant_id.as_bytes()));
    put(tenant_id.as_bytes());
    put(&prefix(context.as_bytes()));
    put(context.as_bytes());
    put(&prefix(caller_aad));
    put(caller_aad);
    match stack.get(..written) {
        Some(aad) if fits => f(aad),
        _ => f(&additional_data(
            label, header, tenant_id, context, caller_aad,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = Header {
            algorithm: Algorithm::FieldValue,
            key_version: 7,
            nonce: [9u8; NONCE_LEN],
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&[0xAAu8; 20]);
        bytes
    }

    #[test]
    fn header_round_trips() {
        let bytes = sample();
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.header.key_version, 7);
        assert_eq!(parsed.header.algorithm, Algorithm::FieldValue);
        assert_eq!(parsed.body.len(), 20);
        assert_eq!(&parsed.header.encode(), parsed.header_bytes);
    }

    #[test]
    fn stack_aad_equals_heap_aad() {
        let header = [3u8; HEADER_LEN];
        for (tenant, context, aad) in [
            ("t", "c", &b""[..]),
            ("acme", "crm.contacts.email", &b"row-7"[..]),
            ("acme", "crm.contacts.email", &[0xabu8; 300][..]),
            ("acme", "crm.contacts.email", &[0xcdu8; 255][..]),
            ("acme", "crm.contacts.email", &[0xefu8; 55][..]),
            ("acme", "crm.contacts.email", &[0xefu8; 56][..]),
            ("acme", "crm.contacts.email", &[0xefu8; 57][..]),
        ] {
            let heap = additional_data(b"label", &header, tenant, context, aad);
            with_additional_data(b"label", &header, tenant, context, aad, |stack| {
                assert_eq!(stack, heap.as_slice(), "{}", aad.len());
            });
        }
    }

    #[test]
    fn rejects_malformed() {
        let bytes = sample();
        for len in 0..MIN_LEN {
            assert!(parse(&bytes[..len]).is_err(), "length {len}");
        }
        let mut bad = bytes.clone();
        bad[0] = 2;
        assert!(parse(&bad).is_err());
        let mut bad = bytes.clone();
        bad[1] = 4;
        assert!(parse(&bad).is_err());
        // Algorithm 3 (deterministic) with a non-zero nonce field is refused.
        let mut bad = bytes.clone();
        bad[1] = 3;
        assert!(parse(&bad).is_err());
        bad[6..HEADER_LEN].fill(0);
        assert!(parse(&bad).is_ok());
        let mut bad = bytes;
        bad[2..6].copy_from_slice(&[0, 0, 0, 0]);
        assert!(parse(&bad).is_err());
    }
}
