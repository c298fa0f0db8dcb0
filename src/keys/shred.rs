//! The hook through which the key manager reports crypto-shredding to the shred ledger
//! (`crate::backup::ledger`), which lives with the master keyring so that a restored backup
//! cannot bring destroyed keys back.

use crate::domain::TenantId;
use crate::error::Result;

/// Told of every destruction after the key store committed it. An implementation records it
/// durably before returning; an error means the destruction happened but is not recorded yet
/// (the next start records it from the store).
pub trait ShredRecorder: Send + Sync {
    /// A whole tenant was crypto-shredded.
    fn tenant_destroyed(&self, id: &TenantId) -> Result<()>;
    /// One key version of a tenant was destroyed.
    fn version_destroyed(&self, id: &TenantId, version: u32) -> Result<()>;
}
