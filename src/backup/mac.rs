//! The MAC keys of backup manifests, tenant exports and the shred ledger: HMAC-SHA256
//! (RFC 2104, through ring) under a key derived with HKDF-SHA256 (RFC 5869) from one
//! master-key version, its own label and an optional binding (the tenant id of an export).
//!
//! `info = lp(label) ‖ be32(master_version) ‖ lp(binding)`: a key for one purpose, version
//! or tenant never verifies another's MAC. Whoever can write the files but does not hold the
//! master key cannot produce a valid MAC.

use ring::hmac;

use crate::crypto::CryptoError;
use crate::crypto::kdf;
use crate::crypto::labels::push_length_prefixed;
use crate::crypto::secret::SecretKey;
use crate::error::{Error, Result};
use crate::keys::MasterKeyring;

/// Length of a MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// A derived HMAC-SHA256 key. Not `Debug`, not `Clone`.
pub struct MacKey(hmac::Key);

impl MacKey {
    /// Derives the key for `label`, master version `master_version` and `binding`.
    pub fn derive(
        master: &SecretKey,
        label: &[u8],
        master_version: u32,
        binding: &[u8],
    ) -> Result<Self, CryptoError> {
        let mut info = Vec::with_capacity(label.len() + binding.len() + 12);
        push_length_prefixed(&mut info, label);
        info.extend_from_slice(&master_version.to_be_bytes());
        push_length_prefixed(&mut info, binding);
        let key = kdf::derive_key(master, &info)?;
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret())))
    }

    /// Derives the key from a keyring's version `master_version`; fails with a clear message
    /// when the keyring does not hold it.
    pub fn from_keyring(
        ring: &MasterKeyring,
        label: &[u8],
        master_version: u32,
        binding: &[u8],
    ) -> Result<Self> {
        let master = ring.get(master_version).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the master keyring at hand has no version {master_version}, which this file \
                 is authenticated with: wrong keyring, or that version was removed"
            ))
        })?;
        Self::derive(master, label, master_version, binding)
            .map_err(|_| Error::internal("MAC key derivation failed"))
    }

    /// The MAC of `lp(label) ‖ message`.
    pub fn sign(&self, label: &[u8], message: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.0);
        let mut prefix = Vec::with_capacity(label.len() + 4);
        push_length_prefixed(&mut prefix, label);
        ctx.update(&prefix);
        ctx.update(message);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(ctx.sign().as_ref());
        mac
    }

    /// Whether `hex_mac` is exactly (lower-case hex, compared in constant time) the MAC of
    /// `lp(label) ‖ message`. Upper-case or padded hex is refused: a file altered by any
    /// byte never verifies.
    pub fn verify_hex(&self, label: &[u8], message: &[u8], hex_mac: &str) -> bool {
        let expected = hex::encode(self.sign(label, message));
        crate::crypto::envelope::constant_time_eq(expected.as_bytes(), hex_mac.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_version_and_label_separate_keys() {
        let master = SecretKey::from_slice(&[9; 32]).unwrap();
        let a = MacKey::derive(&master, b"l1", 1, b"a").unwrap();
        let mac = hex::encode(a.sign(b"l1", b"msg"));
        assert!(a.verify_hex(b"l1", b"msg", &mac));
        assert!(!a.verify_hex(b"l1", b"msh", &mac));
        assert!(!a.verify_hex(b"l1", b"msg", &mac.to_uppercase()));
        for other in [
            MacKey::derive(&master, b"l1", 1, b"b").unwrap(),
            MacKey::derive(&master, b"l1", 2, b"a").unwrap(),
            MacKey::derive(&master, b"l2", 1, b"a").unwrap(),
        ] {
            assert!(!other.verify_hex(b"l1", b"msg", &mac));
        }
    }
}
