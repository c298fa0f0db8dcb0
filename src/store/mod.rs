//! The key store: master-key check values, tenants, wrapped tenant-key versions and caller
//! tokens, behind the [`KeyStore`] traits so that a PostgreSQL backend can replace SQLite for
//! multi-node deployments. Nothing outside this module knows the backend is SQLite.
//!
//! [`KeyStore`] is five traits by concern: [`TenantStore`], [`TokenStore`],
//! [`MasterKeyStore`], [`ChangeDetection`] and [`BackupStore`]. Callers import the ones whose
//! methods they call.
//!
//! Every method is one transaction; state changes are conditional on the state they start
//! from, so two processes (a server and the `rotate` command) can share one data directory.

mod backend;
#[cfg(any(test, feature = "test-seams"))]
pub mod contract;
mod migrations;
pub mod postgres;
mod recovery;
pub mod row_auth;
mod sqlite;
pub(crate) mod sqlite_backup;

use crate::domain::lifecycle::{TenantTransition, VersionTransition};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::Result;

pub use backend::{STORE_ENV, StoreBackend};
pub use recovery::{KeyChange, LedgerHead, ShredItem, StoreCounts};
pub use sqlite::SqliteKeyStore;

/// The environment value that, in `test-seams` builds only, caps keys.db at this many pages
/// (SQLite's `max_page_count`), so a test can make key-store writes fail as on a full disk.
pub const TEST_MAX_PAGES_ENV: &str = "TENANT_KMS_TEST_KEYS_MAX_PAGES";

/// The environment value that, in `test-seams` builds only, names a failpoint (one of the
/// `FAILPOINT_*` names) at which the process aborts at once: no destructor runs and no file
/// is closed, as under kill -9. A production build ignores it.
pub const TEST_FAILPOINT_ENV: &str = "TENANT_KMS_TEST_FAILPOINT";

/// Failpoint: a tenant creation or a new key version is committed in keys.db, its audit
/// record is not written yet.
pub const FAILPOINT_AFTER_KEY_COMMIT: &str = "after-key-commit";

/// Failpoint: `migrate-store` has built the whole copy in its staging schema and not published
/// it yet (a migration killed at its last moment must leave the target empty).
pub const FAILPOINT_MIGRATE_BEFORE_PUBLISH: &str = "migrate-before-publish";
/// Failpoint: a destruction is committed in keys.db, its shred sequence (rebuild, WAL
/// checkpoint and truncate) has not run.
pub const FAILPOINT_BEFORE_SHRED_SEQUENCE: &str = "before-shred-sequence";

/// In `test-seams` builds, aborts the process when [`TEST_FAILPOINT_ENV`] names `point`;
/// otherwise does nothing.
pub(crate) fn failpoint(point: &str) {
    #[cfg(feature = "test-seams")]
    if std::env::var(TEST_FAILPOINT_ENV).is_ok_and(|armed| armed == point) {
        std::process::abort();
    }
    let _ = point;
}

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

/// `version` with its encryption counter raised to that of the same version among `stored`
/// (the rows the replacing transaction read), if that is higher. An import is planned before
/// its transaction, and a server may reserve encryptions under the version meanwhile: a
/// counter written back below a reservation would hand out the same part of the budget twice.
pub(crate) fn counter_not_behind<'a>(
    version: &KeyVersionRecord,
    stored: impl IntoIterator<Item = &'a KeyVersionRecord>,
) -> KeyVersionRecord {
    let mut kept = version.clone();
    if let Some(row) = stored
        .into_iter()
        .find(|row| row.version == version.version)
    {
        kept.encryptions = kept.encryptions.max(row.encryptions);
    }
    kept
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
    /// Unix seconds; set while the token is quarantined (anomaly containment: `token
    /// quarantine`, `token contain`, or a detector configured to quarantine), cleared by
    /// `token release`. A quarantined token is refused PERMISSION_DENIED.
    pub quarantined_at: Option<i64>,
}

