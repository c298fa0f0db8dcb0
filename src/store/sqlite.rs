//! [`KeyStore`] on SQLite (`keys.db`): WAL mode, `synchronous=FULL`, `secure_delete=ON`.
//!
//! One connection per process, behind a std mutex: every call is a short transaction and the
//! hot path is served from the key cache, so there is nothing to gain from a pool, and a single
//! connection makes `PRAGMA data_version` an exact "someone else wrote" signal (it ignores the
//! connection's own commits). The check runs at the start of every call, so it is a cached
//! statement, and calls that queue behind a running check share the next one (single flight).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::row_auth::{Anchor, RowDigest, RowKey};
use super::{
    BackupStore, ChangeDetection, DueTenants, KeyChange, KeyVersionRecord, LedgerHead,
    MasterKeyStore, MasterVersionRecord, Rewrapping, ShredItem, StoreCounts, TenantRecord,
    TenantStore, TokenRecord, TokenStore, WrappedTenantKey,
};
use crate::domain::lifecycle::{self, TenantTransition, VersionTransition};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result, StoreFault};

// Blind index definitions (`IndexDefinitionStore`), in their own file.
mod index;
mod wal_watch;

/// How long a write waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a queued reservation's result is left for its caller.
type Ticket = Arc<Mutex<Option<Result<u64>>>>;

/// A nonce-budget reservation waiting for the connection.
struct PendingReservation {
    id: TenantId,
    version: u32,
    count: u64,
    ticket: Ticket,
}

fn lock_plain<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Queues of plain values: a panic elsewhere cannot leave them half-updated.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The SQLite key store.
pub struct SqliteKeyStore {
    inner: Mutex<Inner>,
    /// Reservations waiting to be written together (see `reserve_encryptions`).
    reservations: Mutex<Vec<PendingReservation>>,
    /// Change checks started so far (numbered from 1), for single-flight checking.
    checks_started: AtomicU64,
    /// keys.db's WAL-index header and the generation of the last full change check: what a
    /// check reads first, without the connection.
    changes: wal_watch::WalWatch,
    /// A copy of `Inner::anchor_seen` readable without the connection's lock (see
    /// `ChangeDetection::anchor_counter`): the audit writer reads it for every batch and must
    /// not wait behind a key-store fsync.
    anchor_published: Arc<AtomicU64>,
}

struct Inner {
    conn: Connection,
    data_version: i64,
    /// The number of the last finished full change check.
    checks_done: u64,
    /// The key of the row MACs, once installed (`MasterKeyStore::set_row_key`).
    row_key: Option<RowKey>,
    /// Why the store refuses to serve rows: the last check of the anchor against the row
    /// MACs (after another process changed keys.db) failed. Cleared when a later check passes.
    integrity: Option<String>,
    /// The highest anchor counter this process has seen: a lower one later means keys.db was
    /// replaced by an earlier copy while this process had it open.
    anchor_seen: u64,
    /// Shared with `SqliteKeyStore::anchor_published`: every raise of `anchor_seen` is
    /// published there.
    anchor_published: Arc<AtomicU64>,
}

impl Inner {
    /// Records an anchor counter read from a verified anchor or just committed, and publishes
    /// it for `ChangeDetection::anchor_counter`.
    fn saw_counter(&mut self, counter: u64) {
        self.anchor_seen = counter;
        self.anchor_published.fetch_max(counter, Ordering::Release);
    }

    /// After another process changed keys.db: checks the anchor against every row MAC, so
    /// nothing is served from a store whose rows were deleted, inserted or rolled back, until
    /// a later check passes.
    fn recheck_rows(&mut self) {
        let Some(key) = &self.row_key else {
            return;
        };
        match full_check(&self.conn, key, self.anchor_seen, false) {
            Ok(counter) => {
                self.saw_counter(counter);
                self.integrity = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "key store: refusing to serve rows until keys.db is restored");
                self.integrity = Some(e.to_string());
            }
        }
    }

    /// The row key, unless the store refuses to serve rows or has no key yet.
    fn serving_key(&self) -> Result<&RowKey> {
        if let Some(why) = &self.integrity {
            return Err(Error::StoreIntegrity(why.clone()));
        }
        self.row_key
            .as_ref()
            .ok_or_else(|| Error::internal("key store: the row key is not installed"))
    }
}

/// The one conversion of a SQLite error: faults of the environment that can pass (full,
/// read-only, busy) become the typed [`Error::StoreUnavailable`], so a client is told to retry
/// (UNAVAILABLE) rather than that the service is broken; anything else is internal.
fn sql_error(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    let fault = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => Some(StoreFault::Full),
        Some(ErrorCode::ReadOnly) => Some(StoreFault::ReadOnly),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Some(StoreFault::Busy),
        _ => None,
    };
    match fault {
        Some(fault) => {
            // The detail (SQLite's text) goes to the log only, like an internal error's.
            tracing::warn!(error = %e, "key store write refused by its environment");
            Error::StoreUnavailable(fault)
        }
        None => Error::Internal(format!("key store: {e}")),
    }
}

fn u32_of(value: i64) -> rusqlite::Result<u32> {
    u32::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, value))
}

fn u64_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn bad_column(index: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Integer,
        format!("invalid {what}").into(),
    )
}

const TENANT_COLUMNS: &str = "tenant_id, state, primary_version, created_at, \
     rotation_period_seconds, max_encryptions, deletion_time, destroyed_at";

fn tenant_from_row(row: &Row<'_>) -> rusqlite::Result<TenantRecord> {
    let id: String = row.get(0)?;
    Ok(TenantRecord {
        tenant_id: TenantId::parse(&id).map_err(|_| bad_column(0, "tenant id"))?,
        state: TenantState::from_code(row.get(1)?).ok_or_else(|| bad_column(1, "state"))?,
        primary_version: u32_of(row.get(2)?)?,
        created_at: row.get(3)?,
        rotation_period_seconds: u64_of(row.get(4)?),
        max_encryptions: u64_of(row.get(5)?),
        deletion_time: row.get(6)?,
        destroyed_at: row.get(7)?,
    })
}

const VERSION_COLUMNS: &str = "v.version, v.state, v.created_at, v.encryptions, \
     w.master_version, w.wrapped_key, v.generation, v.mac";

fn version_from_row(row: &Row<'_>) -> rusqlite::Result<KeyVersionRecord> {
    let master: Option<i64> = row.get(4)?;
    let bytes: Option<Vec<u8>> = row.get(5)?;
    let wrapped = match (master, bytes) {
        (Some(m), Some(bytes)) => Some(WrappedTenantKey {
            master_version: u32_of(m)?,
            bytes,
        }),
        _ => None,
    };
    Ok(KeyVersionRecord {
        version: u32_of(row.get(0)?)?,
        state: KeyVersionState::from_code(row.get(1)?).ok_or_else(|| bad_column(1, "state"))?,
        created_at: row.get(2)?,
        encryptions: u64_of(row.get(3)?),
        wrapped,
    })
}

const TOKEN_COLUMNS: &str = "id, name, hash, role, tenants, operations, created_at, expires_at, \
     revoked_at, generation, mac, quarantined_at";

/// A MAC'd row as stored: the record, the generation of its last write and its MAC (empty if
/// the column is NULL, which no MAC matches).
struct Stored<T> {
    record: T,
    generation: u64,
    mac: Vec<u8>,
}

fn stored<T>(row: &Row<'_>, record: T, first: usize) -> rusqlite::Result<Stored<T>> {
    Ok(Stored {
        record,
        generation: u64_of(row.get(first)?),
        mac: row
            .get::<_, Option<Vec<u8>>>(first + 1)?
            .unwrap_or_default(),
    })
}

fn stored_tenant(row: &Row<'_>) -> rusqlite::Result<Stored<TenantRecord>> {
    stored(row, tenant_from_row(row)?, 8)
}

fn stored_version(row: &Row<'_>) -> rusqlite::Result<Stored<KeyVersionRecord>> {
    stored(row, version_from_row(row)?, 6)
}

fn stored_token(row: &Row<'_>) -> rusqlite::Result<Stored<TokenRecord>> {
    stored(row, token_from_row(row)?, 9)
}

fn verified_tenant(key: &RowKey, row: Stored<TenantRecord>) -> Result<Stored<TenantRecord>> {
    key.verify_tenant(&row.record, row.generation, &row.mac)?;
    Ok(row)
}

fn verified_version(
    key: &RowKey,
    id: &TenantId,
    row: Stored<KeyVersionRecord>,
) -> Result<Stored<KeyVersionRecord>> {
    key.verify_key_version(id, &row.record, row.generation, &row.mac)?;
    Ok(row)
}

fn verified_token(key: &RowKey, row: Stored<TokenRecord>) -> Result<TokenRecord> {
    key.verify_token(&row.record, row.generation, &row.mac)?;
    Ok(row.record)
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let hash: Vec<u8> = row.get(2)?;
    Ok(TokenRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        hash: hash.try_into().map_err(|_| bad_column(2, "token hash"))?,
        role: row.get(3)?,
        tenants: row.get(4)?,
        operations: row.get(5)?,
        created_at: row.get(6)?,
        expires_at: row.get(7)?,
        revoked_at: row.get(8)?,
        quarantined_at: row.get(11)?,
    })
}

