//! Types of the key-store calls that serve backup, per-tenant import and the shred ledger
//! (`crate::backup`): what to crypto-shred again, the ledger head the store last saw, and a
//! store's size.

use crate::domain::TenantId;

/// Something the shred ledger says was destroyed: a whole tenant, or one key version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShredItem {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The key version; `None` for the whole tenant.
    pub version: Option<u32>,
}

/// The shred ledger's head as the store last saw it: its number of entries and the MAC of
/// the last one. A ledger with fewer entries, or another MAC at that position, was truncated
/// or replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerHead {
    /// Entries in the ledger (the genesis entry included).
    pub entries: u64,
    /// The MAC of entry `entries - 1`.
    pub head_mac: Vec<u8>,
}

/// How much a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreCounts {
    /// Tenant rows (destroyed tombstones included).
    pub tenants: u64,
    /// Wrapped tenant keys (versions not destroyed).
    pub wrapped_keys: u64,
}

/// A change of the key store that the audit log must show (see docs/AUDIT.md,
/// "Reconciliation at start"): a tenant's creation or a new key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The key version created; 1 with the tenant.
    pub version: u32,
    /// When the store recorded it (Unix seconds, the store's clock).
    pub at_secs: i64,
}