/// Storage of keys and callers, for a backend to implement: the five traits below, composed
/// (as tikv's `KvEngine` composes its engine traits). Implementations are shared by many
/// threads; each method is atomic and durable when it returns. Every implementation must pass
/// the conformance suite in [`contract`] (behind the `test-seams` feature).
pub trait KeyStore:
    TenantStore
    + TokenStore
    + MasterKeyStore
    + ChangeDetection
    + BackupStore
    + IndexDefinitionStore
    + Send
    + Sync
{
}

impl<S> KeyStore for S where
    S: TenantStore
        + TokenStore
        + MasterKeyStore
        + ChangeDetection
        + BackupStore
        + IndexDefinitionStore
        + Send
        + Sync
{
}

/// Tenants and their key versions. Lifecycle rules come from [`crate::domain::lifecycle`]:
/// an implementation reads the row inside its transaction, asks the rule, and writes the
/// answer conditionally on what it read (compare-and-set), deciding nothing of its own.
pub trait TenantStore {
    /// Creates a tenant with its first key version. `AlreadyExists` if the id is in use,
    /// [`Error::TenantState`](crate::error::Error::TenantState) (DESTROYED) if it belonged to
    /// a destroyed tenant (ids are never re-used),
    /// [`Error::RetiredMasterVersion`](crate::error::Error::RetiredMasterVersion) if the key
    /// is wrapped under a retired master version.
    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()>;
    /// Creates many tenants, each with its first key version, in one transaction (bulk
    /// provisioning: one durable commit instead of one per tenant), with the errors of
    /// [`TenantStore::create_tenant`]. All or nothing: nothing is created if any id was ever
    /// used.
    fn create_tenants(&self, tenants: &[(TenantRecord, KeyVersionRecord)]) -> Result<()>;
    /// A tenant's row.
    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>>;
    /// A tenant's row and its key versions (oldest first), read as one consistent snapshot
    /// (so a change committed by another process cannot fall between the two reads).
    fn tenant_snapshot(
        &self,
        id: &TenantId,
    ) -> Result<Option<(TenantRecord, Vec<KeyVersionRecord>)>>;
    /// Up to `limit` tenants (destroyed tombstones included) in id order, strictly after
    /// `after`.
    fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>>;
    /// A tenant's key versions, oldest first (empty for an unknown tenant).
    fn key_versions(&self, id: &TenantId) -> Result<Vec<KeyVersionRecord>>;
    /// Adds a version and makes it primary, if the rotation rule
    /// ([`lifecycle::check_rotation`](crate::domain::lifecycle::check_rotation)) allows it:
    /// the tenant is rotatable and its primary is still `expected_primary`, else
    /// [`Error::ConcurrentChange`](crate::error::Error::ConcurrentChange). Of several callers
    /// racing from the same primary exactly one wins.
    fn add_key_version(
        &self,
        id: &TenantId,
        expected_primary: u32,
        version: &KeyVersionRecord,
    ) -> Result<TenantRecord>;
    /// Applies a lifecycle transition at `now` as
    /// [`lifecycle::tenant_transition`](crate::domain::lifecycle::tenant_transition) decides
    /// it. A destruction crypto-shreds: every wrapped key of the tenant is deleted in the
    /// same transaction and no copy stays in any file of the store.
    fn set_tenant_state(
        &self,
        id: &TenantId,
        transition: TenantTransition,
        now: i64,
    ) -> Result<TenantRecord>;
    /// Sets the rotation policy (refused for a destroyed tenant).
    fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord>;
    /// Applies a version transition as
    /// [`lifecycle::version_transition`](crate::domain::lifecycle::version_transition)
    /// decides it; destroying deletes the wrapped key for good (crypto-shredding).
    fn set_key_version_state(
        &self,
        id: &TenantId,
        version: u32,
        transition: VersionTransition,
    ) -> Result<KeyVersionRecord>;
    /// Reserves `count` more encryptions under a version and returns the new reserved total:
    /// never decreases, and concurrent reservations add up exactly.
    fn reserve_encryptions(&self, id: &TenantId, version: u32, count: u64) -> Result<u64>;
    /// Rotatable tenants whose primary is older than their rotation period or whose reserved
    /// count is within `budget_margin` (a fraction) of their budget, and tenants whose
    /// deletion is due at `now`.
    fn tenants_due(&self, now: i64, budget_margin: f64) -> Result<DueTenants>;
}

