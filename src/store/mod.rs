//! The key store: master-key check values, tenants, wrapped tenant-key versions and caller
//! tokens, behind the [`KeyStore`] trait so that a PostgreSQL backend can replace SQLite for
//! multi-node deployments. Nothing outside this module knows the backend is SQLite.
//!
//! Every method is one transaction; state changes are conditional on the state they start
//! from, so two processes (a server and the `rotate` command) can share one data directory.

mod migrations;
pub mod recovery;
pub mod sqlite;

use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::Result;

pub use recovery::{LedgerHead, ShredItem, StoreCounts};
pub use sqlite::SqliteKeyStore;

/// A master-key version as the store knows it: its check value, never the key.
#[derive(Debug, Clone)]
pub struct MasterVersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// `envelope::key_check_value` of the key.
    pub check_value: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Set once no tenant key is wrapped under this version any more.
    pub retired_at: Option<i64>,
}

/// A tenant's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// The id.
    pub tenant_id: TenantId,
    /// Lifecycle state.
    pub state: TenantState,
    /// The version that encrypts.
    pub primary_version: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// Rotate when the primary is older than this many seconds; 0 = never by age.
    pub rotation_period_seconds: u64,
    /// Rotate before the primary has sealed this many values.
    pub max_encryptions: u64,
    /// When a pending deletion becomes destruction (unix seconds).
    pub deletion_time: Option<i64>,
    /// When the tenant was destroyed (unix seconds).
    pub destroyed_at: Option<i64>,
}

/// A tenant key version's metadata and, while it exists, its wrapped key.
#[derive(Clone)]
pub struct KeyVersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Enabled, disabled or destroyed.
    pub state: KeyVersionState,
    /// Unix seconds.
    pub created_at: i64,
    /// Encryptions reserved under this version (never decreases).
    pub encryptions: u64,
    /// The wrapped key and the master version wrapping it; `None` once destroyed.
    pub wrapped: Option<WrappedTenantKey>,
}

/// A tenant key sealed under a master-key version: public bytes, useless without that master
/// key (see `crypto::envelope::wrap_tenant_key`).
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedTenantKey {
    /// The master-key version that wraps it.
    pub master_version: u32,
    /// nonce ‖ sealed key ‖ tag.
    pub bytes: Vec<u8>,
}

/// One tenant key to move from one master version to another.
pub struct Rewrapping {
    /// Whose key.
    pub tenant_id: TenantId,
    /// Which version.
    pub version: u32,
    /// The master version it must still be under (so a concurrent change is not overwritten).
    pub from_master: u32,
    /// The new wrapping.
    pub wrapped: WrappedTenantKey,
}

/// A caller's token as stored: its SHA-256 hash, never the token.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    /// Public id (shown by `token list`, used by `token revoke`).
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// SHA-256 of the token secret.
    pub hash: [u8; 32],
    /// `admin`, `service` or `auditor`.
    pub role: String,
    /// `*` for every tenant, or a comma-separated list.
    pub tenants: String,
    /// `*` for every operation of the role, or a comma-separated list.
    pub operations: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    /// Unix seconds; set by `token revoke`.
    pub revoked_at: Option<i64>,
}

/// What a tenant key version's state change must start from.
pub type FromStates<'a> = &'a [KeyVersionState];

