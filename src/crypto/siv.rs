//! Deterministic encryption (DESIGN §9, docs/FORMAT.md "Algorithm 3"): AES-256-SIV
//! (RFC 5297, AES-CMAC S2V and AES-CTR, a 512-bit key) through RustCrypto's `aes-siv`, never
//! hand-rolled.
//!
//! A deterministic value is a v1 ciphertext with algorithm byte 3: the 18-byte header (its
//! nonce field is twelve zero bytes: SIV needs no nonce), then the synthetic IV `V` (16 bytes,
//! which is also the tag) and the ciphertext, exactly RFC 5297's output `V ‖ C`. The one
//! associated-data component is the same AAD as the other algorithms' (`format::additional_data`
//! with the label `tenant-kms/v1/deterministic`), so the header, tenant, context and caller AAD
//! are all bound. The key is
//! `HKDF-SHA256(TK_v, lp("tenant-kms/v1/deterministic") ‖ lp(tenant) ‖ lp(context))`, 64 bytes.

use aes_siv::KeyInit;
use aes_siv::siv::{Aes128Siv, Aes256Siv};
use zeroize::Zeroizing;

use super::CryptoError;
use super::aead::NONCE_LEN;
use super::format::{self, Algorithm, Header};
use super::kdf;
use super::labels::{self, push_length_prefixed};
use super::secret::{SecretBytes, SecretKey};

/// AES-256-SIV key length: two AES-256 keys (RFC 5297 §2.2: K1 for S2V, then K2 for CTR).
pub const SIV_KEY_LEN: usize = 64;
/// The synthetic IV's length, which is also its tag's (RFC 5297 §2.6).
pub const SIV_LEN: usize = 16;
/// The header's nonce field of a deterministic value: all zero, since SIV takes no nonce.
pub const ZERO_NONCE: [u8; NONCE_LEN] = [0; NONCE_LEN];

/// An AES-SIV key. Not `Clone`, not `Debug`; zeroized on drop.
///
/// Production keys are always AES-256-SIV (64 bytes, [`SivKey::derive`]); a 32-byte
/// AES-128-SIV key is accepted by [`SivKey::from_slice`] only so that RFC 5297's own
/// Appendix A vectors (which are AES-128-SIV) run through this same wrapper.
pub struct SivKey(Zeroizing<Vec<u8>>);

impl SivKey {
    /// A key from exactly 64 bytes (AES-256-SIV) or 32 bytes (AES-128-SIV, vectors only).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != SIV_KEY_LEN && bytes.len() != SIV_KEY_LEN / 2 {
            return Err(CryptoError);
        }
        Ok(Self(Zeroizing::new(bytes.to_vec())))
    }

    /// Derives the deterministic-encryption key of (tenant key version, tenant, context):
    /// 64 bytes of HKDF-SHA256 (RFC 5869) output.
    pub fn derive(
        tenant_key: &SecretKey,
        tenant_id: &str,
        context: &str,
    ) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new(vec![0u8; SIV_KEY_LEN]);
        kdf::hkdf_sha256(
            None,
            tenant_key.expose_secret(),
            &deterministic_key_info(tenant_id, context),
            key.as_mut_slice(),
        )?;
        Ok(Self(key))
    }

    /// RFC 5297 §2.6 SIV-Encrypt: `V ‖ C` for the associated-data components `headers`.
    pub fn encrypt(&self, headers: &[&[u8]], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        // Each cipher holds a copy of the key halves and zeroizes its CTR key on drop; it is
        // built per call because `aes-siv` needs `&mut` to run S2V.
        let key = self.0.as_slice();
        let sealed = if key.len() == SIV_KEY_LEN {
            Aes256Siv::new_from_slice(key)
                .map_err(|_| CryptoError)?
                .encrypt(headers, plaintext)
        } else {
            Aes128Siv::new_from_slice(key)
                .map_err(|_| CryptoError)?
                .encrypt(headers, plaintext)
        };
        sealed.map_err(|_| CryptoError)
    }

    /// RFC 5297 §2.7 SIV-Decrypt of `V ‖ C`: the plaintext, or the one opaque error.
    pub fn decrypt(&self, headers: &[&[u8]], sealed: &[u8]) -> Result<SecretBytes, CryptoError> {
        if sealed.len() < SIV_LEN {
            return Err(CryptoError);
        }
        // Decrypted in a zeroizing buffer, so a failure leaves nothing behind either.
        let mut buf = Zeroizing::new(sealed.to_vec());
        let key = self.0.as_slice();
        let opened = if key.len() == SIV_KEY_LEN {
            Aes256Siv::new_from_slice(key)
                .map_err(|_| CryptoError)?
                .decrypt_in_place(headers, &mut *buf)
        } else {
            Aes128Siv::new_from_slice(key)
                .map_err(|_| CryptoError)?
                .decrypt_in_place(headers, &mut *buf)
        };
        opened.map_err(|_| CryptoError)?;
        // Moves the allocation (no copy) into the secret type.
        Ok(SecretBytes::new(std::mem::take(&mut *buf)))
    }
}

