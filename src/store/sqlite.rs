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
}

struct Inner {
    conn: Connection,
    data_version: i64,
    /// Changes by others seen so far (see `ChangeDetection::change_generation`).
    generation: u64,
    /// The number of the last finished change check.
    checks_done: u64,
    /// The `-shm` file, read for the WAL-index header (opened on first use).
    shm: Option<std::fs::File>,
    shm_path: std::path::PathBuf,
    /// The WAL-index header as read just before the last full change check.
    seen_header: Option<[u8; WAL_INDEX_HEADERS]>,
}

/// Bytes at the start of the `-shm` file: two copies of the 48-byte WAL-index header, which
/// SQLite writes one after the other on every commit (and readers compare to detect a torn
/// read).
const WAL_INDEX_HEADERS: usize = 96;

impl Inner {
    /// Both copies of the WAL-index header if they agree (no commit is half-published);
    /// `None` if the file cannot be read, in which case the caller does a full check.
    fn wal_index_header(&mut self) -> Option<[u8; WAL_INDEX_HEADERS]> {
        use std::os::unix::fs::FileExt;
        if self.shm.is_none() {
            self.shm = std::fs::File::open(&self.shm_path).ok();
        }
        let mut buf = [0u8; WAL_INDEX_HEADERS];
        self.shm.as_ref()?.read_exact_at(&mut buf, 0).ok()?;
        let (first, second) = buf.split_at(WAL_INDEX_HEADERS / 2);
        (first == second).then_some(buf)
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
     w.master_version, w.wrapped_key";

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
    })
}

fn load_tenant(conn: &Connection, id: &TenantId) -> rusqlite::Result<Option<TenantRecord>> {
    // Cached: every cache miss runs it.
    conn.prepare_cached(&format!(
        "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = ?1"
    ))?
    .query_row([id.as_str()], tenant_from_row)
    .optional()
}

