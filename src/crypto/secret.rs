//! Secret key material. Every secret is a newtype over a zeroizing buffer with no `Debug`,
//! `Display`, `Clone`, `PartialEq` or `Hash`; reading the bytes is an explicit call.

use zeroize::Zeroizing;

use super::CryptoError;

/// Length in bytes of every symmetric key tenant-kms uses (AES-256, HMAC-SHA256 keys).
pub const KEY_LEN: usize = 32;

/// A 256-bit secret key: a master key, a tenant key, a derived key or a data key.
///
/// Guarantees: the bytes are overwritten with zeros when the value is dropped; the type cannot
/// be printed, cloned or compared, so it can reach neither a log nor a timing side channel by
/// accident.
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Generates a key from the operating system's CSPRNG (getrandom).
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), key.as_mut())
            .map_err(|_| CryptoError)?;
        Ok(Self(key))
    }

    /// Copies a key out of a slice, which must be exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(CryptoError);
        }
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    /// Takes ownership of a zeroizing array.
    pub fn from_zeroizing(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self(bytes)
    }

    /// The key bytes. Callers must not copy them into anything that is not zeroized.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// Variable-length secret bytes (a decrypted value, a returned data key): zeroized on drop,
/// never printed.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps bytes that are already secret.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, mutably (to decrypt in place without an unprotected copy).
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Shortens the value to `len` bytes (no effect if it is already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.0.truncate(len);
    }

    /// Hands the bytes to a consumer that takes a plain `Vec` (a protobuf response field). The
    /// caller accepts that the consumer will not zeroize them.
    pub fn into_unprotected_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_not_impl_any!(SecretKey: std::fmt::Debug, std::fmt::Display, Clone, PartialEq, std::hash::Hash);
    static_assertions::assert_not_impl_any!(SecretBytes: std::fmt::Debug, std::fmt::Display, Clone, PartialEq, std::hash::Hash);

    #[test]
    fn from_slice_accepts_only_256_bit_keys() {
        assert!(SecretKey::from_slice(&[7u8; 32]).is_ok());
        assert!(SecretKey::from_slice(&[7u8; 31]).is_err());
        assert!(SecretKey::from_slice(&[7u8; 33]).is_err());
    }

    #[test]
    fn generated_keys_differ() {
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