/// The HKDF info of a deterministic key: `lp(DETERMINISTIC) ‖ lp(tenant_id) ‖ lp(context)`.
pub fn deterministic_key_info(tenant_id: &str, context: &str) -> Vec<u8> {
    let mut info =
        Vec::with_capacity(labels::DETERMINISTIC.len() + tenant_id.len() + context.len() + 12);
    push_length_prefixed(&mut info, labels::DETERMINISTIC);
    push_length_prefixed(&mut info, tenant_id.as_bytes());
    push_length_prefixed(&mut info, context.as_bytes());
    info
}

/// Seals `plaintext` deterministically into a v1 ciphertext (algorithm 3): the same key,
/// version, tenant, context, caller AAD and plaintext always give the same bytes.
pub fn seal_deterministic(
    key: &SivKey,
    key_version: u32,
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if key_version == 0 {
        return Err(CryptoError);
    }
    let header = Header {
        algorithm: Algorithm::DeterministicValue,
        key_version,
        nonce: ZERO_NONCE,
    }
    .encode();
    let sealed = format::with_additional_data(
        labels::DETERMINISTIC,
        &header,
        tenant_id,
        context,
        caller_aad,
        |aad| key.encrypt(&[aad], plaintext),
    )?;
    let mut out = Vec::with_capacity(header.len() + sealed.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a parsed deterministic value; fails, with the one opaque error, unless its algorithm
/// is 3 and the header, tenant, context and caller AAD are those it was sealed with.
pub fn open_deterministic(
    key: &SivKey,
    parsed: &format::Parsed<'_>,
    tenant_id: &str,
    context: &str,
    caller_aad: &[u8],
) -> Result<SecretBytes, CryptoError> {
    if parsed.header.algorithm != Algorithm::DeterministicValue {
        return Err(CryptoError);
    }
    format::with_additional_data(
        labels::DETERMINISTIC,
        parsed.header_bytes,
        tenant_id,
        context,
        caller_aad,
        |aad| key.decrypt(&[aad], parsed.body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_not_impl_any!(SivKey: std::fmt::Debug, Clone);

    fn tk(byte: u8) -> SecretKey {
        SecretKey::from_slice(&[byte; 32]).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap()
    }

    /// RFC 5297 Appendix A.1 (deterministic authenticated encryption) and A.2 (nonce-based,
    /// several associated-data components), through this module's wrapper.
    #[test]
    fn rfc5297_appendix_a() {
        let key = SivKey::from_slice(&unhex(
            "fffefdfc fbfaf9f8 f7f6f5f4 f3f2f1f0 f0f1f2f3 f4f5f6f7 f8f9fafb fcfdfeff",
        ))
        .unwrap();
        let ad = unhex("10111213 14151617 18191a1b 1c1d1e1f 20212223 24252627");
        let pt = unhex("11223344 55667788 99aabbcc ddee");
        let out = key.encrypt(&[&ad], &pt).unwrap();
        assert_eq!(
            out,
            unhex("85632d07 c6e8f37f 950acd32 0a2ecc93 40c02b96 90c4dc04 daef7f6a fe5c")
        );
        assert_eq!(key.decrypt(&[&ad], &out).unwrap().expose_secret(), pt);

        let key = SivKey::from_slice(&unhex(
            "7f7e7d7c 7b7a7978 77767574 73727170 40414243 44454647 48494a4b 4c4d4e4f",
        ))
        .unwrap();
        let ad1 = unhex(
            "00112233 44556677 8899aabb ccddeeff deaddada deaddada ffeeddcc bbaa9988 \
             77665544 33221100",
        );
        let ad2 = unhex("10203040 50607080 90a0");
        let nonce = unhex("09f91102 9d74e35b d84156c5 635688c0");
        let pt = unhex(
            "74686973 20697320 736f6d65 20706c61 696e7465 78742074 6f20656e 63727970 \
             74207573 696e6720 5349562d 414553",
        );
        let out = key.encrypt(&[&ad1, &ad2, &nonce], &pt).unwrap();
        assert_eq!(
            out,
            unhex(
                "7bdb6e3b 432667eb 06f4d14b ff2fbd0f cb900f2f ddbe4043 26601965 c889bf17 \
                 dba77ceb 094fa663 b7a3f748 ba8af829 ea64ad54 4a272e9c 485b62a3 fd5c0d"
            )
        );
        assert_eq!(
            key.decrypt(&[&ad1, &ad2, &nonce], &out)
                .unwrap()
                .expose_secret(),
            pt
        );
        assert!(key.decrypt(&[&ad1, &nonce], &out).is_err());
        assert!(SivKey::from_slice(&[0u8; 48]).is_err());
    }

    #[test]
    fn same_inputs_same_bytes_other_inputs_unrelated() {
        let key = SivKey::derive(&tk(1), "acme", "crm.email").unwrap();
        let a = seal_deterministic(&key, 1, "acme", "crm.email", b"", b"a@b.c").unwrap();
        let b = seal_deterministic(&key, 1, "acme", "crm.email", b"", b"a@b.c").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), format::HEADER_LEN + SIV_LEN + 5);
        assert_ne!(
            a,
            seal_deterministic(&key, 1, "acme", "crm.email", b"r", b"a@b.c").unwrap()
        );
        assert_ne!(
            a,
            seal_deterministic(&key, 2, "acme", "crm.email", b"", b"a@b.c").unwrap()
        );
        let parsed = format::parse(&a).unwrap();
        assert_eq!(parsed.header.algorithm, Algorithm::DeterministicValue);
        let pt = open_deterministic(&key, &parsed, "acme", "crm.email", b"").unwrap();
        assert_eq!(pt.expose_secret(), b"a@b.c");
        assert!(open_deterministic(&key, &parsed, "acme", "crm.email", b"x").is_err());
        assert!(open_deterministic(&key, &parsed, "acmf", "crm.email", b"").is_err());
        let other = SivKey::derive(&tk(1), "acme", "crm.name").unwrap();
        assert!(open_deterministic(&other, &parsed, "acme", "crm.email", b"").is_err());
    }

    #[test]
    fn empty_plaintext_and_every_bit_flip() {
        let key = SivKey::derive(&tk(2), "t", "c").unwrap();
        let empty = seal_deterministic(&key, 1, "t", "c", b"", b"").unwrap();
        let parsed = format::parse(&empty).unwrap();
        assert!(
            open_deterministic(&key, &parsed, "t", "c", b"")
                .unwrap()
                .expose_secret()
                .is_empty()
        );
        let ct = seal_deterministic(&key, 1, "t", "c", b"", b"value").unwrap();
        for bit in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let result =
                format::parse(&bad).and_then(|p| open_deterministic(&key, &p, "t", "c", b""));
            assert!(result.is_err(), "bit {bit}");
        }
    }
}