/// The share of a version's nonce budget left under which its tenant's rotation is due
/// (`rotate --due`, and the server's `tenant_kms_tenants_rotation_due` gauge).
pub const ROTATION_BUDGET_MARGIN: f64 = 0.1;

/// Callers' tokens, stored only as hashes.
pub trait TokenStore {
    /// Stores a new token.
    fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    /// The token with this hash.
    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>>;
    /// All tokens, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Revokes a token by id; false if there is none or it is revoked already (the first
    /// revocation time stays).
    fn revoke_token(&self, id: &str, at: i64) -> Result<bool>;
    /// Quarantines a token by id (`Some(at)`) or releases it (`None`); false if there is no
    /// such token or it is already in that state (a quarantine keeps its first time).
    fn set_token_quarantine(&self, id: &str, at: Option<i64>) -> Result<bool>;
}

/// Master-key versions (check values, never keys), what each wraps, and the wrapped audit
/// secret.
pub trait MasterKeyStore {
    /// All master-key versions the store has seen, ascending.
    fn master_versions(&self) -> Result<Vec<MasterVersionRecord>>;
    /// Records a new master-key version (a version already known is left as it is).
    fn insert_master_version(&self, record: &MasterVersionRecord) -> Result<()>;
    /// Marks a master version retired, in one transaction and only if no wrapped key (tenant
    /// key or audit secret) is under it any more. Returns whether it is retired now. Nothing
    /// can be wrapped under a retired version afterwards.
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
    /// Installs the key that MACs security-relevant rows ([`row_auth`]; derived from the audit
    /// secret once the keyring is open). First finishes a pending upgrade in one transaction
    /// (a store from before row MACs gets every row MAC'd once, as it is, and its anchor),
    /// then runs the full check: every row's MAC and the anchor's digest of them. A failure
    /// is [`Error::StoreIntegrity`](crate::error::Error::StoreIntegrity), and then the store
    /// serves no MAC'd row until a later check passes. Until a key is installed every read or write of a tenant, key-version
    /// or token row fails; afterwards each such read verifies the row's MAC (fails closed
    /// with `StoreIntegrity`), each write computes it and updates the anchor in the same
    /// transaction, and a change by another process (see [`ChangeDetection`]) re-checks the
    /// anchor against every row MAC before anything is served again.
    ///
    /// `allow_upgrade` false (the caller's trusted record, the audit chain, says the upgrade
    /// was done already) makes a pending upgrade an integrity failure instead: a writer who
    /// rewrote the store into its pre-upgrade form must not get forged rows MAC'd. Returns
    /// how many rows the upgrade MAC'd (`None` when none was pending).
    fn set_row_key(&self, key: row_auth::RowKey, allow_upgrade: bool) -> Result<Option<u64>>;

    /// Whether [`MasterKeyStore::set_row_key`] would find the one-time upgrade to row MACs
    /// pending: the upgrade mark and no anchor. A genuine store never turns this back on once
    /// it is off, so a caller that finds it off may refuse an upgrade that appears later.
    fn row_mac_upgrade_due(&self) -> Result<bool>;
}

/// The query of [`MasterKeyStore::row_mac_upgrade_due`], the same in SQLite and PostgreSQL.
pub(crate) const ROW_MAC_UPGRADE_DUE: &str = "SELECT EXISTS (SELECT 1 FROM row_mac_upgrade) \
     AND NOT EXISTS (SELECT 1 FROM row_anchor)";

