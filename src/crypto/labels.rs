//! Domain-separation labels. Every HKDF `info` and every AEAD AAD starts with one of these, and
//! no two uses share one. They are part of the wire contract (docs/FORMAT.md): changing one
//! makes every existing ciphertext unreadable, so a new meaning gets a new label, never an edit.

/// HKDF info and AAD label for column values (algorithm 1).
pub const FIELD: &[u8] = b"tenant-kms/v1/field";
/// HKDF info and AAD label for wrapped data keys (algorithm 2).
pub const DATA_KEY: &[u8] = b"tenant-kms/v1/data-key";
/// AAD label for a tenant key wrapped under a master key.
pub const TENANT_KEY_WRAP: &[u8] = b"tenant-kms/v1/tenant-key-wrap";
/// HKDF info label for the key check value of a master-key version.
pub const KEY_CHECK: &[u8] = b"tenant-kms/v1/key-check";
/// AAD label for the audit secret wrapped under a master key.
pub const AUDIT_KEY_WRAP: &[u8] = b"tenant-kms/v1/audit-key-wrap";
/// HKDF info label for the audit chain's HMAC key (derived from the audit secret).
pub const AUDIT_CHAIN: &[u8] = b"tenant-kms/v1/audit-chain";
/// HKDF info label for the key that fingerprints caller AAD in audit records.
pub const AAD_FINGERPRINT: &[u8] = b"tenant-kms/v1/aad-fingerprint";

/// HKDF info label for the key that MACs a backup manifest (derived from a master version).
pub const BACKUP_MANIFEST: &[u8] = b"tenant-kms/v1/backup-manifest";
/// HKDF info label for the key that MACs a per-tenant export (derived from a master version
/// and bound to the tenant id).
pub const TENANT_EXPORT: &[u8] = b"tenant-kms/v1/tenant-export";
/// HKDF info label for the key that MACs the shred ledger's entries (derived from a master
/// version).
pub const SHRED_LEDGER: &[u8] = b"tenant-kms/v1/shred-ledger";

/// HKDF info label for the key that encrypts a sealed keyring's body (derived from its file
/// key).
pub const SEALED_KEYRING_BODY: &[u8] = b"tenant-kms/v1/sealed-keyring-body";
/// HKDF info label for a sealed keyring's check value (derived from its file key).
pub const SEALED_KEYRING_CHECK: &[u8] = b"tenant-kms/v1/sealed-keyring-check";

/// HKDF info label for the key that MACs security-relevant key-store rows (tokens, tenants,
/// key versions) and the store's row anchor (derived from the audit secret, which is wrapped
/// under the master key); also the first part of every row MAC's input (`store::row_auth`).
pub const ROW_MAC: &[u8] = b"tenant-kms/v1/row-mac";
/// HKDF info label for a blind index key (docs/FORMAT.md "Blind indexes").
pub const BLIND_INDEX: &[u8] = b"tenant-kms/v1/blind-index";
/// HKDF info and AAD label for deterministic values (algorithm 3, AES-256-SIV).
pub const DETERMINISTIC: &[u8] = b"tenant-kms/v1/deterministic";

/// Every label, for the test that proves them distinct and for docs.
pub const ALL: &[&[u8]] = &[
    FIELD,
    DATA_KEY,
    TENANT_KEY_WRAP,
    KEY_CHECK,
    AUDIT_KEY_WRAP,
    AUDIT_CHAIN,
    AAD_FINGERPRINT,
    BACKUP_MANIFEST,
    TENANT_EXPORT,
    SHRED_LEDGER,
    SEALED_KEYRING_BODY,
    SEALED_KEYRING_CHECK,
    ROW_MAC,
    BLIND_INDEX,
    DETERMINISTIC,
];

/// Appends `part` to `out` prefixed by its length as a 4-byte big-endian integer, so that no
/// two different sequences of parts encode to the same bytes.
pub fn push_length_prefixed(out: &mut Vec<u8>, part: &[u8]) {
    // Parts are bounded far below 4 GiB by the service's input limits; saturate defensively so
    // an impossible length can never wrap to a small one.
    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_versioned() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(a.starts_with(b"tenant-kms/v1/"));
            for b in &ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn length_prefix_separates_parts() {
        let mut ab_c = Vec::new();
        push_length_prefixed(&mut ab_c, b"ab");
        push_length_prefixed(&mut ab_c, b"c");
        let mut a_bc = Vec::new();
        push_length_prefixed(&mut a_bc, b"a");
        push_length_prefixed(&mut a_bc, b"bc");
        assert_ne!(ab_c, a_bc);
        assert_eq!(&ab_c[..6], &[0, 0, 0, 2, b'a', b'b']);
    }
}