/// A tenant row as stored, its MAC not checked yet.
fn load_tenant_unchecked(conn: &Connection, id: &TenantId) -> Result<Option<Stored<TenantRecord>>> {
    // Cached: every cache miss runs it.
    conn.prepare_cached(&format!(
        "SELECT {TENANT_COLUMNS}, generation, mac FROM tenants WHERE tenant_id = ?1"
    ))
    .and_then(|mut stmt| stmt.query_row([id.as_str()], stored_tenant).optional())
    .map_err(sql_error)
}

/// A tenant row whose MAC checked out, with its MAC (for a write that replaces it).
fn load_tenant_stored(
    conn: &Connection,
    key: &RowKey,
    id: &TenantId,
) -> Result<Option<Stored<TenantRecord>>> {
    load_tenant_unchecked(conn, id)?
        .map(|row| verified_tenant(key, row))
        .transpose()
}

/// A tenant row whose MAC checked out.
fn load_tenant(conn: &Connection, key: &RowKey, id: &TenantId) -> Result<Option<TenantRecord>> {
    Ok(load_tenant_stored(conn, key, id)?.map(|row| row.record))
}

/// A key-version row as stored, its MAC not checked yet.
fn load_version_unchecked(
    conn: &Connection,
    id: &TenantId,
    version: u32,
) -> Result<Option<Stored<KeyVersionRecord>>> {
    conn.prepare_cached(&format!(
        "SELECT {VERSION_COLUMNS} FROM key_versions v LEFT JOIN wrapped_keys w \
         ON w.tenant_id = v.tenant_id AND w.version = v.version \
         WHERE v.tenant_id = ?1 AND v.version = ?2"
    ))
    .and_then(|mut stmt| {
        stmt.query_row(params![id.as_str(), version], stored_version)
            .optional()
    })
    .map_err(sql_error)
}

/// A key-version row whose MAC checked out, with its MAC.
fn load_version_stored(
    conn: &Connection,
    key: &RowKey,
    id: &TenantId,
    version: u32,
) -> Result<Option<Stored<KeyVersionRecord>>> {
    load_version_unchecked(conn, id, version)?
        .map(|row| verified_version(key, id, row))
        .transpose()
}

/// A key-version row whose MAC checked out.
fn load_version(
    conn: &Connection,
    key: &RowKey,
    id: &TenantId,
    version: u32,
) -> Result<Option<KeyVersionRecord>> {
    Ok(load_version_stored(conn, key, id, version)?.map(|row| row.record))
}

/// A token row (by id) whose MAC checked out, with its MAC.
fn load_token_stored(
    conn: &Connection,
    key: &RowKey,
    id: &str,
) -> Result<Option<Stored<TokenRecord>>> {
    let row = conn
        .query_row(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
            [id],
            stored_token,
        )
        .optional()
        .map_err(sql_error)?;
    match row {
        Some(row) => {
            key.verify_token(&row.record, row.generation, &row.mac)?;
            Ok(Some(row))
        }
        None => Ok(None),
    }
}

/// The anchor, its MAC checked, and not older than `seen` (the highest counter this process
/// saw: a lower one means keys.db was replaced by an earlier copy).
fn load_anchor(conn: &Connection, key: &RowKey, seen: u64) -> Result<Anchor> {
    let row: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .prepare_cached("SELECT counter, digest, mac FROM row_anchor WHERE id = 1")
        .and_then(|mut stmt| {
            stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .optional()
        })
        .map_err(sql_error)?;
    let Some((counter, digest, mac)) = row else {
        return Err(integrity("the row anchor is missing"));
    };
    let anchor = Anchor {
        counter: u64_of(counter),
        digest: RowDigest::from_slice(&digest)
            .ok_or_else(|| integrity("the row anchor is malformed"))?,
    };
    key.verify_anchor(&anchor, &mac)?;
    if anchor.counter < seen {
        return Err(integrity(format!(
            "the row anchor's write counter is {}, below the {seen} this process saw: keys.db \
             was replaced by an earlier copy",
            anchor.counter
        )));
    }
    Ok(anchor)
}

fn store_anchor(conn: &Connection, key: &RowKey, anchor: &Anchor) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO row_anchor (id, counter, digest, mac) VALUES (1, ?1, ?2, ?3) \
         ON CONFLICT(id) DO UPDATE SET counter = excluded.counter, digest = excluded.digest, \
         mac = excluded.mac",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            i64_of(anchor.counter),
            anchor.digest.0.as_slice(),
            key.anchor_mac(anchor).as_slice()
        ])
    })
    .map_err(sql_error)?;
    Ok(())
}

/// An integrity failure found by the store itself (not by a row's MAC), logged here.
fn integrity(what: impl Into<String>) -> Error {
    let what = what.into();
    tracing::error!(problem = %what, "key store failed its integrity check");
    Error::StoreIntegrity(what)
}

/// The full check: the anchor's MAC and counter, every row's MAC (with `every_row`; else only
/// the digest of the stored MACs), and the anchor's digest against the rows'. Returns the
/// anchor's counter.
fn full_check(conn: &Connection, key: &RowKey, seen: u64, every_row: bool) -> Result<u64> {
    let anchor = load_anchor(conn, key, seen)?;
    let mut sum = Anchor::empty();
    if every_row {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {TENANT_COLUMNS}, generation, mac FROM tenants"
            ))
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let row = verified_tenant(key, stored_tenant(row).map_err(sql_error)?)?;
            sum.add(key, &row.mac);
        }
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {VERSION_COLUMNS}, v.tenant_id FROM key_versions v LEFT JOIN \
                 wrapped_keys w ON w.tenant_id = v.tenant_id AND w.version = v.version"
            ))
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let id: String = row.get(8).map_err(sql_error)?;
            let id = TenantId::parse(&id).map_err(|_| sql_error(bad_column(8, "tenant id")))?;
            let row = verified_version(key, &id, stored_version(row).map_err(sql_error)?)?;
            sum.add(key, &row.mac);
        }
        let mut stmt = conn
            .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"))
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let row = stored_token(row).map_err(sql_error)?;
            key.verify_token(&row.record, row.generation, &row.mac)?;
            sum.add(key, &row.mac);
        }
    } else {
        let mut stmt = conn
            .prepare_cached(
                "SELECT mac FROM tenants UNION ALL SELECT mac FROM key_versions \
                 UNION ALL SELECT mac FROM tokens",
            )
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mac: Option<Vec<u8>> = row.get(0).map_err(sql_error)?;
            sum.add(key, &mac.unwrap_or_default());
        }
    }
    if sum.digest != anchor.digest {
        return Err(integrity(
            "the row anchor does not match the rows: a tenant, key-version or token row was \
             deleted, inserted, or replaced by an earlier copy",
        ));
    }
    Ok(anchor.counter)
}

/// The MAC'd rows of one write transaction: every row written gets the next generation and
/// its MAC, and the anchor follows, written back by [`Rows::finish`] in the same transaction.
struct Rows<'t> {
    tx: &'t Connection,
    key: &'t RowKey,
    anchor: Anchor,
}

impl<'t> Rows<'t> {
    fn begin(tx: &'t Connection, key: &'t RowKey, seen: u64) -> Result<Self> {
        Ok(Self {
            tx,
            key,
            anchor: load_anchor(tx, key, seen)?,
        })
    }

    /// Takes a replaced or deleted row's MAC out of the digest.
    fn forget(&mut self, old_mac: &[u8]) {
        self.anchor.remove(self.key, old_mac);
    }

    /// The generation and MAC for a row written now, the old MAC (if it replaces a row) out
    /// of the digest and the new one in.
    fn next(
        &mut self,
        old_mac: Option<&[u8]>,
        mac: impl FnOnce(&RowKey, u64) -> [u8; 32],
    ) -> (i64, [u8; 32]) {
        if let Some(old) = old_mac {
            self.forget(old);
        }
        let generation = self.anchor.next_generation();
        let mac = mac(self.key, generation);
        self.anchor.add(self.key, &mac);
        (i64_of(generation), mac)
    }

