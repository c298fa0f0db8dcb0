//! AES-256-GCM (NIST SP 800-38D) through ring, restricted to exactly what tenant-kms uses:
//! 256-bit keys, 96-bit nonces, 128-bit tags. Anything else is refused, not adapted.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::CryptoError;
use super::secret::{KEY_LEN, SecretKey};

/// Nonce length in bytes (96 bits, the only length SP 800-38D recommends for random nonces).
pub const NONCE_LEN: usize = 12;
/// Authentication tag length in bytes (128 bits).
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key with its key schedule prepared, ready to seal and open many values.
///
/// Not `Clone`, not `Debug`. ring keeps the expanded key schedule in its own type, which does
/// not zeroize on drop: see SECURITY.md ("what is not protected").
pub struct AeadKey(LessSafeKey);

impl AeadKey {
    /// Prepares a key from a 256-bit secret.
    pub fn new(key: &SecretKey) -> Result<Self, CryptoError> {
        Self::from_slice(key.expose_secret())
    }

    /// Prepares a key from raw bytes, which must be exactly 32 bytes long.
    pub fn from_slice(key: &[u8]) -> Result<Self, CryptoError> {
        if key.len() != KEY_LEN {
            return Err(CryptoError);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| CryptoError)?;
        Ok(Self(LessSafeKey::new(unbound)))
    }

    /// Encrypts `in_out` in place and appends the 16-byte tag.
    ///
    /// The caller guarantees that `nonce` is never used twice with this key; every production
    /// path passes a fresh [`random_nonce`].
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), in_out)
            .map_err(|_| CryptoError)
    }

    /// Encrypts `in_out` in place and returns the 16-byte tag (so the caller can lay out its
    /// buffer once, without a reallocation for the tag).
    ///
    /// The caller guarantees that `nonce` is never used twice with this key; every production
    /// path passes a fresh [`random_nonce`].
    pub fn seal_in_place_separate_tag(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoError> {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                in_out,
            )
            .map_err(|_| CryptoError)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Authenticates and decrypts `in_out` (ciphertext followed by the tag) in place and
    /// returns the plaintext part. On any failure nothing is returned.
    pub fn open_in_place<'a>(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], CryptoError> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError)?;
        if in_out.len() < TAG_LEN {
            return Err(CryptoError);
        }
        self.0
            .open_in_place(nonce, Aad::from(aad), in_out)
            .map_err(|_| CryptoError)
    }
}

/// Nonces drawn from the CSPRNG at once, per thread.
const POOLED_NONCES: usize = 32;

/// A thread's next nonces: one draw from the CSPRNG for [`POOLED_NONCES`] of them, handed out
/// in order, each once.
struct NoncePool {
    bytes: [u8; NONCE_LEN * POOLED_NONCES],
    next: usize,
}

thread_local! {
    static NONCE_POOL: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool {
            bytes: [0; NONCE_LEN * POOLED_NONCES],
            next: POOLED_NONCES,
        })
    };
}

/// A fresh random 96-bit nonce from the thread-local CSPRNG (rand's ChaCha12 `ThreadRng`,
/// seeded and periodically reseeded from the OS), so a nonce costs no system call.
///
/// The CSPRNG fills a small per-thread pool of nonces at once, and each is handed out exactly
/// once (a nonce is public, so holding the next few in memory reveals nothing a ciphertext
/// does not): one CSPRNG call per 32 nonces instead of one per seal.
///
/// Random nonces are safe for at most 2^32 seals per key (SP 800-38D §8.3); the service counts
/// seals per key version and rotates well before that.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    NONCE_POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next >= POOLED_NONCES {
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut pool.bytes);
            pool.next = 0;
        }
        let start = pool.next * NONCE_LEN;
        pool.next += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&pool.bytes[start..start + NONCE_LEN]);
        nonce
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_not_impl_any!(AeadKey: std::fmt::Debug, Clone);

    #[test]
    fn pooled_nonces_are_distinct_across_refills() {
        let nonces: std::collections::HashSet<_> =
            (0..POOLED_NONCES * 10).map(|_| random_nonce()).collect();
        assert_eq!(nonces.len(), POOLED_NONCES * 10);
        let on_other_thread = std::thread::spawn(random_nonce).join().unwrap();
        assert!(!nonces.contains(&on_other_thread));
    }

    #[test]
    fn round_trip_and_tamper() {
        let key = AeadKey::from_slice(&[1u8; 32]).unwrap();
        let nonce = random_nonce();
        let mut buf = b"hello".to_vec();
        key.seal_in_place(&nonce, b"aad", &mut buf).unwrap();
        assert_eq!(buf.len(), 5 + TAG_LEN);
        let mut copy = buf.clone();
        assert_eq!(
            key.open_in_place(&nonce, b"aad", &mut copy).unwrap(),
            b"hello"
        );
        let mut copy = buf.clone();
        assert!(key.open_in_place(&nonce, b"aae", &mut copy).is_err());
        buf[0] ^= 1;
        assert!(key.open_in_place(&nonce, b"aad", &mut buf).is_err());
    }

    #[test]
    fn refuses_other_key_and_nonce_sizes() {
        assert!(AeadKey::from_slice(&[1u8; 16]).is_err());
        assert!(AeadKey::from_slice(&[1u8; 24]).is_err());
        let key = AeadKey::from_slice(&[1u8; 32]).unwrap();
        let mut buf = vec![0u8; 32];
        assert!(key.open_in_place(&[0u8; 8], b"", &mut buf).is_err());
        assert!(key.open_in_place(&[0u8; 16], b"", &mut buf).is_err());
    }
}
