//! Wrapping and unwrapping tenant keys and the audit secret under master-key versions: the
//! one implementation. The key manager serves requests with it; backup verification and
//! per-tenant import, which hold a keyring but no manager, use the same functions.

use std::collections::BTreeMap;

use super::master::MasterKeyring;
use crate::crypto::aead::AeadKey;
use crate::crypto::envelope;
use crate::crypto::labels;
use crate::crypto::secret::SecretKey;
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::store::WrappedTenantKey;

/// Why a wrapped key did not unwrap. The caller words it for its own context (a request, a
/// backup check, an import); neither case says anything about the key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnwrapFailure {
    /// The keyring at hand holds no such master version.
    MasterVersionMissing(u32),
    /// The wrapping did not open under that version (wrong keyring, or the bytes, tenant or
    /// version do not match: one case, as for every AEAD failure).
    DoesNotOpen,
}

/// The tenant-key wrapping keys of every version of a keyring, derived once (HKDF-SHA256
/// under the `tenant-key-wrap` label, bound to the master version). Not `Clone`: it holds
/// key material.
pub struct TenantKeyWrapping {
    keys: BTreeMap<u32, AeadKey>,
    primary: u32,
}

impl TenantKeyWrapping {
    /// Derives the wrapping key of every version in `ring`.
    pub fn new(ring: &MasterKeyring) -> Result<Self> {
        let mut keys = BTreeMap::new();
        for version in ring.versions() {
            let master = ring
                .get(version)
                .ok_or_else(|| Error::internal("keyring version vanished"))?;
            let key = envelope::master_wrapping_key(master, labels::TENANT_KEY_WRAP, version)
                .map_err(|_| Error::internal("master wrapping key derivation failed"))?;
            keys.insert(version, key);
        }
        Ok(Self {
            keys,
            primary: ring.primary_version(),
        })
    }

    /// Opens `wrapped`, the key of `version` of tenant `id`.
    pub fn unwrap(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &WrappedTenantKey,
    ) -> std::result::Result<SecretKey, UnwrapFailure> {
        let m = wrapped.master_version;
        let key = self
            .keys
            .get(&m)
            .ok_or(UnwrapFailure::MasterVersionMissing(m))?;
        envelope::unwrap_tenant_key(key, m, id.as_str(), version, &wrapped.bytes)
            .map_err(|_| UnwrapFailure::DoesNotOpen)
    }

    /// Wraps the key of `version` of tenant `id` under the primary master version.
    pub fn wrap(&self, id: &TenantId, version: u32, key: &SecretKey) -> Result<WrappedTenantKey> {
        self.wrap_under(self.primary, id, version, key)
    }

    /// Wraps the key of `version` of tenant `id` under `master_version` (a re-wrap keeps
    /// the target it started with even if the keyring is reloaded meanwhile).
    pub fn wrap_under(
        &self,
        master_version: u32,
        id: &TenantId,
        version: u32,
        key: &SecretKey,
    ) -> Result<WrappedTenantKey> {
        let wrapping = self
            .keys
            .get(&master_version)
            .ok_or_else(|| Error::internal("master key version missing"))?;
        let bytes = envelope::wrap_tenant_key(wrapping, master_version, id.as_str(), version, key)
            .map_err(|_| Error::internal("tenant key wrap failed"))?;
        Ok(WrappedTenantKey {
            master_version,
            bytes,
        })
    }
}

/// Opens the wrapped audit secret with `ring`.
pub fn unwrap_audit_secret(
    ring: &MasterKeyring,
    wrapped: &WrappedTenantKey,
) -> std::result::Result<SecretKey, UnwrapFailure> {
    let m = wrapped.master_version;
    let master = ring.get(m).ok_or(UnwrapFailure::MasterVersionMissing(m))?;
    envelope::master_wrapping_key(master, labels::AUDIT_KEY_WRAP, m)
        .and_then(|key| envelope::unwrap_audit_key(&key, m, &wrapped.bytes))
        .map_err(|_| UnwrapFailure::DoesNotOpen)
}

/// Wraps the audit secret under the primary version of `ring`.
pub fn wrap_audit_secret(ring: &MasterKeyring, secret: &SecretKey) -> Result<WrappedTenantKey> {
    let master_version = ring.primary_version();
    let master = ring
        .get(master_version)
        .ok_or_else(|| Error::internal("primary master key missing"))?;
    let wrapping = envelope::master_wrapping_key(master, labels::AUDIT_KEY_WRAP, master_version)
        .map_err(|_| Error::internal("derivation failed"))?;
    let bytes = envelope::wrap_audit_key(&wrapping, master_version, secret)
        .map_err(|_| Error::internal("audit key wrap failed"))?;
    Ok(WrappedTenantKey {
        master_version,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(dir: &tempfile::TempDir) -> MasterKeyring {
        let path = dir.path().join("master.keyring");
        let source = super::super::MasterKeySource::File(path.clone());
        MasterKeyring::load(&source, true).unwrap();
        MasterKeyring::add_version_to_file(&path).unwrap();
        MasterKeyring::load(&source, false).unwrap()
    }

    #[test]
    fn wraps_under_the_primary_and_unwraps_bound_to_tenant_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let ring = ring(&dir);
        let wrapping = TenantKeyWrapping::new(&ring).unwrap();
        let id = TenantId::parse("acme").unwrap();
        let key = SecretKey::generate().unwrap();
        let wrapped = wrapping.wrap(&id, 3, &key).unwrap();
        assert_eq!(wrapped.master_version, 2);
        let back = wrapping.unwrap(&id, 3, &wrapped).unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
        let other = TenantId::parse("other").unwrap();
        assert_eq!(
            wrapping.unwrap(&other, 3, &wrapped).err(),
            Some(UnwrapFailure::DoesNotOpen)
        );
        assert_eq!(
            wrapping.unwrap(&id, 4, &wrapped).err(),
            Some(UnwrapFailure::DoesNotOpen)
        );
        let unknown = WrappedTenantKey {
            master_version: 9,
            bytes: wrapped.bytes.clone(),
        };
        assert_eq!(
            wrapping.unwrap(&id, 3, &unknown).err(),
            Some(UnwrapFailure::MasterVersionMissing(9))
        );
    }

    #[test]
    fn the_audit_secret_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ring = ring(&dir);
        let secret = SecretKey::generate().unwrap();
        let wrapped = wrap_audit_secret(&ring, &secret).unwrap();
        let back = unwrap_audit_secret(&ring, &wrapped).unwrap();
        assert_eq!(back.expose_secret(), secret.expose_secret());
        let mut bad = wrapped.clone();
        bad.master_version = 1;
        assert_eq!(
            unwrap_audit_secret(&ring, &bad).err(),
            Some(UnwrapFailure::DoesNotOpen)
        );
    }
}