    /// Writes a tenant row: inserts it (`old_mac` None; fails if the id exists) or replaces
    /// the one whose MAC was `old_mac`.
    fn put_tenant(&mut self, tenant: &TenantRecord, old_mac: Option<&[u8]>) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.tenant_mac(tenant, g));
        let sql = if old_mac.is_some() {
            "UPDATE tenants SET state = ?2, primary_version = ?3, created_at = ?4, \
             rotation_period_seconds = ?5, max_encryptions = ?6, deletion_time = ?7, \
             destroyed_at = ?8, generation = ?9, mac = ?10 WHERE tenant_id = ?1"
        } else {
            "INSERT INTO tenants (tenant_id, state, primary_version, created_at, \
             rotation_period_seconds, max_encryptions, deletion_time, destroyed_at, generation, \
             mac) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)"
        };
        let changed = self
            .tx
            .prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.execute(params![
                    tenant.tenant_id.as_str(),
                    tenant.state.code(),
                    tenant.primary_version,
                    tenant.created_at,
                    i64_of(tenant.rotation_period_seconds),
                    i64_of(tenant.max_encryptions),
                    tenant.deletion_time,
                    tenant.destroyed_at,
                    generation,
                    mac.as_slice()
                ])
            })
            .map_err(sql_error)?;
        if changed != 1 {
            return Err(Error::ConcurrentChange);
        }
        Ok(())
    }

    /// Writes a key-version row's metadata (never its wrapped key): inserts or replaces, as
    /// [`Rows::put_tenant`].
    fn put_version(
        &mut self,
        id: &TenantId,
        version: &KeyVersionRecord,
        old_mac: Option<&[u8]>,
    ) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.key_version_mac(id, version, g));
        let sql = if old_mac.is_some() {
            "UPDATE key_versions SET state = ?3, created_at = ?4, encryptions = ?5, \
             generation = ?6, mac = ?7 WHERE tenant_id = ?1 AND version = ?2"
        } else {
            "INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions, \
             generation, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        };
        let changed = self
            .tx
            .prepare_cached(sql)
            .and_then(|mut stmt| {
                stmt.execute(params![
                    id.as_str(),
                    version.version,
                    version.state.code(),
                    version.created_at,
                    i64_of(version.encryptions),
                    generation,
                    mac.as_slice()
                ])
            })
            .map_err(sql_error)?;
        if changed != 1 {
            return Err(Error::ConcurrentChange);
        }
        Ok(())
    }

    /// Writes a token row: inserts or replaces, as [`Rows::put_tenant`].
    fn put_token(&mut self, token: &TokenRecord, old_mac: Option<&[u8]>) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.token_mac(token, g));
        let sql = if old_mac.is_some() {
            "UPDATE tokens SET name = ?2, hash = ?3, role = ?4, tenants = ?5, operations = ?6, \
             created_at = ?7, expires_at = ?8, revoked_at = ?9, generation = ?10, mac = ?11, \
             quarantined_at = ?12 WHERE id = ?1"
        } else {
            "INSERT INTO tokens (id, name, hash, role, tenants, operations, created_at, \
             expires_at, revoked_at, generation, mac, quarantined_at) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"
        };
        let changed = self
            .tx
            .execute(
                sql,
                params![
                    token.id,
                    token.name,
                    token.hash.as_slice(),
                    token.role,
                    token.tenants,
                    token.operations,
                    token.created_at,
                    token.expires_at,
                    token.revoked_at,
                    generation,
                    mac.as_slice(),
                    token.quarantined_at
                ],
            )
            .map_err(sql_error)?;
        if changed != 1 {
            return Err(Error::ConcurrentChange);
        }
        Ok(())
    }

    /// Writes the anchor back; returns its counter.
    fn finish(self) -> Result<u64> {
        store_anchor(self.tx, self.key, &self.anchor)?;
        Ok(self.anchor.counter)
    }
}

impl SqliteKeyStore {
    /// Opens (creating if needed, with mode 0600) `keys.db` at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::create_private_file(path)?;
        let mut conn = Connection::open(path).map_err(sql_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql_error)?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sql_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql_error)?;
        super::migrations::migrate(&mut conn)
            .map_err(sql_error)?
            .map_err(Error::Internal)?;
        #[cfg(feature = "test-seams")]
        if let Some(pages) = std::env::var_os(super::TEST_MAX_PAGES_ENV) {
            // Test builds only: a size limit that makes writes fail as on a full disk.
            conn.pragma_update(None, "max_page_count", pages.to_string_lossy().as_ref())
                .map_err(sql_error)?;
        }
        let shred_pending: bool = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM shred_pending)", [], |row| {
                row.get(0)
            })
            .map_err(sql_error)?;
        let data_version = conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(sql_error)?;
        let store = Self::with_connection(conn, path, data_version);
        if shred_pending {
            // A destruction was committed but the process died before its WAL was
            // checkpointed and truncated: the destroyed key's bytes may still lie in
            // keys.db-wal (or in free pages). Finish the one shred sequence before anything
            // else reads or copies the files.
            tracing::warn!(
                "key store: finishing an interrupted destruction (rebuild and WAL truncate)"
            );
            store.checkpoint_truncate()?;
        }
        Ok(store)
    }

    fn with_connection(conn: Connection, path: &Path, data_version: i64) -> Self {
        let anchor_published = Arc::new(AtomicU64::new(0));
        Self {
            inner: Mutex::new(Inner {
                conn,
                data_version,
                checks_done: 0,
                row_key: None,
                integrity: None,
                anchor_seen: 0,
                anchor_published: Arc::clone(&anchor_published),
            }),
            checks_started: AtomicU64::new(0),
            changes: wal_watch::WalWatch::new(path),
            anchor_published,
            reservations: Mutex::new(Vec::new()),
        }
    }

    /// Opens an existing `keys.db` read-only (a backup's copy), changing nothing on disk: no
    /// migration, no pragma that writes. Refuses a schema newer than this binary's.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_error)?;
        super::migrations::check_readable(&conn)
            .map_err(sql_error)?
            .map_err(Error::Internal)?;
        Ok(Self::with_connection(conn, path, 0))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-done transaction behind (rusqlite
        // rolls back on drop), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut inner = self.lock();
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error)?;
        let value = f(&tx)?;
        tx.commit().map_err(sql_error)?;
        Ok(value)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let inner = self.lock();
        f(&inner.conn).map_err(sql_error)
    }

    /// A read of MAC'd rows: refused while the store refuses to serve rows or has no key.
    fn read_rows<T>(&self, f: impl FnOnce(&Connection, &RowKey) -> Result<T>) -> Result<T> {
        let inner = self.lock();
        let key = inner.serving_key()?;
        f(&inner.conn, key)
    }

    /// A write transaction of MAC'd rows: `f` writes through [`Rows`], whose anchor is
    /// written back in the same transaction.
    fn write_rows<T>(&self, f: impl FnOnce(&mut Rows<'_>) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        guard.serving_key()?;
        let inner = &mut *guard;
        let key = inner
            .row_key
            .as_ref()
            .ok_or_else(|| Error::internal("key store: the row key is not installed"))?;
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error)?;
        let mut rows = Rows::begin(&tx, key, inner.anchor_seen)?;
        let value = f(&mut rows)?;
        let counter = rows.finish()?;
        tx.commit().map_err(sql_error)?;
        inner.saw_counter(counter);
        Ok(value)
    }
}

fn require_tenant(tx: &Connection, key: &RowKey, id: &TenantId) -> Result<TenantRecord> {
    Ok(require_tenant_stored(tx, key, id)?.record)
}

fn require_tenant_stored(
    tx: &Connection,
    key: &RowKey,
    id: &TenantId,
) -> Result<Stored<TenantRecord>> {
    load_tenant_stored(tx, key, id)?.ok_or(Error::NotFound("tenant"))
}