/// Storage of keys and callers. Implementations are shared by many threads; each method is
/// atomic and durable when it returns.
pub trait KeyStore: Send + Sync {
    /// All master-key versions the store has seen.
    fn master_versions(&self) -> Result<Vec<MasterVersionRecord>>;
    /// Records a new master-key version.
    fn insert_master_version(&self, record: &MasterVersionRecord) -> Result<()>;
    /// Marks a master version retired, in one transaction and only if no wrapped key (tenant
    /// key or audit secret) is under it any more. Returns whether it is retired now.
    fn retire_master_version(&self, version: u32, at: i64) -> Result<bool>;
    /// How many wrapped keys (tenant keys and the audit secret) are under a master version.
    fn count_wrapped_under(&self, master_version: u32) -> Result<u64>;
    /// Up to `limit` tenant keys still wrapped under `master_version`.
    fn wrapped_under(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(TenantId, u32, WrappedTenantKey)>>;
    /// Replaces wrappings in one transaction, each only if still under its `from_master`.
    /// Returns how many were replaced.
    fn rewrap(&self, batch: &[Rewrapping]) -> Result<usize>;

    /// The wrapped audit secret, if created.
    fn audit_key(&self) -> Result<Option<WrappedTenantKey>>;
    /// Stores the wrapped audit secret: inserts it if there is none, or replaces it if it is
    /// still under `replace_master`. Returns false when another process got there first.
    fn put_audit_key(
        &self,
        wrapped: &WrappedTenantKey,
        replace_master: Option<u32>,
    ) -> Result<bool>;

    /// Creates a tenant with its first key version. `AlreadyExists` if the id is in use,
    /// FAILED_PRECONDITION "tenant destroyed" if it belonged to a destroyed tenant (ids are
    /// never re-used). Refused if the key is wrapped under a retired master version.
    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()>;
    /// Creates many tenants, each with its first key version, in one transaction (bulk
    /// provisioning: one durable commit instead of one per tenant). Nothing is created if any
    /// id was ever used.
    fn create_tenants(&self, tenants: &[(TenantRecord, KeyVersionRecord)]) -> Result<()> {
        for (tenant, first) in tenants {
            self.create_tenant(tenant, first)?;
        }
        Ok(())
    }
    /// A tenant's row.
    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>>;
    /// A tenant's row and its key versions, read as one consistent snapshot (so a change
    /// committed by another process cannot fall between the two reads).
    fn tenant_snapshot(
        &self,
        id: &TenantId,
    ) -> Result<Option<(TenantRecord, Vec<KeyVersionRecord>)>> {
        match self.tenant(id)? {
            Some(tenant) => Ok(Some((tenant, self.key_versions(id)?))),
            None => Ok(None),
        }
    }
    /// Tenants in id order after `after`.
    fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>>;
    /// A tenant's key versions, oldest first.
    fn key_versions(&self, id: &TenantId) -> Result<Vec<KeyVersionRecord>>;
    /// Adds a version and makes it primary, if the primary is still `expected_primary` and the
    /// tenant is active or suspended.
    fn add_key_version(
        &self,
        id: &TenantId,
        expected_primary: u32,
        version: &KeyVersionRecord,
    ) -> Result<TenantRecord>;
    /// Moves a tenant from one of `from` to `to` (with the deletion time for PENDING_DELETION).
    fn set_tenant_state(
        &self,
        id: &TenantId,
        from: &[TenantState],
        to: TenantState,
        deletion_time: Option<i64>,
    ) -> Result<TenantRecord>;
    /// Moves a PENDING_DELETION tenant back to ACTIVE, only while its deletion window is still
    /// open at `now` (a due deletion can no longer be cancelled).
    fn cancel_tenant_deletion(&self, id: &TenantId, now: i64) -> Result<TenantRecord>;
    /// Sets the rotation policy.
    fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord>;
    /// Moves a non-primary (for disable/destroy) version between states; destroying deletes
    /// the wrapped key with secure_delete.
    fn set_key_version_state(
        &self,
        id: &TenantId,
        version: u32,
        from: FromStates<'_>,
        to: KeyVersionState,
    ) -> Result<KeyVersionRecord>;
    /// Crypto-shreds a PENDING_DELETION tenant whose window has passed at `now`: deletes every
    /// wrapped key with secure_delete, marks the tenant DESTROYED and checkpoints the log so
    /// no copy of the keys stays in any file.
    fn destroy_tenant(&self, id: &TenantId, now: i64) -> Result<TenantRecord>;
    /// Reserves `count` more encryptions under a version and returns the new reserved total.
    fn reserve_encryptions(&self, id: &TenantId, version: u32, count: u64) -> Result<u64>;
    /// Tenants whose primary is older than their rotation period or whose reserved count is
    /// within `budget_margin` (a fraction) of their budget, and tenants whose deletion is due.
    fn tenants_due(&self, now: i64, budget_margin: f64) -> Result<DueTenants>;

    /// Stores a new token.
    fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    /// The token with this hash.
    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>>;
    /// All tokens.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token by id; false if there is none.
    fn revoke_token(&self, id: &str, at: i64) -> Result<bool>;

    /// True if another process (or connection) changed the store since the last call, so
    /// every cache built from it must be dropped.
    fn changed_elsewhere(&self) -> Result<bool>;

    /// How many changes by other processes (or connections) the store has seen, as of a check
    /// that began after this call did: a caller that has dropped its caches for this
    /// generation (or a later one) has seen every change committed before the call began.
    /// Several callers may get the same generation from one check.
    fn change_generation(&self) -> Result<u64>;

    /// [`KeyStore::change_generation`] if it can answer without waiting for another
    /// operation of this process (a write holding the connection); `None` when it would
    /// have to wait.
    fn try_change_generation(&self) -> Option<Result<u64>> {
        Some(self.change_generation())
    }

    // Backup, per-tenant import and the shred ledger (see `crate::backup`).

    /// Writes a consistent snapshot of the whole store to the new file `dest` (mode 0600)
    /// while other connections and processes keep reading and writing.
    fn snapshot_to(&self, dest: &std::path::Path) -> Result<()>;
    /// How many tenants and wrapped keys the store holds.
    fn counts(&self) -> Result<StoreCounts>;
    /// Calls `f` with every wrapped tenant key, in (tenant, version) order; returns how many.
    fn for_each_wrapped_key(
        &self,
        f: &mut dyn FnMut(&TenantId, u32, &WrappedTenantKey) -> Result<()>,
    ) -> Result<u64>;
    /// Every destroyed tenant, and every destroyed version of a tenant that is not destroyed.
    fn destroyed_items(&self) -> Result<Vec<ShredItem>>;
    /// Crypto-shreds the items whatever their state (re-applying the shred ledger after a
    /// restore): one transaction, then the log is checkpointed so no copy of the keys stays.
    /// Returns the items that were not destroyed yet. A destroyed tenant the store does not
    /// know becomes a tombstone (a DESTROYED row without key versions), so its id cannot be
    /// created again; a destroyed version of an unknown tenant is skipped.
    fn shred(&self, items: &[ShredItem], now: i64) -> Result<Vec<ShredItem>>;
    /// Replaces a tenant and all its key versions in one transaction (per-tenant import):
    /// refused if the tenant is destroyed in the store, or if a version the store has
    /// destroyed would come back with a key.
    fn replace_tenant(&self, tenant: &TenantRecord, versions: &[KeyVersionRecord]) -> Result<()>;
    /// The shred ledger head this store last saw.
    fn shred_ledger_head(&self) -> Result<Option<LedgerHead>>;
    /// Records the shred ledger head, unless the store already saw a longer ledger.
    fn set_shred_ledger_head(&self, head: &LedgerHead) -> Result<()>;
}

/// What `rotate --due` has to do.
#[derive(Debug, Default)]
pub struct DueTenants {
    /// Active tenants to rotate.
    pub rotate: Vec<TenantId>,
    /// Pending deletions whose window has passed.
    pub destroy: Vec<TenantId>,
}
