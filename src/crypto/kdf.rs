//! HKDF-SHA256 key derivation (RFC 5869), through the `hkdf` crate.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::CryptoError;
use super::secret::{KEY_LEN, SecretKey};

/// The longest output HKDF-SHA256 can produce (RFC 5869 §2.3: 255 × HashLen).
pub const MAX_OUTPUT_LEN: usize = 255 * 32;

/// HKDF-SHA256 extract-then-expand (RFC 5869 §2.2–2.3) into `out`.
///
/// An output longer than [`MAX_OUTPUT_LEN`] is an error, never a truncated key.
pub fn hkdf_sha256(
    salt: Option<&[u8]>,
    ikm: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, out)
        .map_err(|_| CryptoError)
}

/// Derives a 256-bit key from a 256-bit secret with HKDF-SHA256, no salt (the input is already
/// uniformly random, RFC 5869 §3.1) and the given `info`.
pub fn derive_key(ikm: &SecretKey, info: &[u8]) -> Result<SecretKey, CryptoError> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    hkdf_sha256(None, ikm.expose_secret(), info, out.as_mut())?;
    Ok(SecretKey::from_zeroizing(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5869_a1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let mut okm = [0u8; 42];
        hkdf_sha256(Some(&salt), &ikm, &info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn over_long_output_is_an_error() {
        let mut okm = vec![0u8; MAX_OUTPUT_LEN + 1];
        assert!(hkdf_sha256(None, b"k", b"", &mut okm).is_err());
        let mut okm = vec![0u8; MAX_OUTPUT_LEN];
        assert!(hkdf_sha256(None, b"k", b"", &mut okm).is_ok());
    }
}