impl MasterKeyStore for SqliteKeyStore {
    fn master_versions(&self) -> Result<Vec<MasterVersionRecord>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT version, check_value, created_at, retired_at FROM master_keys \
                 ORDER BY version",
            )?;
            stmt.query_map([], |row| {
                Ok(MasterVersionRecord {
                    version: u32_of(row.get(0)?)?,
                    check_value: row.get(1)?,
                    created_at: row.get(2)?,
                    retired_at: row.get(3)?,
                })
            })?
            .collect()
        })
    }

    fn insert_master_version(&self, record: &MasterVersionRecord) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO master_keys (version, check_value, created_at, retired_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    record.version,
                    record.check_value,
                    record.created_at,
                    record.retired_at
                ],
            )
            .map_err(sql_error)?;
            Ok(())
        })
    }

    fn retire_master_version(&self, version: u32, at: i64) -> Result<bool> {
        self.write(|tx| {
            // One statement, so a key wrapped under `version` by another process after the
            // caller's last count keeps the version alive.
            tx.execute(
                "UPDATE master_keys SET retired_at = ?2 WHERE version = ?1 AND retired_at IS NULL \
                 AND NOT EXISTS (SELECT 1 FROM wrapped_keys WHERE master_version = ?1) \
                 AND NOT EXISTS (SELECT 1 FROM audit_key WHERE master_version = ?1)",
                params![version, at],
            )
            .map_err(sql_error)?;
            let retired: Option<i64> = tx
                .query_row(
                    "SELECT retired_at FROM master_keys WHERE version = ?1",
                    [version],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error)?
                .flatten();
            Ok(retired.is_some())
        })
    }

    fn count_wrapped_under(&self, master_version: u32) -> Result<u64> {
        self.read(|conn| {
            let keys: i64 = conn.query_row(
                "SELECT COUNT(*) FROM wrapped_keys WHERE master_version = ?1",
                [master_version],
                |row| row.get(0),
            )?;
            let audit: i64 = conn.query_row(
                "SELECT COUNT(*) FROM audit_key WHERE master_version = ?1",
                [master_version],
                |row| row.get(0),
            )?;
            Ok(u64_of(keys + audit))
        })
    }

    fn wrapped_under(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(TenantId, u32, WrappedTenantKey)>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT tenant_id, version, wrapped_key FROM wrapped_keys \
                 WHERE master_version = ?1 LIMIT ?2",
            )?;
            stmt.query_map(params![master_version, limit as i64], |row| {
                let id: String = row.get(0)?;
                Ok((
                    TenantId::parse(&id).map_err(|_| bad_column(0, "tenant id"))?,
                    u32_of(row.get(1)?)?,
                    WrappedTenantKey {
                        master_version,
                        bytes: row.get(2)?,
                    },
                ))
            })?
            .collect()
        })
    }

    fn rewrap(&self, batch: &[Rewrapping]) -> Result<usize> {
        self.write(|tx| {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE wrapped_keys SET master_version = ?4, wrapped_key = ?5 \
                     WHERE tenant_id = ?1 AND version = ?2 AND master_version = ?3",
                )
                .map_err(sql_error)?;
            let mut done = 0;
            for item in batch {
                done += stmt
                    .execute(params![
                        item.tenant_id.as_str(),
                        item.version,
                        item.from_master,
                        item.wrapped.master_version,
                        item.wrapped.bytes
                    ])
                    .map_err(sql_error)?;
            }
            Ok(done)
        })
    }

    fn audit_key(&self) -> Result<Option<WrappedTenantKey>> {
        self.read(|conn| {
            conn.query_row(
                "SELECT master_version, wrapped_key FROM audit_key WHERE id = 1",
                [],
                |row| {
                    Ok(WrappedTenantKey {
                        master_version: u32_of(row.get(0)?)?,
                        bytes: row.get(1)?,
                    })
                },
            )
            .optional()
        })
    }

    fn put_audit_key(
        &self,
        wrapped: &WrappedTenantKey,
        replace_master: Option<u32>,
    ) -> Result<bool> {
        self.write(|tx| {
            let changed = match replace_master {
                None => tx.execute(
                    "INSERT OR IGNORE INTO audit_key (id, master_version, wrapped_key) \
                     VALUES (1, ?1, ?2)",
                    params![wrapped.master_version, wrapped.bytes],
                ),
                Some(old) => tx.execute(
                    "UPDATE audit_key SET master_version = ?1, wrapped_key = ?2 \
                     WHERE id = 1 AND master_version = ?3",
                    params![wrapped.master_version, wrapped.bytes, old],
                ),
            }
            .map_err(sql_error)?;
            Ok(changed == 1)
        })
    }

    fn row_mac_upgrade_due(&self) -> Result<bool> {
        self.lock()
            .conn
            .query_row(super::ROW_MAC_UPGRADE_DUE, [], |row| row.get(0))
            .map_err(sql_error)
    }

    fn set_row_key(&self, key: RowKey, allow_upgrade: bool) -> Result<Option<u64>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error)?;
        let pending: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM row_mac_upgrade)", [], |row| {
                row.get(0)
            })
            .map_err(sql_error)?;
        let has_anchor: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM row_anchor)", [], |row| {
                row.get(0)
            })
            .map_err(sql_error)?;
        if pending && (has_anchor || !allow_upgrade) {
            // Only a store that never had row MACs may be upgraded: a mark beside an anchor,
            // or one the caller's record says was already served, is a rewrite of keys.db.
            let e = integrity(
                "keys.db asks for the upgrade to row MACs, but it was upgraded before: it was \
                 rewritten by someone without the master key; restore it from a backup",
            );
            inner.integrity = Some(e.to_string());
            return Err(e);
        }
        let mut upgraded = None;
        if pending {
            let rows = mac_existing_rows(&tx, &key)?;
            upgraded = Some(rows);
            tx.execute("DELETE FROM row_mac_upgrade", [])
                .map_err(sql_error)?;
            tx.commit().map_err(sql_error)?;
            tracing::warn!(
                rows,
                "key store upgraded to row MACs: every existing tenant, key-version and token \
                 row was MAC'd once, as it stood (docs/ARCHITECTURE.md, \"Key-store row MACs\")"
            );
        } else {
            tx.commit().map_err(sql_error)?;
        }
        match full_check(&inner.conn, &key, 0, true) {
            Ok(counter) => {
                inner.saw_counter(counter);
                inner.integrity = None;
                inner.row_key = Some(key);
                Ok(upgraded)
            }
            Err(e) => {
                // Nothing is served until a later check passes.
                inner.integrity = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// The schema upgrade to row MACs (migration 5, finished once the key is known): every row
/// gets a generation and its MAC, and the anchor is created. Trusts the rows as they stand.
/// Returns how many rows it MAC'd.
fn mac_existing_rows(tx: &Connection, key: &RowKey) -> Result<u64> {
    let mut anchor = Anchor::empty();
    let mut count = 0u64;
    let tenants = tx
        .prepare(&format!("SELECT {TENANT_COLUMNS} FROM tenants"))
        .and_then(|mut stmt| {
            stmt.query_map([], tenant_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    for tenant in &tenants {
        let generation = anchor.next_generation();
        let mac = key.tenant_mac(tenant, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE tenants SET generation = ?2, mac = ?3 WHERE tenant_id = ?1",
            params![
                tenant.tenant_id.as_str(),
                i64_of(generation),
                mac.as_slice()
            ],
        )
        .map_err(sql_error)?;
        count += 1;
    }
    let versions = tx
        .prepare(&format!(
            "SELECT {VERSION_COLUMNS}, v.tenant_id FROM key_versions v LEFT JOIN wrapped_keys w \
             ON w.tenant_id = v.tenant_id AND w.version = v.version"
        ))
        .and_then(|mut stmt| {
            stmt.query_map([], |row| {
                let id: String = row.get(8)?;
                Ok((
                    TenantId::parse(&id).map_err(|_| bad_column(8, "tenant id"))?,
                    version_from_row(row)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    for (id, version) in &versions {
        let generation = anchor.next_generation();
        let mac = key.key_version_mac(id, version, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE key_versions SET generation = ?3, mac = ?4 WHERE tenant_id = ?1 AND version = ?2",
            params![id.as_str(), version.version, i64_of(generation), mac.as_slice()],
        )
        .map_err(sql_error)?;
        count += 1;
    }
    let tokens = tx
        .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"))
        .and_then(|mut stmt| {
            stmt.query_map([], token_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(sql_error)?;
    for token in &tokens {
        let generation = anchor.next_generation();
        let mac = key.token_mac(token, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE tokens SET generation = ?2, mac = ?3 WHERE id = ?1",
            params![token.id, i64_of(generation), mac.as_slice()],
        )
        .map_err(sql_error)?;
        count += 1;
    }
    store_anchor(tx, key, &anchor)?;
    Ok(count)
}

impl TenantStore for SqliteKeyStore {
    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()> {
        let wrapped = first
            .wrapped
            .as_ref()
            .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
        self.write_rows(|rows| insert_tenant(rows, tenant, first, wrapped))?;
        super::failpoint(super::FAILPOINT_AFTER_KEY_COMMIT);
        Ok(())
    }

    fn create_tenants(&self, tenants: &[(TenantRecord, KeyVersionRecord)]) -> Result<()> {
        self.write_rows(|rows| {
            for (tenant, first) in tenants {
                let wrapped = first
                    .wrapped
                    .as_ref()
                    .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
                insert_tenant(rows, tenant, first, wrapped)?;
            }
            Ok(())
        })
    }

    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>> {
        self.read_rows(|conn, key| load_tenant(conn, key, id))
    }

    fn tenant_snapshot(
        &self,
        id: &TenantId,
    ) -> Result<Option<(TenantRecord, Vec<KeyVersionRecord>)>> {
        let mut guard = self.lock();
        guard.serving_key()?;
        let inner = &mut *guard;
        let key = inner
            .row_key
            .as_ref()
            .ok_or_else(|| Error::internal("key store: the row key is not installed"))?;
        // A read transaction: both reads see the same committed state.
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql_error)?;
        let Some(tenant) = load_tenant(&tx, key, id)? else {
            return Ok(None);
        };
        let versions = load_versions(&tx, key, id)?;
        tx.commit().map_err(sql_error)?;
        Ok(Some((tenant, versions)))
    }

    fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>> {
        self.read_rows(|conn, key| {
            let rows = conn
                .prepare(&format!(
                    "SELECT {TENANT_COLUMNS}, generation, mac FROM tenants WHERE tenant_id > ?1 \
                     ORDER BY tenant_id LIMIT ?2"
                ))
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![after.map(TenantId::as_str).unwrap_or(""), limit as i64],
                        stored_tenant,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(sql_error)?;
            rows.into_iter()
                .map(|row| verified_tenant(key, row).map(|row| row.record))
                .collect()
        })
    }

    fn key_versions(&self, id: &TenantId) -> Result<Vec<KeyVersionRecord>> {
        self.read_rows(|conn, key| load_versions(conn, key, id))
    }

    fn add_key_version(
        &self,
        id: &TenantId,
        expected_primary: u32,
        version: &KeyVersionRecord,
    ) -> Result<TenantRecord> {
        let wrapped = version
            .wrapped
            .as_ref()
            .ok_or_else(|| Error::internal("a new version needs a wrapped key"))?;
        self.write_rows(|rows| {
            let stored = require_tenant_stored(rows.tx, rows.key, id)?;
            let mut tenant = stored.record;
            lifecycle::check_rotation(tenant.state, tenant.primary_version, expected_primary)?;
            insert_version(rows, id, version, wrapped)?;
            // The primary read above (compare-and-set: the transaction holds the write lock
            // from that read to this write, and the row's MAC proved what was read).
            tenant.primary_version = version.version;
            rows.put_tenant(&tenant, Some(&stored.mac))?;
            Ok(tenant)
        })
    }

    fn set_tenant_state(
        &self,
        id: &TenantId,
        transition: TenantTransition,
        now: i64,
    ) -> Result<TenantRecord> {
        let (record, shredded) = self.write_rows(|rows| {
            let stored = require_tenant_stored(rows.tx, rows.key, id)?;
            let mut tenant = stored.record;
            let change =
                lifecycle::tenant_transition(tenant.state, tenant.deletion_time, transition, now)?;
            if change.shred {
                shred_rows(rows, id, None, change.destroyed_at.unwrap_or(now))?;
            } else {
                tenant.state = change.state;
                tenant.deletion_time = change.deletion_time;
                rows.put_tenant(&tenant, Some(&stored.mac))?;
            }
            Ok((require_tenant(rows.tx, rows.key, id)?, change.shred))
        })?;
        if shredded {
            self.checkpoint_truncate()?;
        }
        Ok(record)
    }

    fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord> {
        self.write_rows(|rows| {
            let stored = require_tenant_stored(rows.tx, rows.key, id)?;
            let mut tenant = stored.record;
            lifecycle::require_not_destroyed(tenant.state)?;
            // Stored as SQLite integers: the same saturation the row is read back with.
            tenant.rotation_period_seconds = u64_of(i64_of(rotation_period_seconds));
            tenant.max_encryptions = u64_of(i64_of(max_encryptions));
            rows.put_tenant(&tenant, Some(&stored.mac))?;
            Ok(tenant)
        })
    }

    fn set_key_version_state(
        &self,
        id: &TenantId,
        version: u32,
        transition: VersionTransition,
    ) -> Result<KeyVersionRecord> {
        self.write_rows(|rows| {
            let tenant = require_tenant(rows.tx, rows.key, id)?;
            let current = load_version_stored(rows.tx, rows.key, id, version)?;
            let to = lifecycle::version_transition(
                tenant.state,
                tenant.primary_version,
                version,
                current.as_ref().map(|v| v.record.state),
                transition,
            )?;
            if to == KeyVersionState::Destroyed {
                shred_rows(rows, id, Some(version), 0)?;
            } else if let Some(current) = current {
                let mut record = current.record;
                record.state = to;
                rows.put_version(id, &record, Some(&current.mac))?;
            }
            load_version(rows.tx, rows.key, id, version)?.ok_or(Error::NotFound("key version"))
        })
        .and_then(|record| {
            if record.state == KeyVersionState::Destroyed {
                self.checkpoint_truncate()?;
            }
            Ok(record)
        })
    }

    fn reserve_encryptions(&self, id: &TenantId, version: u32, count: u64) -> Result<u64> {
        // Group commit: reservations that queue while the connection is busy are written by
        // whichever of their callers gets the connection first, in one transaction (one
        // fsync). A caller whose reservation a previous leader wrote just takes its result.
        let ticket: Ticket = Arc::new(Mutex::new(None));
        lock_plain(&self.reservations).push(PendingReservation {
            id: id.clone(),
            version,
            count,
            ticket: Arc::clone(&ticket),
        });
        let mut guard = self.lock();
        if let Some(result) = lock_plain(&ticket).take() {
            return result;
        }
        let batch = std::mem::take(&mut *lock_plain(&self.reservations));
        let written = (|| {
            let inner = &mut *guard;
            if let Some(why) = &inner.integrity {
                return Err(Error::StoreIntegrity(why.clone()));
            }
            let key = inner
                .row_key
                .as_ref()
                .ok_or_else(|| Error::internal("key store: the row key is not installed"))?;
            let tx = inner
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_error)?;
            let mut rows = Rows::begin(&tx, key, inner.anchor_seen)?;
            let mut totals = Vec::with_capacity(batch.len());
            for item in &batch {
                // A row that fails its MAC fails its own reservation only: the count it holds
                // is not trusted, and the other tenants' reservations go ahead.
                let total = match load_version_stored(rows.tx, rows.key, &item.id, item.version) {
                    Ok(Some(stored)) => {
                        let mut record = stored.record;
                        record.encryptions =
                            u64_of(i64_of(record.encryptions.saturating_add(item.count)));
                        rows.put_version(&item.id, &record, Some(&stored.mac))?;
                        Ok(record.encryptions)
                    }
                    Ok(None) => Err(Error::NotFound("key version")),
                    Err(e @ Error::StoreIntegrity(_)) => Err(e),
                    Err(e) => return Err(e),
                };
                totals.push(total);
            }
            let counter = rows.finish()?;
            tx.commit().map_err(sql_error)?;
            inner.saw_counter(counter);
            Ok::<_, Error>(totals)
        })();
        match written {
            Ok(totals) => {
                for (item, total) in batch.iter().zip(totals) {
                    *lock_plain(&item.ticket) = Some(total);
                }
            }
            Err(e) => {
                let shared = |e: &Error| match e {
                    Error::StoreIntegrity(why) => Error::StoreIntegrity(why.clone()),
                    other => Error::Internal(other.to_string()),
                };
                for item in &batch {
                    *lock_plain(&item.ticket) = Some(Err(shared(&e)));
                }
            }
        }
        drop(guard);
        let result = lock_plain(&ticket).take();
        result.unwrap_or_else(|| Err(Error::internal("reservation was not written")))
    }

    fn tenants_due(&self, now: i64, budget_margin: f64) -> Result<DueTenants> {
        self.read(|conn| {
            let mut due = DueTenants::default();
            let mut stmt = conn.prepare(
                "SELECT t.tenant_id FROM tenants t JOIN key_versions v \
                 ON v.tenant_id = t.tenant_id AND v.version = t.primary_version \
                 WHERE t.state IN (?1, ?2) AND ( \
                   (t.rotation_period_seconds > 0 AND v.created_at + t.rotation_period_seconds <= ?3) \
                   OR v.encryptions >= CAST(t.max_encryptions * ?4 AS INTEGER)) \
                 ORDER BY t.tenant_id",
            )?;
            let rows = stmt.query_map(
                params![
                    lifecycle::ROTATABLE[0].code(),
                    lifecycle::ROTATABLE[1].code(),
                    now,
                    1.0 - budget_margin
                ],
                |row| row.get::<_, String>(0),
            )?;
            for id in rows {
                due.rotate
                    .push(TenantId::parse(&id?).map_err(|_| bad_column(0, "tenant id"))?);
            }
            let mut stmt = conn.prepare(
                "SELECT tenant_id FROM tenants WHERE state = ?1 AND deletion_time <= ?2 \
                 ORDER BY tenant_id",
            )?;
            let rows = stmt.query_map(
                params![TenantState::PendingDeletion.code(), now],
                |row| row.get::<_, String>(0),
            )?;
            for id in rows {
                due.destroy
                    .push(TenantId::parse(&id?).map_err(|_| bad_column(0, "tenant id"))?);
            }
            Ok(due)
        })
    }
}

impl TokenStore for SqliteKeyStore {
    fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.write_rows(|rows| rows.put_token(token, None))
    }

    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>> {
        // The authenticator's lookup: the row's MAC covers its hash, role, scope, operations,
        // expiry and revocation, so a row a database writer forged, widened or un-revoked is
        // refused here, before any caller is built from it.
        self.read_rows(|conn, key| {
            conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([hash.as_slice()], stored_token).optional())
            .map_err(sql_error)?
            .map(|row| verified_token(key, row))
            .transpose()
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read_rows(|conn, key| {
            conn.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
            ))
            .and_then(|mut stmt| {
                stmt.query_map([], stored_token)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_error)?
            .into_iter()
            .map(|row| verified_token(key, row))
            .collect()
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> Result<bool> {
        self.write_rows(|rows| {
            let Some(stored) = load_token_stored(rows.tx, rows.key, id)? else {
                return Ok(false);
            };
            if stored.record.revoked_at.is_some() {
                return Ok(false);
            }
            let mut token = stored.record;
            token.revoked_at = Some(at);
            rows.put_token(&token, Some(&stored.mac))?;
            Ok(true)
        })
    }

    fn set_token_quarantine(&self, id: &str, at: Option<i64>) -> Result<bool> {
        self.write_rows(|rows| {
            let Some(stored) = load_token_stored(rows.tx, rows.key, id)? else {
                return Ok(false);
            };
            if stored.record.quarantined_at.is_some() == at.is_some() {
                return Ok(false);
            }
            let mut token = stored.record;
            token.quarantined_at = at;
            rows.put_token(&token, Some(&stored.mac))?;
            Ok(true)
        })
    }
}

impl ChangeDetection for SqliteKeyStore {
    fn anchor_counter(&self) -> u64 {
        self.anchor_published.load(Ordering::Acquire)
    }

    fn change_generation(&self) -> Result<u64> {
        if let Some(generation) = self.changes.unchanged_since(self.changes.header()) {
            return Ok(generation);
        }
        // Single flight: a check that started after this call began is as good as our own,
        // so callers queued on the mutex while one check ran share the next one.
        let arrival = self.checks_started.load(Ordering::Acquire);
        let inner = self.lock();
        self.generation_check(inner, arrival)
    }

    fn try_change_generation(&self) -> Option<Result<u64>> {
        // Nothing committed since the last full check: answered without the connection, so
        // a call never waits for (or hands off around) a write that holds it.
        if let Some(generation) = self.changes.unchanged_since(self.changes.header()) {
            return Some(Ok(generation));
        }
        let arrival = self.checks_started.load(Ordering::Acquire);
        let inner = match self.inner.try_lock() {
            Ok(inner) => inner,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(self.generation_check(inner, arrival))
    }
}

impl BackupStore for SqliteKeyStore {
    fn snapshot_to(&self, dest: &Path) -> Result<()> {
        let inner = self.lock();
        super::sqlite_backup::copy_database(&inner.conn, dest, sql_error)
    }

    fn counts(&self) -> Result<StoreCounts> {
        self.read(|conn| {
            let tenants: i64 = conn.query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))?;
            let wrapped: i64 =
                conn.query_row("SELECT COUNT(*) FROM wrapped_keys", [], |r| r.get(0))?;
            Ok(StoreCounts {
                tenants: u64_of(tenants),
                wrapped_keys: u64_of(wrapped),
            })
        })
    }

    fn for_each_wrapped_key(
        &self,
        f: &mut dyn FnMut(&TenantId, u32, &WrappedTenantKey) -> Result<()>,
    ) -> Result<u64> {
        // `f` runs with the connection locked: it must not call back into this store.
        let inner = self.lock();
        let mut stmt = inner
            .conn
            .prepare(
                "SELECT tenant_id, version, master_version, wrapped_key FROM wrapped_keys \
                 ORDER BY tenant_id, version",
            )
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        let mut count = 0;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let id: String = row.get(0).map_err(sql_error)?;
            let id = TenantId::parse(&id).map_err(|_| sql_error(bad_column(0, "tenant id")))?;
            let version = u32_of(row.get(1).map_err(sql_error)?).map_err(sql_error)?;
            let wrapped = WrappedTenantKey {
                master_version: u32_of(row.get(2).map_err(sql_error)?).map_err(sql_error)?,
                bytes: row.get(3).map_err(sql_error)?,
            };
            f(&id, version, &wrapped)?;
            count += 1;
        }
        Ok(count)
    }

    fn destroyed_items(&self) -> Result<Vec<ShredItem>> {
        // Rows whose MACs check out only: the shred ledger records (and re-applies) what this
        // returns, so a state a database writer forged must not reach it.
        self.read_rows(|conn, key| {
            let mut items = Vec::new();
            let tenants = conn
                .prepare(&format!(
                    "SELECT {TENANT_COLUMNS}, generation, mac FROM tenants WHERE state = ?1"
                ))
                .and_then(|mut stmt| {
                    stmt.query_map([TenantState::Destroyed.code()], stored_tenant)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(sql_error)?;
            for row in tenants {
                items.push(ShredItem {
                    tenant_id: verified_tenant(key, row)?.record.tenant_id,
                    version: None,
                });
            }
            let versions = conn
                .prepare(&format!(
                    "SELECT {VERSION_COLUMNS}, v.tenant_id FROM key_versions v \
                     LEFT JOIN wrapped_keys w ON w.tenant_id = v.tenant_id \
                     AND w.version = v.version JOIN tenants t ON t.tenant_id = v.tenant_id \
                     WHERE v.state = ?1 AND t.state != ?2"
                ))
                .and_then(|mut stmt| {
                    stmt.query_map(
                        params![
                            KeyVersionState::Destroyed.code(),
                            TenantState::Destroyed.code()
                        ],
                        |row| {
                            let id: String = row.get(8)?;
                            Ok((
                                TenantId::parse(&id).map_err(|_| bad_column(8, "tenant id"))?,
                                stored_version(row)?,
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(sql_error)?;
            for (id, row) in versions {
                let version = verified_version(key, &id, row)?.record.version;
                items.push(ShredItem {
                    tenant_id: id,
                    version: Some(version),
                });
            }
            Ok(items)
        })
    }

    fn shred(&self, items: &[ShredItem], now: i64) -> Result<Vec<ShredItem>> {
        let done = self.write_rows(|rows| {
            let mut done = Vec::new();
            for item in items {
                let Some(tenant) = load_tenant(rows.tx, rows.key, &item.tenant_id)? else {
                    // A tenant destroyed after this store's copy was taken (a restored older
                    // backup): its id becomes a tombstone here too, so CreateTenant refuses it
                    // like any destroyed tenant instead of creating one the next start shreds.
                    if item.version.is_none() {
                        rows.put_tenant(
                            &TenantRecord {
                                tenant_id: item.tenant_id.clone(),
                                state: TenantState::Destroyed,
                                primary_version: 0,
                                created_at: now,
                                rotation_period_seconds: 0,
                                max_encryptions: 0,
                                deletion_time: None,
                                destroyed_at: Some(now),
                            },
                            None,
                        )?;
                        done.push(item.clone());
                    }
                    continue;
                };
                if tenant.state == TenantState::Destroyed {
                    continue;
                }
                if let Some(version) = item.version {
                    let Some(record) = load_version(rows.tx, rows.key, &item.tenant_id, version)?
                    else {
                        continue;
                    };
                    if record.state == KeyVersionState::Destroyed && record.wrapped.is_none() {
                        continue;
                    }
                }
                shred_rows(rows, &item.tenant_id, item.version, now)?;
                done.push(item.clone());
            }
            Ok(done)
        })?;
        if !done.is_empty() {
            self.checkpoint_truncate()?;
        }
        Ok(done)
    }

    fn replace_tenant(&self, tenant: &TenantRecord, versions: &[KeyVersionRecord]) -> Result<()> {
        let id = tenant.tenant_id.as_str();
        self.write_rows(|rows| {
            mark_shred_pending(rows.tx)?;
            let live = load_tenant_stored(rows.tx, rows.key, &tenant.tenant_id)?;
            if let Some(live) = &live {
                lifecycle::require_not_destroyed(live.record.state)?;
            }
            // The rows replaced, their MACs checked: a destroyed version's state is proven,
            // and each MAC leaves the digest.
            let current = load_versions_stored(rows.tx, rows.key, &tenant.tenant_id)?;
            if let Some(v) = versions.iter().find(|v| {
                v.wrapped.is_some()
                    && current.iter().any(|c| {
                        c.record.version == v.version
                            && c.record.state == KeyVersionState::Destroyed
                    })
            }) {
                return Err(Error::FailedPrecondition(format!(
                    "key version {} of tenant {id} was destroyed; it cannot come back",
                    v.version
                )));
            }
            for old in &current {
                rows.forget(&old.mac);
            }
            rows.tx
                .execute("DELETE FROM wrapped_keys WHERE tenant_id = ?1", [id])
                .map_err(sql_error)?;
            rows.tx
                .execute("DELETE FROM key_versions WHERE tenant_id = ?1", [id])
                .map_err(sql_error)?;
            rows.put_tenant(tenant, live.as_ref().map(|l| l.mac.as_slice()))?;
            for version in versions {
                let version =
                    &crate::store::counter_not_behind(version, current.iter().map(|c| &c.record));
                rows.put_version(&tenant.tenant_id, version, None)?;
                if let Some(wrapped) = &version.wrapped {
                    rows.tx
                        .execute(
                            "INSERT INTO wrapped_keys (tenant_id, version, master_version, \
                             wrapped_key) VALUES (?1, ?2, ?3, ?4)",
                            params![id, version.version, wrapped.master_version, wrapped.bytes],
                        )
                        .map_err(sql_error)?;
                }
            }
            Ok(())
        })?;
        // Rolled-back versions' wrapped keys were deleted (zeroed by secure_delete): leave no
        // copy of them in the log either.
        self.checkpoint_truncate()
    }

    fn shred_ledger_head(&self) -> Result<Option<LedgerHead>> {
        self.read(|conn| {
            conn.query_row(
                "SELECT entries, head_mac FROM shred_ledger_head WHERE id = 1",
                [],
                |row| {
                    Ok(LedgerHead {
                        entries: u64_of(row.get(0)?),
                        head_mac: row.get(1)?,
                    })
                },
            )
            .optional()
        })
    }

    fn set_shred_ledger_head(&self, head: &LedgerHead) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO shred_ledger_head (id, entries, head_mac) VALUES (1, ?1, ?2) \
                 ON CONFLICT(id) DO UPDATE SET entries = excluded.entries, \
                 head_mac = excluded.head_mac WHERE excluded.entries > shred_ledger_head.entries",
                params![i64_of(head.entries), head.head_mac],
            )
            .map_err(sql_error)?;
            Ok(())
        })
    }

    fn unreconciled_key_changes(&self) -> Result<((i64, u64), Vec<KeyChange>)> {
        let mut inner = self.lock();
        // One read transaction: the watermark and the changes it selects agree.
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql_error)?;
        let (secs, seq): (i64, i64) = tx
            .query_row(
                "SELECT through_secs, audit_seq FROM audit_reconciled WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(sql_error)?;
        let changes = {
            let mut stmt = tx
                .prepare(
                    "SELECT v.tenant_id, v.version, v.created_at FROM key_versions v \
                     WHERE v.created_at >= ?1 AND NOT EXISTS (SELECT 1 FROM \
                     audit_reconciled_boundary b WHERE b.tenant_id = v.tenant_id \
                     AND b.version = v.version) ORDER BY v.created_at, v.tenant_id, v.version",
                )
                .map_err(sql_error)?;
            stmt.query_map([secs], |row| {
                let id: String = row.get(0)?;
                Ok(KeyChange {
                    tenant_id: TenantId::parse(&id).map_err(|_| bad_column(0, "tenant id"))?,
                    version: u32_of(row.get(1)?)?,
                    at_secs: row.get(2)?,
                })
            })
            .map_err(sql_error)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql_error)?
        };
        tx.commit().map_err(sql_error)?;
        Ok(((secs, u64_of(seq)), changes))
    }

    fn set_audit_reconciled_through(
        &self,
        secs: i64,
        audit_seq: u64,
        checked: &[KeyChange],
    ) -> Result<()> {
        self.write(|tx| {
            let current: i64 = tx
                .query_row(
                    "SELECT through_secs FROM audit_reconciled WHERE id = 1",
                    [],
                    |row| row.get(0),
                )
                .map_err(sql_error)?;
            let secs = secs.max(current);
            if secs > current {
                tx.execute("DELETE FROM audit_reconciled_boundary", [])
                    .map_err(sql_error)?;
            }
            tx.execute(
                "UPDATE audit_reconciled SET through_secs = ?1, audit_seq = ?2 WHERE id = 1",
                params![secs, i64_of(audit_seq)],
            )
            .map_err(sql_error)?;
            for change in checked.iter().filter(|c| c.at_secs >= secs) {
                tx.execute(
                    "INSERT OR IGNORE INTO audit_reconciled_boundary (tenant_id, version) \
                     VALUES (?1, ?2)",
                    params![change.tenant_id.as_str(), change.version],
                )
                .map_err(sql_error)?;
            }
            Ok(())
        })
    }
}

/// Compares `PRAGMA data_version` with the last value seen on this connection.
impl SqliteKeyStore {
    /// The full change check (see `ChangeDetection::change_generation`), with the connection
    /// locked, for a caller that found the WAL-index header moved; `arrival` is the number of
    /// checks started when the caller arrived.
    fn generation_check(&self, mut inner: MutexGuard<'_, Inner>, arrival: u64) -> Result<u64> {
        if inner.checks_done > arrival {
            return Ok(self.changes.generation());
        }
        let number = self.checks_started.fetch_add(1, Ordering::AcqRel) + 1;
        let header = self.changes.header();
        // Another caller's full check may have published this very header while we waited
        // for the connection.
        if let Some(generation) = self.changes.unchanged_since(header) {
            inner.checks_done = number;
            return Ok(generation);
        }
        let now: i64 = inner
            .conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(sql_error)?;
        // Only full checks change the generation, and they hold the connection.
        let mut generation = self.changes.generation();
        if now != inner.data_version {
            generation += 1;
            // Another process wrote: before its change is served, the anchor must still
            // match every row MAC (a deleted, inserted or rolled-back row breaks it).
            inner.recheck_rows();
            // Last: if anything above panicked (the mutex is recovered from poisoning), the
            // next check still sees this change.
            inner.data_version = now;
        }
        // Read before the PRAGMA: a commit after it shows as a different header next time.
        self.changes.publish(header, generation);
        inner.checks_done = number;
        Ok(generation)
    }

    /// Rebuilds the database, then copies the WAL into it and truncates the WAL to zero bytes,
    /// so deleted key bytes survive in no file. Retries while readers of other connections
    /// hold old snapshots.
    ///
    /// Why the rebuild: secure_delete zeroes a deleted row where it lies, but when SQLite
    /// rebalances a B-tree page it rewrites the page without clearing the unused gap, so an
    /// older copy of a row that has since moved can survive there (the churn soak of
    /// `tenant-kms bench` found destroyed tenants' wrapped keys that way). VACUUM writes every
    /// page afresh from live rows only. It costs time in proportion to keys.db's size.
    fn checkpoint_truncate(&self) -> Result<()> {
        // Every caller has committed its deletion by now: the window a kill -9 can hit.
        super::failpoint(super::FAILPOINT_BEFORE_SHRED_SEQUENCE);
        let inner = self.lock();
        inner.conn.execute_batch("VACUUM").map_err(sql_error)?;
        for attempt in 0..50 {
            let (busy, _, _): (i64, i64, i64) = inner
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(sql_error)?;
            if busy == 0 {
                // The shred sequence is complete: the mark that makes the next open re-run
                // it can go (its own small commit holds no key bytes).
                inner
                    .conn
                    .execute("DELETE FROM shred_pending", [])
                    .map_err(sql_error)?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10 * (attempt + 1)));
        }
        Err(Error::internal(
            "key store: could not checkpoint the WAL after destroying keys",
        ))
    }
}

/// A tenant's key-version rows, oldest first, each MAC checked, with their MACs.
fn load_versions_stored(
    conn: &Connection,
    key: &RowKey,
    id: &TenantId,
) -> Result<Vec<Stored<KeyVersionRecord>>> {
    conn.prepare_cached(&format!(
        "SELECT {VERSION_COLUMNS} FROM key_versions v LEFT JOIN wrapped_keys w \
         ON w.tenant_id = v.tenant_id AND w.version = v.version \
         WHERE v.tenant_id = ?1 ORDER BY v.version"
    ))
    .and_then(|mut stmt| {
        stmt.query_map([id.as_str()], stored_version)?
            .collect::<rusqlite::Result<Vec<_>>>()
    })
    .map_err(sql_error)?
    .into_iter()
    .map(|row| verified_version(key, id, row))
    .collect()
}

/// A tenant's key versions, oldest first, each MAC checked.
fn load_versions(conn: &Connection, key: &RowKey, id: &TenantId) -> Result<Vec<KeyVersionRecord>> {
    Ok(load_versions_stored(conn, key, id)?
        .into_iter()
        .map(|row| row.record)
        .collect())
}

fn insert_tenant(
    rows: &mut Rows<'_>,
    tenant: &TenantRecord,
    first: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    if let Some(existing) = load_tenant(rows.tx, rows.key, &tenant.tenant_id)? {
        // A destroyed tenant's id is never reused: its tombstone says so.
        lifecycle::require_not_destroyed(existing.state)?;
        return Err(Error::AlreadyExists("tenant"));
    }
    rows.put_tenant(tenant, None)?;
    insert_version(rows, &tenant.tenant_id, first, wrapped)
}

/// Marks, inside a transaction that deletes wrapped keys, that the shred sequence
/// (`SqliteKeyStore::checkpoint_truncate`) must run after it: the mark survives a crash
/// before the sequence ends, and the next open finishes the sequence.
fn mark_shred_pending(tx: &Connection) -> Result<()> {
    tx.execute("INSERT OR IGNORE INTO shred_pending (id) VALUES (1)", [])
        .map_err(sql_error)?;
    Ok(())
}

/// Crypto-shreds inside the caller's transaction: deletes the wrapped keys of a whole tenant
/// (`version` None) or of one version (secure_delete zeroes them where they lay) and marks
/// them DESTROYED; a whole tenant becomes a DESTROYED tombstone as of `destroyed_at`. The
/// caller checkpoints the log after the commit (`SqliteKeyStore::checkpoint_truncate`).
/// The one copy of the shredding statements: tenant destruction, version destruction and
/// the shred ledger's re-application all run it.
///
/// The key-version rows are rewritten without checking their MACs first: destroying never
/// widens anything, so a tampered version row must not keep its key alive; it comes out
/// DESTROYED with a fresh MAC.
fn shred_rows(
    rows: &mut Rows<'_>,
    id: &TenantId,
    version: Option<u32>,
    destroyed_at: i64,
) -> Result<()> {
    mark_shred_pending(rows.tx)?;
    let targets: Vec<u32> = match version {
        Some(version) => vec![version],
        None => rows
            .tx
            .prepare_cached("SELECT version FROM key_versions WHERE tenant_id = ?1")
            .and_then(|mut stmt| {
                stmt.query_map([id.as_str()], |row| u32_of(row.get(0)?))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql_error)?,
    };
    match version {
        None => rows.tx.execute(
            "DELETE FROM wrapped_keys WHERE tenant_id = ?1",
            [id.as_str()],
        ),
        Some(version) => rows.tx.execute(
            "DELETE FROM wrapped_keys WHERE tenant_id = ?1 AND version = ?2",
            params![id.as_str(), version],
        ),
    }
    .map_err(sql_error)?;
    for number in targets {
        let Some(stored) = load_version_unchecked(rows.tx, id, number)? else {
            continue;
        };
        let mut record = stored.record;
        record.state = KeyVersionState::Destroyed;
        record.wrapped = None;
        rows.put_version(id, &record, Some(&stored.mac))?;
    }
    if version.is_none() {
        let stored = require_tenant_stored(rows.tx, rows.key, id)?;
        let mut tenant = stored.record;
        tenant.state = TenantState::Destroyed;
        tenant.destroyed_at = Some(destroyed_at);
        rows.put_tenant(&tenant, Some(&stored.mac))?;
    }
    Ok(())
}

fn insert_version(
    rows: &mut Rows<'_>,
    id: &TenantId,
    version: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    // A key must never be wrapped under a retired master version: the operator may already
    // have removed that version from the keyring, which would leave the key unreadable.
    let retired: Option<Option<i64>> = rows
        .tx
        .prepare_cached("SELECT retired_at FROM master_keys WHERE version = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([wrapped.master_version], |row| row.get(0))
                .optional()
        })
        .map_err(sql_error)?;
    if matches!(retired, Some(Some(_))) {
        return Err(Error::RetiredMasterVersion(wrapped.master_version));
    }
    rows.put_version(id, version, None)?;
    rows.tx
        .prepare_cached(
            "INSERT INTO wrapped_keys (tenant_id, version, master_version, wrapped_key) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                id.as_str(),
                version.version,
                wrapped.master_version,
                wrapped.bytes
            ])
        })
        .map_err(sql_error)?;
    Ok(())
}

/// The test seam of a database writer without the master key (see [`super::RowTamper`]).
#[cfg(any(test, feature = "test-seams"))]
impl super::RowTamper for SqliteKeyStore {
    fn raw_row(&self, row: &super::RowRef) -> Result<Option<Vec<(String, super::RawValue)>>> {
        use rusqlite::types::ValueRef;
        let (table, condition, key) = row_target(row);
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!("SELECT * FROM {table} WHERE {condition}"))?;
            let names: Vec<String> = stmt
                .column_names()
                .iter()
                .map(|n| (*n).to_owned())
                .collect();
            stmt.query_row(rusqlite::params_from_iter(key.iter()), |r| {
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let value = match r.get_ref(i)? {
                            ValueRef::Null => super::RawValue::Null,
                            ValueRef::Integer(v) => super::RawValue::Integer(v),
                            ValueRef::Real(v) => super::RawValue::Integer(v as i64),
                            ValueRef::Text(t) => {
                                super::RawValue::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            ValueRef::Blob(b) => super::RawValue::Blob(b.to_vec()),
                        };
                        Ok((name.clone(), value))
                    })
                    .collect()
            })
            .optional()
        })
    }

    fn raw_update(&self, row: &super::RowRef, columns: &[(String, super::RawValue)]) -> Result<()> {
        let (table, condition, key) = row_target(row);
        let sets: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, (name, _))| format!("{} = ?{}", checked_name(name), key.len() + i + 1))
            .collect();
        let mut values: Vec<rusqlite::types::Value> = key;
        values.extend(columns.iter().map(|(_, v)| raw_value(v)));
        self.write(|tx| {
            tx.execute(
                &format!("UPDATE {table} SET {} WHERE {condition}", sets.join(", ")),
                rusqlite::params_from_iter(values.iter()),
            )
            .map_err(sql_error)?;
            Ok(())
        })
    }

    fn raw_insert(&self, row: &super::RowRef, columns: &[(String, super::RawValue)]) -> Result<()> {
        let (table, _, _) = row_target(row);
        let names: Vec<&str> = columns.iter().map(|(n, _)| checked_name(n)).collect();
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let values: Vec<rusqlite::types::Value> =
            columns.iter().map(|(_, v)| raw_value(v)).collect();
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    marks.join(", ")
                ),
                rusqlite::params_from_iter(values.iter()),
            )
            .map_err(sql_error)?;
            Ok(())
        })
    }
}

/// Table, WHERE clause and key values of a row the test seam names.
#[cfg(any(test, feature = "test-seams"))]
fn row_target(row: &super::RowRef) -> (&'static str, &'static str, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    match row {
        super::RowRef::Tenant(id) => (
            "tenants",
            "tenant_id = ?1",
            vec![Value::Text(id.as_str().into())],
        ),
        super::RowRef::KeyVersion(id, v) => (
            "key_versions",
            "tenant_id = ?1 AND version = ?2",
            vec![
                Value::Text(id.as_str().into()),
                Value::Integer(i64::from(*v)),
            ],
        ),
        super::RowRef::Token(id) => ("tokens", "id = ?1", vec![Value::Text(id.clone())]),
    }
}

/// A column name from a test, used only if it is a plain identifier.
#[cfg(any(test, feature = "test-seams"))]
fn checked_name(name: &str) -> &str {
    if name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        name
    } else {
        "invalid column name"
    }
}