fn load_version(
    conn: &Connection,
    id: &TenantId,
    version: u32,
) -> rusqlite::Result<Option<KeyVersionRecord>> {
    conn.query_row(
        &format!(
            "SELECT {VERSION_COLUMNS} FROM key_versions v LEFT JOIN wrapped_keys w \
             ON w.tenant_id = v.tenant_id AND w.version = v.version \
             WHERE v.tenant_id = ?1 AND v.version = ?2"
        ),
        params![id.as_str(), version],
        version_from_row,
    )
    .optional()
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
        Self {
            inner: Mutex::new(Inner {
                conn,
                data_version,
                generation: 0,
                checks_done: 0,
                shm: None,
                shm_path: {
                    let mut shm = path.as_os_str().to_owned();
                    shm.push("-shm");
                    shm.into()
                },
                seen_header: None,
            }),
            checks_started: AtomicU64::new(0),
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
}

fn require_tenant(tx: &Connection, id: &TenantId) -> Result<TenantRecord> {
    load_tenant(tx, id)
        .map_err(sql_error)?
        .ok_or(Error::NotFound("tenant"))
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
}

impl TenantStore for SqliteKeyStore {
    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()> {
        let wrapped = first
            .wrapped
            .as_ref()
            .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
        self.write(|tx| insert_tenant(tx, tenant, first, wrapped))?;
        super::failpoint(super::FAILPOINT_AFTER_KEY_COMMIT);
        Ok(())
    }

    fn create_tenants(&self, tenants: &[(TenantRecord, KeyVersionRecord)]) -> Result<()> {
        self.write(|tx| {
            for (tenant, first) in tenants {
                let wrapped = first
                    .wrapped
                    .as_ref()
                    .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
                insert_tenant(tx, tenant, first, wrapped)?;
            }
            Ok(())
        })
    }

    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>> {
        self.read(|conn| load_tenant(conn, id))
    }

    fn tenant_snapshot(
        &self,
        id: &TenantId,
    ) -> Result<Option<(TenantRecord, Vec<KeyVersionRecord>)>> {
        let mut inner = self.lock();
        // A read transaction: both reads see the same committed state.
        let tx = inner
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(sql_error)?;
        let Some(tenant) = load_tenant(&tx, id).map_err(sql_error)? else {
            return Ok(None);
        };
        let versions = load_versions(&tx, id).map_err(sql_error)?;
        tx.commit().map_err(sql_error)?;
        Ok(Some((tenant, versions)))
    }

    fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > ?1 \
                 ORDER BY tenant_id LIMIT ?2"
            ))?;
            stmt.query_map(
                params![after.map(TenantId::as_str).unwrap_or(""), limit as i64],
                tenant_from_row,
            )?
            .collect()
        })
    }

    fn key_versions(&self, id: &TenantId) -> Result<Vec<KeyVersionRecord>> {
        self.read(|conn| load_versions(conn, id))
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
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            lifecycle::check_rotation(tenant.state, tenant.primary_version, expected_primary)?;
            insert_version(tx, id, version, wrapped)?;
            // Conditional on the primary read above (compare-and-set).
            let changed = tx
                .execute(
                    "UPDATE tenants SET primary_version = ?2 WHERE tenant_id = ?1 \
                     AND primary_version = ?3",
                    params![id.as_str(), version.version, expected_primary],
                )
                .map_err(sql_error)?;
            if changed != 1 {
                return Err(Error::ConcurrentChange);
            }
            require_tenant(tx, id)
        })
    }

    fn set_tenant_state(
        &self,
        id: &TenantId,
        transition: TenantTransition,
        now: i64,
    ) -> Result<TenantRecord> {
        let (record, shredded) = self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            let change =
                lifecycle::tenant_transition(tenant.state, tenant.deletion_time, transition, now)?;
            if change.shred {
                shred_rows(tx, id, None, change.destroyed_at.unwrap_or(now))?;
            } else {
                // Conditional on the state read above (compare-and-set).
                let changed = tx
                    .execute(
                        "UPDATE tenants SET state = ?2, deletion_time = ?3 \
                         WHERE tenant_id = ?1 AND state = ?4",
                        params![
                            id.as_str(),
                            change.state.code(),
                            change.deletion_time,
                            tenant.state.code()
                        ],
                    )
                    .map_err(sql_error)?;
                if changed != 1 {
                    return Err(Error::ConcurrentChange);
                }
            }
            Ok((require_tenant(tx, id)?, change.shred))
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
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            lifecycle::require_not_destroyed(tenant.state)?;
            tx.execute(
                "UPDATE tenants SET rotation_period_seconds = ?2, max_encryptions = ?3 \
                 WHERE tenant_id = ?1",
                params![
                    id.as_str(),
                    i64_of(rotation_period_seconds),
                    i64_of(max_encryptions)
                ],
            )
            .map_err(sql_error)?;
            require_tenant(tx, id)
        })
    }

    fn set_key_version_state(
        &self,
        id: &TenantId,
        version: u32,
        transition: VersionTransition,
    ) -> Result<KeyVersionRecord> {
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            let current = load_version(tx, id, version).map_err(sql_error)?;
            let to = lifecycle::version_transition(
                tenant.state,
                tenant.primary_version,
                version,
                current.as_ref().map(|v| v.state),
                transition,
            )?;
            if to == KeyVersionState::Destroyed {
                shred_rows(tx, id, Some(version), 0)?;
            } else {
                tx.execute(
                    "UPDATE key_versions SET state = ?3 WHERE tenant_id = ?1 AND version = ?2",
                    params![id.as_str(), version, to.code()],
                )
                .map_err(sql_error)?;
            }
            load_version(tx, id, version)
                .map_err(sql_error)?
                .ok_or(Error::NotFound("key version"))
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
        let mut inner = self.lock();
        if let Some(result) = lock_plain(&ticket).take() {
            return result;
        }
        let batch = std::mem::take(&mut *lock_plain(&self.reservations));
        let written = (|| {
            let tx = inner
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_error)?;
            let mut totals = Vec::with_capacity(batch.len());
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE key_versions SET encryptions = encryptions + ?3 \
                         WHERE tenant_id = ?1 AND version = ?2 RETURNING encryptions",
                    )
                    .map_err(sql_error)?;
                for item in &batch {
                    let total: Option<i64> = stmt
                        .query_row(
                            params![item.id.as_str(), item.version, i64_of(item.count)],
                            |row| row.get(0),
                        )
                        .optional()
                        .map_err(sql_error)?;
                    totals.push(total);
                }
            }
            tx.commit().map_err(sql_error)?;
            Ok::<_, Error>(totals)
        })();
        match written {
            Ok(totals) => {
                for (item, total) in batch.iter().zip(totals) {
                    *lock_plain(&item.ticket) =
                        Some(total.map(u64_of).ok_or(Error::NotFound("key version")));
                }
            }
            Err(e) => {
                let text = e.to_string();
                for item in &batch {
                    *lock_plain(&item.ticket) = Some(Err(Error::Internal(text.clone())));
                }
            }
        }
        drop(inner);
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
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (id, name, hash, role, tenants, operations, created_at, \
                 expires_at, revoked_at) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
                params![
                    token.id,
                    token.name,
                    token.hash.as_slice(),
                    token.role,
                    token.tenants,
                    token.operations,
                    token.created_at,
                    token.expires_at,
                    token.revoked_at
                ],
            )
            .map_err(sql_error)?;
            Ok(())
        })
    }

    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>> {
        self.read(|conn| {
            conn.query_row(
                "SELECT id, name, hash, role, tenants, operations, created_at, expires_at, \
                 revoked_at FROM tokens WHERE hash = ?1",
                [hash.as_slice()],
                token_from_row,
            )
            .optional()
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, name, hash, role, tenants, operations, created_at, expires_at, \
                 revoked_at FROM tokens ORDER BY created_at, id",
            )?;
            stmt.query_map([], token_from_row)?.collect()
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> Result<bool> {
        self.write(|tx| {
            let changed = tx
                .execute(
                    "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                    params![id, at],
                )
                .map_err(sql_error)?;
            Ok(changed == 1)
        })
    }
}

impl ChangeDetection for SqliteKeyStore {
    fn change_generation(&self) -> Result<u64> {
        // Single flight: a check that started after this call began is as good as our own,
        // so callers queued on the mutex while one check ran share the next one.
        let arrival = self.checks_started.load(Ordering::Acquire);
        let inner = self.lock();
        self.generation_check(inner, arrival)
    }

    fn try_change_generation(&self) -> Option<Result<u64>> {
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
        self.read(|conn| {
            let mut items = Vec::new();
            let mut stmt = conn.prepare("SELECT tenant_id FROM tenants WHERE state = ?1")?;
            let rows = stmt.query_map([TenantState::Destroyed.code()], |row| {
                row.get::<_, String>(0)
            })?;
            for id in rows {
                items.push(ShredItem {
                    tenant_id: TenantId::parse(&id?).map_err(|_| bad_column(0, "tenant id"))?,
                    version: None,
                });
            }
            let mut stmt = conn.prepare(
                "SELECT v.tenant_id, v.version FROM key_versions v JOIN tenants t \
                 ON t.tenant_id = v.tenant_id WHERE v.state = ?1 AND t.state != ?2",
            )?;
            let rows = stmt.query_map(
                params![
                    KeyVersionState::Destroyed.code(),
                    TenantState::Destroyed.code()
                ],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
            )?;
            for row in rows {
                let (id, version) = row?;
                items.push(ShredItem {
                    tenant_id: TenantId::parse(&id).map_err(|_| bad_column(0, "tenant id"))?,
                    version: Some(u32_of(version)?),
                });
            }
            Ok(items)
        })
    }

    fn shred(&self, items: &[ShredItem], now: i64) -> Result<Vec<ShredItem>> {
        let done = self.write(|tx| {
            let mut done = Vec::new();
            for item in items {
                let Some(tenant) = load_tenant(tx, &item.tenant_id).map_err(sql_error)? else {
                    // A tenant destroyed after this store's copy was taken (a restored older
                    // backup): its id becomes a tombstone here too, so CreateTenant refuses it
                    // like any destroyed tenant instead of creating one the next start shreds.
                    if item.version.is_none() {
                        tx.execute(
                            &format!(
                                "INSERT INTO tenants ({TENANT_COLUMNS}) \
                                 VALUES (?1, ?2, 0, ?3, 0, 0, NULL, ?3)"
                            ),
                            params![item.tenant_id.as_str(), TenantState::Destroyed.code(), now],
                        )
                        .map_err(sql_error)?;
                        done.push(item.clone());
                    }
                    continue;
                };
                if tenant.state == TenantState::Destroyed {
                    continue;
                }
                if let Some(version) = item.version {
                    let Some(record) =
                        load_version(tx, &item.tenant_id, version).map_err(sql_error)?
                    else {
                        continue;
                    };
                    if record.state == KeyVersionState::Destroyed && record.wrapped.is_none() {
                        continue;
                    }
                }
                shred_rows(tx, &item.tenant_id, item.version, now)?;
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
        self.write(|tx| {
            mark_shred_pending(tx)?;
            if let Some(live) = load_tenant(tx, &tenant.tenant_id).map_err(sql_error)? {
                lifecycle::require_not_destroyed(live.state)?;
                let mut stmt = tx
                    .prepare("SELECT version FROM key_versions WHERE tenant_id = ?1 AND state = ?2")
                    .map_err(sql_error)?;
                let destroyed = stmt
                    .query_map(params![id, KeyVersionState::Destroyed.code()], |row| {
                        row.get::<_, i64>(0)
                    })
                    .map_err(sql_error)?
                    .collect::<rusqlite::Result<Vec<i64>>>()
                    .map_err(sql_error)?;
                if let Some(v) = versions
                    .iter()
                    .find(|v| v.wrapped.is_some() && destroyed.contains(&i64::from(v.version)))
                {
                    return Err(Error::FailedPrecondition(format!(
                        "key version {} of tenant {id} was destroyed; it cannot come back",
                        v.version
                    )));
                }
            }
            tx.execute("DELETE FROM wrapped_keys WHERE tenant_id = ?1", [id])
                .map_err(sql_error)?;
            tx.execute("DELETE FROM key_versions WHERE tenant_id = ?1", [id])
                .map_err(sql_error)?;
            tx.execute(
                &format!(
                    "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8) \
                     ON CONFLICT(tenant_id) DO UPDATE SET state = excluded.state, \
                     primary_version = excluded.primary_version, \
                     created_at = excluded.created_at, \
                     rotation_period_seconds = excluded.rotation_period_seconds, \
                     max_encryptions = excluded.max_encryptions, \
                     deletion_time = excluded.deletion_time, \
                     destroyed_at = excluded.destroyed_at"
                ),
                params![
                    id,
                    tenant.state.code(),
                    tenant.primary_version,
                    tenant.created_at,
                    i64_of(tenant.rotation_period_seconds),
                    i64_of(tenant.max_encryptions),
                    tenant.deletion_time,
                    tenant.destroyed_at
                ],
            )
            .map_err(sql_error)?;
            for version in versions {
                tx.execute(
                    "INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        id,
                        version.version,
                        version.state.code(),
                        version.created_at,
                        i64_of(version.encryptions)
                    ],
                )
                .map_err(sql_error)?;
                if let Some(wrapped) = &version.wrapped {
                    tx.execute(
                        "INSERT INTO wrapped_keys (tenant_id, version, master_version, wrapped_key) \
                         VALUES (?1, ?2, ?3, ?4)",
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
    /// The body of a change check (see `ChangeDetection::change_generation`), with the connection
    /// locked; `arrival` is the number of checks started when the caller arrived.
    fn generation_check(&self, mut inner: MutexGuard<'_, Inner>, arrival: u64) -> Result<u64> {
        if inner.checks_done > arrival {
            return Ok(inner.generation);
        }
        let number = self.checks_started.fetch_add(1, Ordering::AcqRel) + 1;
        // Fast path: every commit, by any connection, rewrites the WAL-index header in the
        // `-shm` file (its change counter, last frame and salts; sqlite.org/walformat.html
        // §2.2.1). Both copies equal to the header seen at our last full check mean nothing
        // was committed since: no SQLite read transaction, no lock syscalls.
        let header = inner.wal_index_header();
        if header.is_some() && header == inner.seen_header {
            inner.checks_done = number;
            return Ok(inner.generation);
        }
        let now: i64 = inner
            .conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(sql_error)?;
        if now != inner.data_version {
            inner.data_version = now;
            inner.generation += 1;
        }
        // Read before the PRAGMA: a commit after it shows as a different header next time.
        inner.seen_header = header;
        inner.checks_done = number;
        Ok(inner.generation)
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

fn load_versions(conn: &Connection, id: &TenantId) -> rusqlite::Result<Vec<KeyVersionRecord>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {VERSION_COLUMNS} FROM key_versions v LEFT JOIN wrapped_keys w \
         ON w.tenant_id = v.tenant_id AND w.version = v.version \
         WHERE v.tenant_id = ?1 ORDER BY v.version"
    ))?;
    stmt.query_map([id.as_str()], version_from_row)?.collect()
}

fn insert_tenant(
    tx: &Connection,
    tenant: &TenantRecord,
    first: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    if let Some(existing) = load_tenant(tx, &tenant.tenant_id).map_err(sql_error)? {
        // A destroyed tenant's id is never reused: its tombstone says so.
        lifecycle::require_not_destroyed(existing.state)?;
        return Err(Error::AlreadyExists("tenant"));
    }
    // Cached statements here and in `insert_version`: bulk creation runs them per tenant.
    tx.prepare_cached(&format!(
        "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"
    ))
    .and_then(|mut stmt| {
        stmt.execute(params![
            tenant.tenant_id.as_str(),
            tenant.state.code(),
            tenant.primary_version,
            tenant.created_at,
            i64_of(tenant.rotation_period_seconds),
            i64_of(tenant.max_encryptions),
            tenant.deletion_time,
            tenant.destroyed_at
        ])
    })
    .map_err(sql_error)?;
    insert_version(tx, &tenant.tenant_id, first, wrapped)
}

/// Crypto-shreds inside the caller's transaction: deletes the wrapped keys of a whole tenant
/// (`version` None) or of one version (secure_delete zeroes them where they lay) and marks
/// them DESTROYED; a whole tenant becomes a DESTROYED tombstone as of `destroyed_at`. The
/// caller checkpoints the log after the commit (`SqliteKeyStore::checkpoint_truncate`).
/// The one copy of the shredding statements: tenant destruction, version destruction and
/// the shred ledger's re-application all run it.
/// Marks, inside a transaction that deletes wrapped keys, that the shred sequence
/// (`SqliteKeyStore::checkpoint_truncate`) must run after it: the mark survives a crash
/// before the sequence ends, and the next open finishes the sequence.
fn mark_shred_pending(tx: &Connection) -> Result<()> {
    tx.execute("INSERT OR IGNORE INTO shred_pending (id) VALUES (1)", [])
        .map_err(sql_error)?;
    Ok(())
}

fn shred_rows(
    tx: &Connection,
    id: &TenantId,
    version: Option<u32>,
    destroyed_at: i64,
) -> Result<()> {
    mark_shred_pending(tx)?;
    let id = id.as_str();
    let destroyed = KeyVersionState::Destroyed.code();
    match version {
        None => {
            tx.execute("DELETE FROM wrapped_keys WHERE tenant_id = ?1", [id])
                .map_err(sql_error)?;
            tx.execute(
                "UPDATE key_versions SET state = ?2 WHERE tenant_id = ?1",
                params![id, destroyed],
            )
            .map_err(sql_error)?;
            tx.execute(
                "UPDATE tenants SET state = ?2, destroyed_at = ?3 WHERE tenant_id = ?1",
                params![id, TenantState::Destroyed.code(), destroyed_at],
            )
            .map_err(sql_error)?;
        }
        Some(version) => {
            tx.execute(
                "DELETE FROM wrapped_keys WHERE tenant_id = ?1 AND version = ?2",
                params![id, version],
            )
            .map_err(sql_error)?;
            tx.execute(
                "UPDATE key_versions SET state = ?3 WHERE tenant_id = ?1 AND version = ?2",
                params![id, version, destroyed],
            )
            .map_err(sql_error)?;
        }
    }
    Ok(())
}

fn insert_version(
    tx: &Connection,
    id: &TenantId,
    version: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    // A key must never be wrapped under a retired master version: the operator may already
    // have removed that version from the keyring, which would leave the key unreadable.
    let retired: Option<Option<i64>> = tx
        .prepare_cached("SELECT retired_at FROM master_keys WHERE version = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([wrapped.master_version], |row| row.get(0))
                .optional()
        })
        .map_err(sql_error)?;
    if matches!(retired, Some(Some(_))) {
        return Err(Error::RetiredMasterVersion(wrapped.master_version));
    }
    tx.prepare_cached(
        "INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            id.as_str(),
            version.version,
            version.state.code(),
            version.created_at,
            i64_of(version.encryptions)
        ])
    })
    .map_err(sql_error)?;
    tx.prepare_cached(
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
