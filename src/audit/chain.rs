//! The keys of the audit chain and the MAC of one record.
//!
//! Both keys derive (HKDF-SHA256, RFC 5869) from the audit secret, which is random and stored
//! wrapped under the master key: someone who can write `audit.db` but does not hold the master
//! key cannot compute a valid MAC, so cannot forge, edit or re-link records.

use ring::hmac;

use super::record::AuditRecord;
use crate::crypto::kdf;
use crate::crypto::labels;
use crate::crypto::secret::SecretKey;

/// Length of a chain MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// The `prev_mac` of the first record.
pub const GENESIS_MAC: [u8; MAC_LEN] = [0u8; MAC_LEN];

/// The chain MAC key and the AAD fingerprint key. Not `Debug`, not `Clone`.
pub struct ChainKeys {
    chain: hmac::Key,
    fingerprint: hmac::Key,
}

impl ChainKeys {
    /// Derives both keys from the audit secret.
    pub fn derive(audit_secret: &SecretKey) -> Result<Self, crate::crypto::CryptoError> {
        let chain = kdf::derive_key(audit_secret, labels::AUDIT_CHAIN)?;
        let fingerprint = kdf::derive_key(audit_secret, labels::AAD_FINGERPRINT)?;
        Ok(Self {
            chain: hmac::Key::new(hmac::HMAC_SHA256, chain.expose_secret()),
            fingerprint: hmac::Key::new(hmac::HMAC_SHA256, fingerprint.expose_secret()),
        })
    }

    /// HMAC-SHA256 (RFC 2104) of the record's canonical encoding at `seq` after `prev_mac`.
    pub fn record_mac(&self, record: &AuditRecord, seq: u64, prev_mac: &[u8]) -> [u8; MAC_LEN] {
        self.record_mac_in(record, seq, prev_mac, &mut Vec::with_capacity(256))
    }

    /// [`ChainKeys::record_mac`], encoding the record in `buffer` (its content is replaced):
    /// a batch reuses one buffer for all its records.
    pub fn record_mac_in(
        &self,
        record: &AuditRecord,
        seq: u64,
        prev_mac: &[u8],
        buffer: &mut Vec<u8>,
    ) -> [u8; MAC_LEN] {
        record.canonical_bytes_into(seq, prev_mac, buffer);
        self.sign(buffer)
    }

    /// MAC over arbitrary labelled bytes with the chain key (prune checkpoints).
    pub fn sign(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        let tag = hmac::sign(&self.chain, bytes);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(tag.as_ref());
        mac
    }

    /// The keyed fingerprint of caller AAD: the first 16 bytes of HMAC-SHA256, hex. Lets an
    /// auditor match records by AAD without the log revealing it or allowing a dictionary
    /// attack without the key.
    pub fn aad_fingerprint(&self, aad: &[u8]) -> String {
        if aad.is_empty() {
            return String::new();
        }
        crate::domain::hex::lower_hex(&hmac::sign(&self.fingerprint, aad).as_ref()[..16])
    }
}