#[cfg(any(test, feature = "test-seams"))]
fn raw_value(value: &super::RawValue) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match value {
        super::RawValue::Null => Value::Null,
        super::RawValue::Integer(v) => Value::Integer(*v),
        super::RawValue::Text(t) => Value::Text(t.clone()),
        super::RawValue::Blob(b) => Value::Blob(b.clone()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::contract::install_test_row_key;

    fn master(version: u32) -> MasterVersionRecord {
        MasterVersionRecord {
            version,
            check_value: vec![0; 32],
            created_at: 0,
            retired_at: None,
        }
    }

    /// Two stores on one keys.db, as two processes would have, each with the row key.
    fn two_stores(path: &Path) -> (SqliteKeyStore, SqliteKeyStore) {
        let stores = (
            SqliteKeyStore::open(path).unwrap(),
            SqliteKeyStore::open(path).unwrap(),
        );
        install_test_row_key(&stores.0);
        install_test_row_key(&stores.1);
        stores
    }

    /// A call's change check answers while another thread holds the connection (a write, an
    /// fsync) as long as nothing was committed since the last full check, so it is not sent
    /// to the blocking pool; after a commit elsewhere it still waits for the full check.
    #[test]
    fn an_unchanged_store_answers_the_change_check_without_its_connection() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("keys.db");
        let (a, b) = two_stores(&path);
        let before = a.change_generation().unwrap();

        let held = a.lock();
        assert_eq!(a.try_change_generation().unwrap().unwrap(), before);
        b.insert_master_version(&master(7)).unwrap();
        assert!(
            a.try_change_generation().is_none(),
            "a commit elsewhere needs the full check, which needs the connection"
        );
        drop(held);

        let after = a.try_change_generation().unwrap().unwrap();
        assert!(after > before);
        let held = a.lock();
        assert_eq!(a.try_change_generation().unwrap().unwrap(), after);
        drop(held);
    }

    /// Whether a process other than this one may take a write lock on SQLite's `-shm` lock
    /// byte (`UNIX_SHM_DMS`, offset 128: every connection holds a read lock on it while open,
    /// and the process that finds it free rebuilds the WAL index): `held` or `free`, asked of
    /// a Python child (the crate forbids the `unsafe` a lock query from Rust would need).
    fn shm_lock_from_another_process(shm: &Path) -> String {
        let probe = "import fcntl, os, sys\n\
                     fd = os.open(sys.argv[1], os.O_RDWR)\n\
                     try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\n\
                     except OSError:\n    print('held')\nelse:\n    print('free')\n";
        let out = std::process::Command::new("python3")
            .args(["-c", probe])
            .arg(shm)
            .output()
            .expect("python3 runs this test's lock probe (apt-get install -y python3)");
        assert!(out.status.success(), "lock probe failed: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Dropping one store leaves another store's connection to the same file its SQLite locks:
    /// the change check's descriptor of keys.db-shm is the process's one, not closed with the
    /// store (closing any descriptor of a file drops all the process's POSIX locks on it).
    #[test]
    fn dropping_a_store_leaves_its_files_locks_to_the_other_connections() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("keys.db");
        let shm = temp.path().join("keys.db-shm");
        let unlocked = temp.path().join("unlocked");
        std::fs::write(&unlocked, [0u8; 256]).unwrap();
        assert_eq!(
            shm_lock_from_another_process(&unlocked),
            "free",
            "the probe sees a free lock"
        );

        let (a, b) = two_stores(&path);
        // Both change checks read the header through the watch, which opens keys.db-shm.
        a.change_generation().unwrap();
        b.change_generation().unwrap();
        assert_eq!(shm_lock_from_another_process(&shm), "held");

        drop(a);
        assert_eq!(
            shm_lock_from_another_process(&shm),
            "held",
            "the remaining connection's lock survives the other store's drop"
        );
        b.insert_master_version(&master(7)).unwrap();
        assert!(b.change_generation().is_ok());
    }
}
