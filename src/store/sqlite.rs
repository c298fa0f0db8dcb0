//! [`KeyStore`] on SQLite (`keys.db`): WAL mode, `synchronous=FULL`, `secure_delete=ON`.
//!
//! One connection per process, behind a std mutex: every call is a short transaction and the
//! hot path is served from the key cache, so there is nothing to gain from a pool, and a single
//! connection makes `PRAGMA data_version` an exact "someone else wrote" signal (it ignores the
//! connection's own commits).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    DueTenants, FromStates, KeyStore, KeyVersionRecord, LedgerHead, MasterVersionRecord,
    Rewrapping, ShredItem, StoreCounts, TenantRecord, TokenRecord, WrappedTenantKey,
};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result};

/// How long a write waits for another process's write transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLite key store.
pub struct SqliteKeyStore {
    inner: Mutex<Inner>,
}

struct Inner {
    conn: Connection,
    data_version: i64,
}

fn sql_error(e: rusqlite::Error) -> Error {
    Error::Internal(format!("key store: {e}"))
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
    conn.query_row(
        &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = ?1"),
        [id.as_str()],
        tenant_from_row,
    )
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

/// The error for a tenant found in a state the call cannot start from.
pub(crate) fn state_error(state: TenantState) -> Error {
    match state {
        TenantState::Destroyed => Error::FailedPrecondition("tenant destroyed".into()),
        other => Error::FailedPrecondition(format!("tenant is {}", other.name())),
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
        let data_version = conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(sql_error)?;
        Ok(Self {
            inner: Mutex::new(Inner { conn, data_version }),
        })
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
        Ok(Self {
            inner: Mutex::new(Inner {
                conn,
                data_version: 0,
            }),
        })
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

impl KeyStore for SqliteKeyStore {
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

    fn retire_master_version(&self, version: u32, at: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE master_keys SET retired_at = ?2 WHERE version = ?1 AND retired_at IS NULL",
                params![version, at],
            )
            .map_err(sql_error)?;
            Ok(())
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

    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()> {
        let wrapped = first
            .wrapped
            .as_ref()
            .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
        self.write(|tx| {
            if load_tenant(tx, &tenant.tenant_id)
                .map_err(sql_error)?
                .is_some()
            {
                return Err(Error::AlreadyExists("tenant"));
            }
            tx.execute(
                &format!("INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)"),
                params![
                    tenant.tenant_id.as_str(),
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
            insert_version(tx, &tenant.tenant_id, first, wrapped)?;
            Ok(())
        })
    }

    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>> {
        self.read(|conn| load_tenant(conn, id))
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
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM key_versions v LEFT JOIN wrapped_keys w \
                 ON w.tenant_id = v.tenant_id AND w.version = v.version \
                 WHERE v.tenant_id = ?1 ORDER BY v.version"
            ))?;
            stmt.query_map([id.as_str()], version_from_row)?.collect()
        })
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
            if !matches!(tenant.state, TenantState::Active | TenantState::Suspended) {
                return Err(state_error(tenant.state));
            }
            if tenant.primary_version != expected_primary {
                return Err(Error::FailedPrecondition(
                    "the tenant's key was rotated concurrently; retry".into(),
                ));
            }
            insert_version(tx, id, version, wrapped)?;
            tx.execute(
                "UPDATE tenants SET primary_version = ?2 WHERE tenant_id = ?1",
                params![id.as_str(), version.version],
            )
            .map_err(sql_error)?;
            require_tenant(tx, id)
        })
    }

    fn set_tenant_state(
        &self,
        id: &TenantId,
        from: &[TenantState],
        to: TenantState,
        deletion_time: Option<i64>,
    ) -> Result<TenantRecord> {
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            if !from.contains(&tenant.state) {
                return Err(state_error(tenant.state));
            }
            tx.execute(
                "UPDATE tenants SET state = ?2, deletion_time = ?3 WHERE tenant_id = ?1",
                params![id.as_str(), to.code(), deletion_time],
            )
            .map_err(sql_error)?;
            require_tenant(tx, id)
        })
    }

    fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord> {
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            if tenant.state == TenantState::Destroyed {
                return Err(state_error(tenant.state));
            }
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
        from: FromStates<'_>,
        to: KeyVersionState,
    ) -> Result<KeyVersionRecord> {
        self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            if tenant.state == TenantState::Destroyed {
                return Err(state_error(tenant.state));
            }
            let record = load_version(tx, id, version)
                .map_err(sql_error)?
                .ok_or(Error::NotFound("key version"))?;
            if to != KeyVersionState::Enabled && version == tenant.primary_version {
                return Err(Error::FailedPrecondition(
                    "the primary key version cannot be disabled or destroyed; rotate first".into(),
                ));
            }
            if !from.contains(&record.state) {
                return Err(Error::FailedPrecondition(format!(
                    "key version {version} is {}",
                    record.state.name()
                )));
            }
            tx.execute(
                "UPDATE key_versions SET state = ?3 WHERE tenant_id = ?1 AND version = ?2",
                params![id.as_str(), version, to.code()],
            )
            .map_err(sql_error)?;
            if to == KeyVersionState::Destroyed {
                tx.execute(
                    "DELETE FROM wrapped_keys WHERE tenant_id = ?1 AND version = ?2",
                    params![id.as_str(), version],
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

    fn destroy_tenant(&self, id: &TenantId, now: i64) -> Result<TenantRecord> {
        let record = self.write(|tx| {
            let tenant = require_tenant(tx, id)?;
            if tenant.state != TenantState::PendingDeletion {
                return Err(state_error(tenant.state));
            }
            if tenant.deletion_time.is_some_and(|at| at > now) {
                return Err(Error::FailedPrecondition(
                    "tenant deletion window has not passed".into(),
                ));
            }
            tx.execute(
                "DELETE FROM wrapped_keys WHERE tenant_id = ?1",
                [id.as_str()],
            )
            .map_err(sql_error)?;
            tx.execute(
                "UPDATE key_versions SET state = ?2 WHERE tenant_id = ?1",
                params![id.as_str(), KeyVersionState::Destroyed.code()],
            )
            .map_err(sql_error)?;
            tx.execute(
                "UPDATE tenants SET state = ?2, destroyed_at = ?3 WHERE tenant_id = ?1",
                params![id.as_str(), TenantState::Destroyed.code(), now],
            )
            .map_err(sql_error)?;
            require_tenant(tx, id)
        })?;
        self.checkpoint_truncate()?;
        Ok(record)
    }

    fn reserve_encryptions(&self, id: &TenantId, version: u32, count: u64) -> Result<u64> {
        self.write(|tx| {
            let total: Option<i64> = tx
                .query_row(
                    "UPDATE key_versions SET encryptions = encryptions + ?3 \
                     WHERE tenant_id = ?1 AND version = ?2 RETURNING encryptions",
                    params![id.as_str(), version, i64_of(count)],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error)?;
            total.map(u64_of).ok_or(Error::NotFound("key version"))
        })
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
                    TenantState::Active.code(),
                    TenantState::Suspended.code(),
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

    fn changed_elsewhere(&self) -> Result<bool> {
        data_version_changed(&mut self.lock())
    }

    fn try_changed_elsewhere(&self) -> Option<Result<bool>> {
        match self.inner.try_lock() {
            Ok(mut inner) => Some(data_version_changed(&mut inner)),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                Some(data_version_changed(&mut p.into_inner()))
            }
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn snapshot_to(&self, dest: &Path) -> Result<()> {
        crate::fsutil::create_private_file(dest)?;
        let mut out = Connection::open(dest).map_err(sql_error)?;
        {
            let inner = self.lock();
            // One step copies every page inside one read transaction: a consistent snapshot,
            // and in WAL mode writers (the server) are not blocked meanwhile.
            let backup = rusqlite::backup::Backup::new(&inner.conn, &mut out).map_err(sql_error)?;
            copy_all_pages(&backup)?;
        }
        // A self-contained file: no -wal beside it, so its checksum is the whole state.
        out.pragma_update(None, "journal_mode", "DELETE")
            .map_err(sql_error)?;
        out.close().map_err(|(_, e)| sql_error(e))?;
        crate::fsutil::sync_file(dest)
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
                    continue;
                };
                if tenant.state == TenantState::Destroyed {
                    continue;
                }
                let id = item.tenant_id.as_str();
                match item.version {
                    None => {
                        tx.execute("DELETE FROM wrapped_keys WHERE tenant_id = ?1", [id])
                            .map_err(sql_error)?;
                        tx.execute(
                            "UPDATE key_versions SET state = ?2 WHERE tenant_id = ?1",
                            params![id, KeyVersionState::Destroyed.code()],
                        )
                        .map_err(sql_error)?;
                        tx.execute(
                            "UPDATE tenants SET state = ?2, destroyed_at = ?3 WHERE tenant_id = ?1",
                            params![id, TenantState::Destroyed.code(), now],
                        )
                        .map_err(sql_error)?;
                    }
                    Some(version) => {
                        let Some(record) =
                            load_version(tx, &item.tenant_id, version).map_err(sql_error)?
                        else {
                            continue;
                        };
                        if record.state == KeyVersionState::Destroyed && record.wrapped.is_none() {
                            continue;
                        }
                        tx.execute(
                            "UPDATE key_versions SET state = ?3 WHERE tenant_id = ?1 AND version = ?2",
                            params![id, version, KeyVersionState::Destroyed.code()],
                        )
                        .map_err(sql_error)?;
                        tx.execute(
                            "DELETE FROM wrapped_keys WHERE tenant_id = ?1 AND version = ?2",
                            params![id, version],
                        )
                        .map_err(sql_error)?;
                    }
                }
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
            if let Some(live) = load_tenant(tx, &tenant.tenant_id).map_err(sql_error)? {
                if live.state == TenantState::Destroyed {
                    return Err(state_error(live.state));
                }
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
}

/// Compares `PRAGMA data_version` with the last value seen on this connection.
fn data_version_changed(inner: &mut Inner) -> Result<bool> {
    let now: i64 = inner
        .conn
        .query_row("PRAGMA data_version", [], |row| row.get(0))
        .map_err(sql_error)?;
    let changed = now != inner.data_version;
    inner.data_version = now;
    Ok(changed)
}

impl SqliteKeyStore {
    /// Copies the WAL into the database and truncates it to zero bytes, so deleted (and by
    /// secure_delete zeroed) key bytes survive in no file. Retries while readers of other
    /// connections hold old snapshots.
    fn checkpoint_truncate(&self) -> Result<()> {
        let inner = self.lock();
        for attempt in 0..50 {
            let (busy, _, _): (i64, i64, i64) = inner
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(sql_error)?;
            if busy == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10 * (attempt + 1)));
        }
        Err(Error::internal(
            "key store: could not checkpoint the WAL after destroying keys",
        ))
    }
}

fn insert_version(
    tx: &Connection,
    id: &TenantId,
    version: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    tx.execute(
        "INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            id.as_str(),
            version.version,
            version.state.code(),
            version.created_at,
            i64_of(version.encryptions)
        ],
    )
    .map_err(sql_error)?;
    tx.execute(
        "INSERT INTO wrapped_keys (tenant_id, version, master_version, wrapped_key) \
         VALUES (?1, ?2, ?3, ?4)",
        params![
            id.as_str(),
            version.version,
            wrapped.master_version,
            wrapped.bytes
        ],
    )
    .map_err(sql_error)?;
    Ok(())
}

/// Runs an online backup as one step (-1: every page), retrying while another connection
/// holds a lock that keeps the step from starting (bounded).
fn copy_all_pages(backup: &rusqlite::backup::Backup<'_, '_>) -> Result<()> {
    use rusqlite::backup::StepResult;
    for attempt in 0..100u64 {
        match backup.step(-1).map_err(sql_error)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(Duration::from_millis(10 * (attempt + 1).min(10)));
            }
            _ => {}
        }
    }
    Err(Error::internal("online backup: the database stayed busy"))
}