/// Noticing changes made by other processes, so caches built from the store can be dropped.
pub trait ChangeDetection {
    /// How many changes by other processes (or connections) the store has seen, as of a check
    /// that began after this call did: a caller that has dropped its caches for this
    /// generation (or a later one) has seen every change committed before the call began.
    /// Several callers may get the same generation from one check. Never decreases; this
    /// store's own writes do not count.
    fn change_generation(&self) -> Result<u64>;
    /// [`ChangeDetection::change_generation`] if it can answer without waiting for another
    /// operation of this process (a write holding the connection); `None` when it would
    /// have to wait.
    fn try_change_generation(&self) -> Option<Result<u64>>;
    /// The highest row-anchor write counter ([`row_auth::Anchor::counter`]) this handle has
    /// seen in a verified anchor or committed itself; 0 before
    /// [`MasterKeyStore::set_row_key`]. Never decreases, never above what the store held
    /// when it was read, and answers from memory without waiting for any store operation:
    /// the audit chain records it after key-store changes (a `KeyStoreAnchor` record,
    /// docs/AUDIT.md) so that a start with an earlier copy of the whole store is refused.
    fn anchor_counter(&self) -> u64;
}

/// Backup, per-tenant import and crypto-shredding by the shred ledger (see `crate::backup`).
pub trait BackupStore {
    /// Writes a consistent snapshot of the whole store to the new file `dest` (mode 0600)
    /// while other connections and processes keep reading and writing.
    fn snapshot_to(&self, dest: &std::path::Path) -> Result<()>;
    /// How many tenants and wrapped keys the store holds.
    fn counts(&self) -> Result<StoreCounts>;
    /// Calls `f` with every wrapped tenant key, in (tenant, version) order; returns how many.
    /// `f` must not call back into the store.
    fn for_each_wrapped_key(
        &self,
        f: &mut dyn FnMut(&TenantId, u32, &WrappedTenantKey) -> Result<()>,
    ) -> Result<u64>;
    /// Every destroyed tenant, and every destroyed version of a tenant that is not destroyed.
    fn destroyed_items(&self) -> Result<Vec<ShredItem>>;
    /// Crypto-shreds the items whatever their state (re-applying the shred ledger after a
    /// restore): one transaction, then no copy of the keys stays in any file of the store.
    /// Returns the items that were not destroyed yet. A destroyed tenant the store does not
    /// know becomes a tombstone (a DESTROYED row without key versions), so its id cannot be
    /// created again; a destroyed version of an unknown tenant is skipped.
    fn shred(&self, items: &[ShredItem], now: i64) -> Result<Vec<ShredItem>>;
    /// Replaces a tenant and all its key versions in one transaction (per-tenant import):
    /// refused if the tenant is destroyed in the store, or if a version the store has
    /// destroyed would come back with a key; on refusal nothing changes. No version's
    /// encryption counter moves back: each is written as the larger of the import's and the
    /// store's at the time of the write ([`counter_not_behind`]).
    fn replace_tenant(&self, tenant: &TenantRecord, versions: &[KeyVersionRecord]) -> Result<()>;
    /// The shred ledger head this store last saw (on a store several nodes share: the head
    /// of this node's ledger, each node keeping a ledger of its own).
    fn shred_ledger_head(&self) -> Result<Option<LedgerHead>>;
    /// Records the shred ledger head, unless the store already saw a longer ledger.
    fn set_shred_ledger_head(&self, head: &LedgerHead) -> Result<()>;
    /// Destructions committed through any process sharing this store, for the shred ledger
    /// to record as they happen. `cursor` is what the previous call returned (`None` the first
    /// time). Returns the new cursor and the destroyed items of every tenant destroyed (or
    /// with a version destroyed) since `cursor` — all destroyed items at the first call, or
    /// when the store no longer holds the changes since `cursor` — or `None` when the store
    /// has no other writers to follow (the default: each writer records its own).
    fn destructions_since(&self, cursor: Option<u64>) -> Result<Option<(u64, Vec<ShredItem>)>> {
        let _ = cursor;
        Ok(None)
    }
    /// The audit reconciliation watermark `(seconds, audit sequence number)`, and every
    /// tenant creation and key-version creation recorded at or after its time that was not
    /// checked at its own second already, in time order: what the reconciliation at start
    /// compares with the audit records after that sequence number.
    fn unreconciled_key_changes(&self) -> Result<((i64, u64), Vec<KeyChange>)>;
    /// Moves the watermark to `(secs, audit_seq)` (its time never goes back) and remembers
    /// which of the `checked` changes fall in its own second, so the next check skips them.
    fn set_audit_reconciled_through(
        &self,
        secs: i64,
        audit_seq: u64,
        checked: &[KeyChange],
    ) -> Result<()>;
}

/// A value as a database writer sees it, for [`RowTamper`].
#[cfg(any(test, feature = "test-seams"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawValue {
    /// SQL NULL.
    Null,
    /// An integer column.
    Integer(i64),
    /// A text column.
    Text(String),
    /// A blob column (a MAC, a hash).
    Blob(Vec<u8>),
}

/// Which row [`RowTamper`] reads or writes.
#[cfg(any(test, feature = "test-seams"))]
#[derive(Debug, Clone)]
pub enum RowRef {
    /// A tenant row.
    Tenant(TenantId),
    /// A key-version row.
    KeyVersion(TenantId, u32),
    /// A token row, by token id.
    Token(String),
}

/// Test seam (feature `test-seams`): what someone who can write the database but holds no
/// master key can do, so that the contract suite's tamper checks
/// ([`contract::check_tampered_rows_are_refused`]) run against every backend. Column names
/// and value codes are those of the SQLite schema (`tenants`, `key_versions`, `tokens`, with
/// `mac` and `generation`); a backend maps them to its own.
#[cfg(any(test, feature = "test-seams"))]
pub trait RowTamper {
    /// Every column of the row as stored, by name (`None` if there is no such row).
    fn raw_row(&self, row: &RowRef) -> Result<Option<Vec<(String, RawValue)>>>;
    /// Sets the named columns of the row to the given values, nothing else (no MAC, no
    /// anchor update), as a direct database write would.
    fn raw_update(&self, row: &RowRef, columns: &[(String, RawValue)]) -> Result<()>;
    /// Inserts a row with the given columns into the row's table, as a direct write would.
    fn raw_insert(&self, row: &RowRef, columns: &[(String, RawValue)]) -> Result<()>;
}

/// What `rotate --due` has to do.
#[derive(Debug, Default)]
pub struct DueTenants {
    /// Active tenants to rotate.
    pub rotate: Vec<TenantId>,
    /// Pending deletions whose window has passed.
    pub destroy: Vec<TenantId>,
}

/// Blind index definitions (docs/SEARCHABLE.md): declared once, listed, never changed. The
/// declaration rule is [`crate::domain::index::check_declaration`]: an implementation reads
/// the definitions of that name the rule needs inside its transaction, asks it, and inserts
/// only on [`Declaration::Insert`](crate::domain::index::Declaration::Insert).
pub trait IndexDefinitionStore {
    /// Declares a definition; returns the definition in force afterwards (the new one, or an
    /// identical one already in force, unchanged). `AlreadyExists` if a definition of that
    /// name that could serve one of its tenants computes something else.
    fn declare_index(
        &self,
        definition: &crate::domain::index::IndexDefinition,
    ) -> Result<crate::domain::index::IndexDefinition>;
    /// The definition of `name` in force for `tenant`: the tenant's own, else the
    /// all-tenants one.
    fn index_definition(
        &self,
        tenant: &TenantId,
        name: &crate::domain::index::IndexName,
    ) -> Result<Option<crate::domain::index::IndexDefinition>>;
    /// With a tenant: the definitions in force for it, one per name; without: every stored
    /// definition (all scopes). In name order, then all-tenants before one tenant's.
    fn list_index_definitions(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<crate::domain::index::IndexDefinition>>;
}
