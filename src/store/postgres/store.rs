//! [`KeyStore`](crate::store::KeyStore) on PostgreSQL: the tables of keys.db with the same
//! row MACs and anchor, shared by every node.
//!
//! Every MAC'd write takes the row anchor's row lock first (`SELECT … FOR UPDATE`), which
//! orders the writers of all nodes: the compare-and-set reads that follow it see the latest
//! commit (READ COMMITTED takes a new snapshot per statement), so of two nodes rotating one
//! tenant from the same primary exactly one wins, two creations of one id give one tenant,
//! and nonce-budget reservations add up exactly. The same transaction appends to the change
//! log ([`super::changes`]) that the other nodes follow.
use super::connect::off_runtime;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::changes::{self, Follower};
use super::connect::{PgPool, map_error};
use super::rows::{
    Rows, TENANT_COLUMNS, TOKEN_COLUMNS, VERSION_COLUMNS, VERSION_FROM, full_check, i64_of,
    integrity, load_tenant, load_tenant_stored, load_token_stored, load_version,
    load_version_stored, load_version_unchecked, load_versions, load_versions_stored,
    mac_existing_rows, require_tenant_stored, stored_tenant, stored_token, stored_version,
    tenant_id_of, u32_of, u64_of, verified_tenant, verified_token, verified_version,
};
use crate::domain::lifecycle::{self, TenantTransition, VersionTransition};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result};
use crate::store::row_auth::RowKey;
use crate::store::{
    BackupStore, ChangeDetection, DueTenants, KeyChange, KeyVersionRecord, LedgerHead,
    MasterKeyStore, MasterVersionRecord, Rewrapping, ShredItem, StoreCounts, TenantRecord,
    TenantStore, TokenRecord, TokenStore, WrappedTenantKey,
};

/// The PostgreSQL key store of one node.
pub struct PostgresKeyStore {
    pool: PgPool,
    inner: Arc<Inner>,
    follower: Arc<Follower>,
}

/// What the store and its follow thread share.
pub(super) struct Inner {
    pub(super) pool: PgPool,
    /// This handle's id in the change log (random: two handles in one process are two
    /// writers).
    pub(super) writer: i64,
    /// The node id written beside each change.
    pub(super) node_id: String,
    rows: Mutex<RowState>,
    /// A copy of `RowState::anchor_seen` readable without the lock.
    anchor_published: AtomicU64,
}

struct RowState {
    /// The key of the row MACs, once installed.
    key: Option<Arc<RowKey>>,
    /// Why the store refuses to serve rows (the last anchor check failed).
    integrity: Option<String>,
    /// A re-check of the rows is owed: the last one could not run to its end (the database
    /// went away, a query failed). Rows are refused (UNAVAILABLE) until one passes, as the
    /// SQLite store refuses on any failed check: another node's change may have been a
    /// tampering this node has not ruled out.
    recheck_pending: bool,
    /// The highest anchor counter this handle has seen.
    anchor_seen: u64,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, RowState> {
        // Plain values: a panic elsewhere cannot leave them half-updated.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn saw_counter(&self, counter: u64) {
        let mut state = self.state();
        state.anchor_seen = state.anchor_seen.max(counter);
        self.anchor_published.fetch_max(counter, Ordering::Release);
    }

    /// The row key and the highest anchor counter seen, unless the store refuses to serve.
    fn serving(&self) -> Result<(Arc<RowKey>, u64)> {
        let state = self.state();
        if let Some(why) = &state.integrity {
            return Err(Error::StoreIntegrity(why.clone()));
        }
        if state.recheck_pending {
            return Err(Error::Unavailable(
                "the key store could not yet confirm its rows are intact; retry later".into(),
            ));
        }
        let key = state
            .key
            .clone()
            .ok_or_else(|| Error::internal("key store: the row key is not installed"))?;
        Ok((key, state.anchor_seen))
    }

    /// Whether a re-check is owed (the last one failed for a reason other than integrity);
    /// the follow thread retries it at its next poll.
    pub(super) fn recheck_pending(&self) -> bool {
        self.state().recheck_pending
    }

    /// Checks the anchor against every row MAC; an integrity failure stops the store serving
    /// rows until a later check passes. Any other failure (the database unreachable, a query
    /// refused) fails closed too: rows are refused as UNAVAILABLE and the check is retried at
    /// the next poll, until one runs to its end.
    pub(super) fn recheck_rows(&self) {
        let (key, seen) = {
            let state = self.state();
            match &state.key {
                Some(key) => (Arc::clone(key), state.anchor_seen),
                None => return,
            }
        };
        let checked = self
            .pool
            .get()
            .and_then(|mut conn| full_check(&mut conn, &key, seen, false));
        match checked {
            Ok(counter) => {
                self.saw_counter(counter);
                let mut state = self.state();
                if state.recheck_pending {
                    tracing::info!("key store: rows re-checked; serving again");
                }
                state.integrity = None;
                state.recheck_pending = false;
            }
            Err(Error::StoreIntegrity(why)) => {
                tracing::error!(problem = %why, "key store: refusing to serve rows until the database is restored");
                let mut state = self.state();
                state.integrity = Some(why);
                state.recheck_pending = false;
            }
            Err(e) => {
                let mut state = self.state();
                if !state.recheck_pending {
                    tracing::warn!(error = %e, "key store: cannot re-check the rows; refusing them until a re-check passes");
                }
                state.recheck_pending = true;
            }
        }
    }
}

impl changes::OnForeignChange for Inner {
    fn foreign_change(&self) {
        self.recheck_rows();
    }

    fn recheck_owed(&self) -> bool {
        self.recheck_pending()
    }
}

impl PostgresKeyStore {
    /// Opens the store on `pool`: migrates the schema (one node at a time; a newer schema is
    /// refused), positions this node at the change log's end and starts following it.
    /// `node_id` names this node in the change log; `staleness_bound` is how long the node
    /// may serve without having confirmed it read the log.
    pub fn open(pool: PgPool, node_id: &str, staleness_bound: Duration) -> Result<Self> {
        super::schema::migrate(&pool)?;
        let mut random = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
        let writer = i64::from_le_bytes(random);
        let follower = {
            let mut conn = pool.get()?;
            Arc::new(Follower::start(&mut *conn, writer, staleness_bound)?)
        };
        let inner = Arc::new(Inner {
            pool: pool.clone(),
            writer,
            node_id: node_id.to_owned(),
            rows: Mutex::new(RowState {
                key: None,
                integrity: None,
                recheck_pending: false,
                anchor_seen: 0,
            }),
            anchor_published: AtomicU64::new(0),
        });
        changes::spawn(
            pool.clone(),
            Arc::downgrade(&follower),
            Arc::downgrade(&inner),
        )?;
        Ok(Self {
            pool,
            inner,
            follower,
        })
    }

    /// The connection pool, for the other parts that live in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A write transaction without MAC'd rows, recorded in the change log as `kind`.
    pub(super) fn write_plain<T>(
        &self,
        kind: &str,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        self.pool.transaction(|tx| {
            let value = f(tx)?;
            changes::record(tx, self.inner.writer, &self.inner.node_id, kind, None)?;
            Ok(value)
        })
    }

    /// A read on a pooled connection.
    fn read<T>(&self, f: impl FnOnce(&mut postgres::Client) -> Result<T>) -> Result<T> {
        let mut conn = self.pool.get()?;
        f(&mut conn)
    }

    /// A read of MAC'd rows: refused while the store refuses to serve rows or has no key.
    fn read_rows<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client, &RowKey) -> Result<T>,
    ) -> Result<T> {
        let (key, _) = self.inner.serving()?;
        let mut conn = self.pool.get()?;
        f(&mut conn, &key)
    }

    /// A write transaction of MAC'd rows: `f` writes through [`Rows`], whose anchor is
    /// written back, and the change recorded as `kind` of `tenant`, in the same transaction.
    fn write_rows<T>(
        &self,
        kind: &str,
        tenant: Option<&TenantId>,
        f: impl FnOnce(&mut Rows<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        let (key, seen) = self.inner.serving()?;
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(map_error)?;
        let mut rows = Rows::begin(&mut tx, &key, seen)?;
        let value = f(&mut rows)?;
        let counter = rows.finish()?;
        changes::record(
            &mut tx,
            self.inner.writer,
            &self.inner.node_id,
            kind,
            tenant.map(TenantId::as_str),
        )?;
        tx.commit().map_err(map_error)?;
        self.inner.saw_counter(counter);
        Ok(value)
    }

    /// After keys were deleted (committed): rewrites `wrapped_keys` so the deleted rows'
    /// bytes are in no live file of the cluster. A plain VACUUM is not enough: it frees a dead
    /// row's space but leaves its bytes in the page until something overwrites them (the
    /// shredding test found a destroyed key that way). `VACUUM FULL` copies the live rows to
    /// a new file and truncates the old one at once; it locks the table exclusively while it
    /// copies, so it waits at most [`VACUUM_LOCK_WAIT`] for that lock (a waiting exclusive
    /// lock would hold up every other node's key loads) and else falls back to a plain
    /// VACUUM and says so: the next destruction, or the next start (the shred ledger's
    /// re-application), rewrites the table again. VACUUM cannot run inside a transaction,
    /// hence a separate statement after the commit. docs/OPERATIONS.md §15 gives what
    /// PostgreSQL keeps anyway (WAL, replicas, base backups, PITR archives).
    fn vacuum_keys(&self) {
        let rewritten = self.pool.get().and_then(|mut conn| {
            // Separate statements: a multi-statement string is one transaction, which VACUUM
            // refuses.
            conn.batch_execute(&format!(
                "SET lock_timeout = {}",
                VACUUM_LOCK_WAIT.as_millis()
            ))
            .map_err(map_error)?;
            let vacuumed = conn
                .batch_execute("VACUUM FULL wrapped_keys")
                .map_err(map_error);
            // The pool reuses the connection: no later call may inherit the timeout (a
            // connection that cannot reset it is broken and dropped by the pool).
            let reset = conn.batch_execute("RESET lock_timeout").map_err(map_error);
            vacuumed.and(reset)
        });
        let Err(e) = rewritten else {
            return;
        };
        tracing::warn!(error = %e, "key store: cannot rewrite the key table after a destruction now (VACUUM FULL); the destroyed rows' bytes may stay in its file until the next destruction or start");
        let vacuumed = self
            .pool
            .get()
            .and_then(|mut conn| conn.batch_execute("VACUUM wrapped_keys").map_err(map_error));
        if let Err(e) = vacuumed {
            tracing::warn!(error = %e, "key store: VACUUM after a destruction failed; autovacuum will reclaim the rows");
        }
    }

    /// Records in the change log, inside the caller's transaction, that `tenant` lost keys,
    /// so every node's shred ledger records it ([`BackupStore::destructions_since`]).
    fn record_destruction(
        &self,
        tx: &mut postgres::Transaction<'_>,
        tenant: &TenantId,
    ) -> Result<()> {
        changes::record(
            tx,
            self.inner.writer,
            &self.inner.node_id,
            DESTROY_KIND,
            Some(tenant.as_str()),
        )
    }

    /// The destroyed items of `tenants`, from verified rows: the tenant if it is destroyed,
    /// else each destroyed version.
    fn destroyed_items_of(&self, tenants: &[String]) -> Result<Vec<ShredItem>> {
        self.read_rows(|conn, key| {
            let mut items = Vec::new();
            for id in tenants {
                let id = tenant_id_of(id)?;
                let Some(tenant) = load_tenant(conn, key, &id)? else {
                    continue;
                };
                if tenant.state == TenantState::Destroyed {
                    items.push(ShredItem {
                        tenant_id: id,
                        version: None,
                    });
                    continue;
                }
                for version in load_versions(conn, key, &id)? {
                    if version.state == KeyVersionState::Destroyed {
                        items.push(ShredItem {
                            tenant_id: id.clone(),
                            version: Some(version.version),
                        });
                    }
                }
            }
            Ok(items)
        })
    }
}

/// The change-log kind of a destruction (a tenant shredded, a version destroyed), recorded
/// beside the change that did it.
const DESTROY_KIND: &str = "destroy";

/// Longest wait for the exclusive lock `VACUUM FULL` needs after a destruction.
const VACUUM_LOCK_WAIT: Duration = Duration::from_millis(500);

impl MasterKeyStore for PostgresKeyStore {
    fn master_versions(&self) -> Result<Vec<MasterVersionRecord>> {
        off_runtime(|| {
            self.read(|conn| {
                conn.query(
                    "SELECT version, check_value, created_at, retired_at FROM master_keys \
                     ORDER BY version",
                    &[],
                )
                .map_err(map_error)?
                .iter()
                .map(|row| {
                    Ok(MasterVersionRecord {
                        version: u32_of(row.try_get(0).map_err(map_error)?, "master version")?,
                        check_value: row.try_get(1).map_err(map_error)?,
                        created_at: row.try_get(2).map_err(map_error)?,
                        retired_at: row.try_get(3).map_err(map_error)?,
                    })
                })
                .collect()
            })
        })
    }

    fn insert_master_version(&self, record: &MasterVersionRecord) -> Result<()> {
        off_runtime(|| {
            self.write_plain("master", |tx| {
                tx.execute(
                    "INSERT INTO master_keys (version, check_value, created_at, retired_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (version) DO NOTHING",
                    &[
                        &i64::from(record.version),
                        &record.check_value,
                        &record.created_at,
                        &record.retired_at,
                    ],
                )
                .map_err(map_error)?;
                Ok(())
            })
        })
    }

    fn retire_master_version(&self, version: u32, at: i64) -> Result<bool> {
        off_runtime(|| {
            let version = i64::from(version);
            self.write_plain("master", |tx| {
                // Nothing may be wrapped under it meanwhile: the wrapping writers lock the anchor,
                // the retirement locks the master row; the NOT EXISTS sees every committed wrap.
                tx.execute(
                    "UPDATE master_keys SET retired_at = $2 WHERE version = $1 AND retired_at IS NULL \
                     AND NOT EXISTS (SELECT 1 FROM wrapped_keys WHERE master_version = $1) \
                     AND NOT EXISTS (SELECT 1 FROM audit_key WHERE master_version = $1)",
                    &[&version, &at],
                )
                .map_err(map_error)?;
                let retired: Option<Option<i64>> = tx
                    .query_opt(
                        "SELECT retired_at FROM master_keys WHERE version = $1",
                        &[&version],
                    )
                    .map_err(map_error)?
                    .map(|row| row.get(0));
                Ok(matches!(retired, Some(Some(_))))
            })
        })
    }

    fn count_wrapped_under(&self, master_version: u32) -> Result<u64> {
        off_runtime(|| {
            let version = i64::from(master_version);
            self.read(|conn| {
                let row = conn
                    .query_one(
                        "SELECT (SELECT COUNT(*) FROM wrapped_keys WHERE master_version = $1) + \
                         (SELECT COUNT(*) FROM audit_key WHERE master_version = $1)",
                        &[&version],
                    )
                    .map_err(map_error)?;
                Ok(u64_of(row.try_get(0).map_err(map_error)?))
            })
        })
    }

    fn wrapped_under(
        &self,
        master_version: u32,
        limit: usize,
    ) -> Result<Vec<(TenantId, u32, WrappedTenantKey)>> {
        off_runtime(|| {
            self.read(|conn| {
                conn.query(
                    "SELECT tenant_id, version, wrapped_key FROM wrapped_keys \
                     WHERE master_version = $1 ORDER BY tenant_id, version LIMIT $2",
                    &[
                        &i64::from(master_version),
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                )
                .map_err(map_error)?
                .iter()
                .map(|row| {
                    let id: String = row.try_get(0).map_err(map_error)?;
                    Ok((
                        tenant_id_of(&id)?,
                        u32_of(row.try_get(1).map_err(map_error)?, "key version")?,
                        WrappedTenantKey {
                            master_version,
                            bytes: row.try_get(2).map_err(map_error)?,
                        },
                    ))
                })
                .collect()
            })
        })
    }

    fn rewrap(&self, batch: &[Rewrapping]) -> Result<usize> {
        off_runtime(|| {
            self.write_plain("rewrap", |tx| {
                let statement = tx
                    .prepare(
                        "UPDATE wrapped_keys SET master_version = $4, wrapped_key = $5 \
                         WHERE tenant_id = $1 AND version = $2 AND master_version = $3",
                    )
                    .map_err(map_error)?;
                let mut done = 0usize;
                for item in batch {
                    let changed = tx
                        .execute(
                            &statement,
                            &[
                                &item.tenant_id.as_str(),
                                &i64::from(item.version),
                                &i64::from(item.from_master),
                                &i64::from(item.wrapped.master_version),
                                &item.wrapped.bytes,
                            ],
                        )
                        .map_err(map_error)?;
                    done += usize::try_from(changed).unwrap_or(0);
                }
                Ok(done)
            })
        })
    }

    fn audit_key(&self) -> Result<Option<WrappedTenantKey>> {
        off_runtime(|| {
            self.read(|conn| {
                conn.query_opt(
                    "SELECT master_version, wrapped_key FROM audit_key WHERE id = 1",
                    &[],
                )
                .map_err(map_error)?
                .map(|row| {
                    Ok(WrappedTenantKey {
                        master_version: u32_of(
                            row.try_get(0).map_err(map_error)?,
                            "master version",
                        )?,
                        bytes: row.try_get(1).map_err(map_error)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn put_audit_key(
        &self,
        wrapped: &WrappedTenantKey,
        replace_master: Option<u32>,
    ) -> Result<bool> {
        off_runtime(|| {
            let master = i64::from(wrapped.master_version);
            self.write_plain("audit-key", |tx| {
                let changed = match replace_master {
                    None => tx.execute(
                        "INSERT INTO audit_key (id, master_version, wrapped_key) VALUES (1, $1, $2) \
                         ON CONFLICT (id) DO NOTHING",
                        &[&master, &wrapped.bytes],
                    ),
                    Some(old) => tx.execute(
                        "UPDATE audit_key SET master_version = $1, wrapped_key = $2 \
                         WHERE id = 1 AND master_version = $3",
                        &[&master, &wrapped.bytes, &i64::from(old)],
                    ),
                }
                .map_err(map_error)?;
                Ok(changed == 1)
            })
        })
    }

    fn row_mac_upgrade_due(&self) -> Result<bool> {
        off_runtime(|| {
            let mut conn = self.pool.get()?;
            let due = conn
                .query_one(crate::store::ROW_MAC_UPGRADE_DUE, &[])
                .map_err(map_error)?;
            Ok(due.get(0))
        })
    }

    fn set_row_key(&self, key: RowKey, allow_upgrade: bool) -> Result<Option<u64>> {
        off_runtime(|| {
            let mut conn = self.pool.get()?;
            let upgraded = {
                let mut tx = conn.transaction().map_err(map_error)?;
                // Two nodes starting together on a new database: one upgrades, the other waits
                // and finds it done (writers' FOR UPDATE on the anchor conflicts with this too).
                tx.batch_execute("LOCK TABLE row_anchor IN EXCLUSIVE MODE")
                    .map_err(map_error)?;
                let marks = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM row_mac_upgrade), \
                         EXISTS (SELECT 1 FROM row_anchor)",
                        &[],
                    )
                    .map_err(map_error)?;
                let pending: bool = marks.get(0);
                let has_anchor: bool = marks.get(1);
                if pending && (has_anchor || !allow_upgrade) {
                    let e = integrity(
                        "the PostgreSQL key store asks for the upgrade to row MACs, but it was \
                         upgraded before: it was rewritten by someone without the master key; \
                         restore it from a backup",
                    );
                    self.inner.state().integrity = Some(e.to_string());
                    return Err(e);
                }
                if pending {
                    let rows = mac_existing_rows(&mut tx, &key)?;
                    tx.execute("DELETE FROM row_mac_upgrade", &[])
                        .map_err(map_error)?;
                    tx.commit().map_err(map_error)?;
                    Some(rows)
                } else {
                    tx.commit().map_err(map_error)?;
                    None
                }
            };
            match full_check(&mut conn, &key, 0, true) {
                Ok(counter) => {
                    {
                        let mut state = self.inner.state();
                        state.integrity = None;
                        state.key = Some(Arc::new(key));
                    }
                    self.inner.saw_counter(counter);
                    Ok(upgraded)
                }
                Err(e) => {
                    self.inner.state().integrity = Some(e.to_string());
                    Err(e)
                }
            }
        })
    }
}

impl TenantStore for PostgresKeyStore {
    fn create_tenant(&self, tenant: &TenantRecord, first: &KeyVersionRecord) -> Result<()> {
        off_runtime(|| {
            let wrapped = first
                .wrapped
                .as_ref()
                .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
            self.write_rows("tenant", Some(&tenant.tenant_id), |rows| {
                insert_tenant(rows, tenant, first, wrapped)
            })?;
            crate::store::failpoint(crate::store::FAILPOINT_AFTER_KEY_COMMIT);
            Ok(())
        })
    }

    fn create_tenants(&self, tenants: &[(TenantRecord, KeyVersionRecord)]) -> Result<()> {
        off_runtime(|| {
            self.write_rows("tenant", None, |rows| {
                for (tenant, first) in tenants {
                    let wrapped = first
                        .wrapped
                        .as_ref()
                        .ok_or_else(|| Error::internal("a new tenant needs a wrapped key"))?;
                    insert_tenant(rows, tenant, first, wrapped)?;
                }
                Ok(())
            })
        })
    }

    fn tenant(&self, id: &TenantId) -> Result<Option<TenantRecord>> {
        off_runtime(|| self.read_rows(|conn, key| load_tenant(conn, key, id)))
    }

    fn tenant_snapshot(
        &self,
        id: &TenantId,
    ) -> Result<Option<(TenantRecord, Vec<KeyVersionRecord>)>> {
        off_runtime(|| {
            self.read_rows(|conn, key| {
                let mut tx = conn
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .map_err(map_error)?;
                let Some(tenant) = load_tenant(&mut tx, key, id)? else {
                    return Ok(None);
                };
                let versions = load_versions(&mut tx, key, id)?;
                tx.commit().map_err(map_error)?;
                Ok(Some((tenant, versions)))
            })
        })
    }

    fn list_tenants(&self, after: Option<&TenantId>, limit: usize) -> Result<Vec<TenantRecord>> {
        off_runtime(|| {
            self.read_rows(|conn, key| {
                conn.query(
                    &format!(
                        "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id > $1 \
                         ORDER BY tenant_id LIMIT $2"
                    ),
                    &[
                        &after.map(TenantId::as_str).unwrap_or(""),
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                )
                .map_err(map_error)?
                .iter()
                .map(|row| verified_tenant(key, stored_tenant(row)?).map(|row| row.record))
                .collect()
            })
        })
    }

    fn key_versions(&self, id: &TenantId) -> Result<Vec<KeyVersionRecord>> {
        off_runtime(|| self.read_rows(|conn, key| load_versions(conn, key, id)))
    }

    fn add_key_version(
        &self,
        id: &TenantId,
        expected_primary: u32,
        version: &KeyVersionRecord,
    ) -> Result<TenantRecord> {
        off_runtime(|| {
            let wrapped = version
                .wrapped
                .as_ref()
                .ok_or_else(|| Error::internal("a new version needs a wrapped key"))?;
            self.write_rows("rotation", Some(id), |rows| {
                let stored = require_tenant_stored(rows.tx, rows.key, id)?;
                let mut tenant = stored.record;
                lifecycle::check_rotation(tenant.state, tenant.primary_version, expected_primary)?;
                insert_version(rows, id, version, wrapped)?;
                tenant.primary_version = version.version;
                rows.put_tenant(&tenant, Some(&stored.mac))?;
                Ok(tenant)
            })
        })
    }

    fn set_tenant_state(
        &self,
        id: &TenantId,
        transition: TenantTransition,
        now: i64,
    ) -> Result<TenantRecord> {
        off_runtime(|| {
            let (record, shredded) = self.write_rows("tenant-state", Some(id), |rows| {
                let stored = require_tenant_stored(rows.tx, rows.key, id)?;
                let mut tenant = stored.record;
                let change = lifecycle::tenant_transition(
                    tenant.state,
                    tenant.deletion_time,
                    transition,
                    now,
                )?;
                if change.shred {
                    shred_rows(rows, id, None, change.destroyed_at.unwrap_or(now))?;
                    self.record_destruction(rows.tx, id)?;
                } else {
                    tenant.state = change.state;
                    tenant.deletion_time = change.deletion_time;
                    rows.put_tenant(&tenant, Some(&stored.mac))?;
                }
                Ok((
                    require_tenant_stored(rows.tx, rows.key, id)?.record,
                    change.shred,
                ))
            })?;
            if shredded {
                crate::store::failpoint(crate::store::FAILPOINT_BEFORE_SHRED_SEQUENCE);
                self.vacuum_keys();
            }
            Ok(record)
        })
    }

    fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord> {
        off_runtime(|| {
            self.write_rows("policy", Some(id), |rows| {
                let stored = require_tenant_stored(rows.tx, rows.key, id)?;
                let mut tenant = stored.record;
                lifecycle::require_not_destroyed(tenant.state)?;
                // Stored as BIGINT: the same saturation the row is read back with.
                tenant.rotation_period_seconds = u64_of(i64_of(rotation_period_seconds));
                tenant.max_encryptions = u64_of(i64_of(max_encryptions));
                rows.put_tenant(&tenant, Some(&stored.mac))?;
                Ok(tenant)
            })
        })
    }

    fn set_key_version_state(
        &self,
        id: &TenantId,
        version: u32,
        transition: VersionTransition,
    ) -> Result<KeyVersionRecord> {
        off_runtime(|| {
            let record = self.write_rows("version-state", Some(id), |rows| {
                let tenant = require_tenant_stored(rows.tx, rows.key, id)?.record;
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
                    self.record_destruction(rows.tx, id)?;
                } else if let Some(current) = current {
                    let mut record = current.record;
                    record.state = to;
                    rows.put_version(id, &record, Some(&current.mac))?;
                }
                load_version(rows.tx, rows.key, id, version)?.ok_or(Error::NotFound("key version"))
            })?;
            if record.state == KeyVersionState::Destroyed {
                self.vacuum_keys();
            }
            Ok(record)
        })
    }

    fn reserve_encryptions(&self, id: &TenantId, version: u32, count: u64) -> Result<u64> {
        off_runtime(|| {
            // Atomic in SQL: the anchor's row lock orders every reservation of every node, and the
            // count is read and rewritten (with its MAC) inside that transaction.
            self.write_rows("budget", Some(id), |rows| {
                let stored = load_version_stored(rows.tx, rows.key, id, version)?
                    .ok_or(Error::NotFound("key version"))?;
                let mut record = stored.record;
                record.encryptions = u64_of(i64_of(record.encryptions.saturating_add(count)));
                rows.put_version(id, &record, Some(&stored.mac))?;
                Ok(record.encryptions)
            })
        })
    }

    fn tenants_due(&self, now: i64, budget_margin: f64) -> Result<DueTenants> {
        off_runtime(|| {
            self.read(|conn| {
                let mut due = DueTenants::default();
                for row in conn
                    .query(
                        "SELECT t.tenant_id FROM tenants t JOIN key_versions v \
                         ON v.tenant_id = t.tenant_id AND v.version = t.primary_version \
                         WHERE t.state IN ($1, $2) AND ( \
                           (t.rotation_period_seconds > 0 \
                            AND v.created_at + t.rotation_period_seconds <= $3) \
                           OR v.encryptions >= CAST(t.max_encryptions * $4::float8 AS BIGINT)) \
                         ORDER BY t.tenant_id",
                        &[
                            &lifecycle::ROTATABLE[0].code(),
                            &lifecycle::ROTATABLE[1].code(),
                            &now,
                            &(1.0 - budget_margin),
                        ],
                    )
                    .map_err(map_error)?
                {
                    let id: String = row.try_get(0).map_err(map_error)?;
                    due.rotate.push(tenant_id_of(&id)?);
                }
                for row in conn
                    .query(
                        "SELECT tenant_id FROM tenants WHERE state = $1 AND deletion_time <= $2 \
                         ORDER BY tenant_id",
                        &[&TenantState::PendingDeletion.code(), &now],
                    )
                    .map_err(map_error)?
                {
                    let id: String = row.try_get(0).map_err(map_error)?;
                    due.destroy.push(tenant_id_of(&id)?);
                }
                Ok(due)
            })
        })
    }
}

impl TokenStore for PostgresKeyStore {
    fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        off_runtime(|| self.write_rows("token", None, |rows| rows.put_token(token, None)))
    }

    fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>> {
        off_runtime(|| {
            // The row's MAC covers its hash, role, scope, operations, expiry and revocation: a
            // row the database administrator forged, widened or un-revoked is refused here.
            self.read_rows(|conn, key| {
                conn.query_opt(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"),
                    &[&hash.as_slice()],
                )
                .map_err(map_error)?
                .map(|row| verified_token(key, stored_token(&row)?))
                .transpose()
            })
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        off_runtime(|| {
            self.read_rows(|conn, key| {
                conn.query(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"),
                    &[],
                )
                .map_err(map_error)?
                .iter()
                .map(|row| verified_token(key, stored_token(row)?))
                .collect()
            })
        })
    }

    fn revoke_token(&self, id: &str, at: i64) -> Result<bool> {
        off_runtime(|| {
            self.write_rows("token", None, |rows| {
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
        })
    }

    fn set_token_quarantine(&self, id: &str, at: Option<i64>) -> Result<bool> {
        off_runtime(|| {
            self.write_rows("token", None, |rows| {
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
        })
    }
}

impl ChangeDetection for PostgresKeyStore {
    fn anchor_counter(&self) -> u64 {
        self.inner.anchor_published.load(Ordering::Acquire)
    }

    fn change_generation(&self) -> Result<u64> {
        off_runtime(|| {
            // A poll of our own, begun after the call: every change committed before it is seen.
            let mut conn = self.pool.get()?;
            let polled = self.follower.poll(&mut *conn)?;
            drop(conn);
            if polled.foreign || self.inner.recheck_pending() {
                self.inner.recheck_rows();
            }
            Ok(polled.generation)
        })
    }

    fn try_change_generation(&self) -> Option<Result<u64>> {
        // From memory: the follow thread keeps it current, and past the staleness bound
        // without a confirmed poll the answer is UNAVAILABLE (fail closed).
        Some(self.follower.current())
    }
}

impl BackupStore for PostgresKeyStore {
    fn snapshot_to(&self, _dest: &std::path::Path) -> Result<()> {
        off_runtime(|| {
            Err(Error::FailedPrecondition(
                "the key store is in PostgreSQL: back it up with PostgreSQL's own tools \
                 (pg_basebackup or pg_dump) together with the keyring and the shred ledger \
                 (docs/OPERATIONS.md, \"PostgreSQL\")"
                    .into(),
            ))
        })
    }

    fn counts(&self) -> Result<StoreCounts> {
        off_runtime(|| {
            self.read(|conn| {
                let row = conn
                    .query_one(
                        "SELECT (SELECT COUNT(*) FROM tenants), (SELECT COUNT(*) FROM wrapped_keys)",
                        &[],
                    )
                    .map_err(map_error)?;
                Ok(StoreCounts {
                    tenants: u64_of(row.try_get(0).map_err(map_error)?),
                    wrapped_keys: u64_of(row.try_get(1).map_err(map_error)?),
                })
            })
        })
    }

    fn for_each_wrapped_key(
        &self,
        f: &mut dyn FnMut(&TenantId, u32, &WrappedTenantKey) -> Result<()>,
    ) -> Result<u64> {
        // Read first, then call `f` on the caller's thread (`f` need not be Send).
        let rows = off_runtime(|| {
            self.read(|conn| {
                let mut rows = Vec::new();
                for row in conn
                    .query(
                        "SELECT tenant_id, version, master_version, wrapped_key FROM wrapped_keys \
                         ORDER BY tenant_id, version",
                        &[],
                    )
                    .map_err(map_error)?
                {
                    let id: String = row.try_get(0).map_err(map_error)?;
                    let wrapped = WrappedTenantKey {
                        master_version: u32_of(
                            row.try_get(2).map_err(map_error)?,
                            "master version",
                        )?,
                        bytes: row.try_get(3).map_err(map_error)?,
                    };
                    rows.push((
                        tenant_id_of(&id)?,
                        u32_of(row.try_get(1).map_err(map_error)?, "key version")?,
                        wrapped,
                    ));
                }
                Ok(rows)
            })
        })?;
        for (id, version, wrapped) in &rows {
            f(id, *version, wrapped)?;
        }
        Ok(rows.len() as u64)
    }

    fn destroyed_items(&self) -> Result<Vec<ShredItem>> {
        off_runtime(|| {
            self.read_rows(|conn, key| {
                let mut items = Vec::new();
                for row in conn
                    .query(
                        &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE state = $1"),
                        &[&TenantState::Destroyed.code()],
                    )
                    .map_err(map_error)?
                {
                    items.push(ShredItem {
                        tenant_id: verified_tenant(key, stored_tenant(&row)?)?.record.tenant_id,
                        version: None,
                    });
                }
                for row in conn
                    .query(
                        &format!(
                            "SELECT {VERSION_COLUMNS}, v.tenant_id FROM {VERSION_FROM} \
                             JOIN tenants t ON t.tenant_id = v.tenant_id \
                             WHERE v.state = $1 AND t.state != $2"
                        ),
                        &[
                            &KeyVersionState::Destroyed.code(),
                            &TenantState::Destroyed.code(),
                        ],
                    )
                    .map_err(map_error)?
                {
                    let id: String = row.try_get(8).map_err(map_error)?;
                    let id = tenant_id_of(&id)?;
                    let version = verified_version(key, &id, stored_version(&row)?)?
                        .record
                        .version;
                    items.push(ShredItem {
                        tenant_id: id,
                        version: Some(version),
                    });
                }
                Ok(items)
            })
        })
    }

    fn shred(&self, items: &[ShredItem], now: i64) -> Result<Vec<ShredItem>> {
        off_runtime(|| {
            let done = self.write_rows("shred", None, |rows| {
                let mut done = Vec::new();
                for item in items {
                    let Some(tenant) = load_tenant(rows.tx, rows.key, &item.tenant_id)? else {
                        // A tenant destroyed after this database's copy was taken: its id becomes a
                        // tombstone here too, so it cannot be created again.
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
                            self.record_destruction(rows.tx, &item.tenant_id)?;
                            done.push(item.clone());
                        }
                        continue;
                    };
                    if tenant.state == TenantState::Destroyed {
                        continue;
                    }
                    if let Some(version) = item.version {
                        let Some(record) =
                            load_version(rows.tx, rows.key, &item.tenant_id, version)?
                        else {
                            continue;
                        };
                        if record.state == KeyVersionState::Destroyed && record.wrapped.is_none() {
                            continue;
                        }
                    }
                    shred_rows(rows, &item.tenant_id, item.version, now)?;
                    self.record_destruction(rows.tx, &item.tenant_id)?;
                    done.push(item.clone());
                }
                Ok(done)
            })?;
            if !done.is_empty() {
                self.vacuum_keys();
            }
            Ok(done)
        })
    }

    fn replace_tenant(&self, tenant: &TenantRecord, versions: &[KeyVersionRecord]) -> Result<()> {
        off_runtime(|| {
            let id = tenant.tenant_id.as_str();
            self.write_rows("import", Some(&tenant.tenant_id), |rows| {
                let live = load_tenant_stored(rows.tx, rows.key, &tenant.tenant_id)?;
                if let Some(live) = &live {
                    lifecycle::require_not_destroyed(live.record.state)?;
                }
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
                    .execute("DELETE FROM wrapped_keys WHERE tenant_id = $1", &[&id])
                    .map_err(map_error)?;
                rows.tx
                    .execute("DELETE FROM key_versions WHERE tenant_id = $1", &[&id])
                    .map_err(map_error)?;
                rows.put_tenant(tenant, live.as_ref().map(|l| l.mac.as_slice()))?;
                for version in versions {
                    let version = &crate::store::counter_not_behind(
                        version,
                        current.iter().map(|c| &c.record),
                    );
                    rows.put_version(&tenant.tenant_id, version, None)?;
                    if let Some(wrapped) = &version.wrapped {
                        rows.tx
                            .execute(
                                "INSERT INTO wrapped_keys (tenant_id, version, master_version, \
                                 wrapped_key) VALUES ($1, $2, $3, $4)",
                                &[
                                    &id,
                                    &i64::from(version.version),
                                    &i64::from(wrapped.master_version),
                                    &wrapped.bytes,
                                ],
                            )
                            .map_err(map_error)?;
                    }
                }
                Ok(())
            })?;
            self.vacuum_keys();
            Ok(())
        })
    }

    fn shred_ledger_head(&self) -> Result<Option<LedgerHead>> {
        off_runtime(|| {
            self.read(|conn| {
                conn.query_opt(
                    "SELECT entries, head_mac FROM shred_ledger_heads WHERE node_id = $1",
                    &[&self.inner.node_id],
                )
                .map_err(map_error)?
                .map(|row| {
                    Ok(LedgerHead {
                        entries: u64_of(row.try_get(0).map_err(map_error)?),
                        head_mac: row.try_get(1).map_err(map_error)?,
                    })
                })
                .transpose()
            })
        })
    }

    fn set_shred_ledger_head(&self, head: &LedgerHead) -> Result<()> {
        off_runtime(|| {
            self.pool.transaction(|tx| {
                tx.execute(
                    "INSERT INTO shred_ledger_heads (node_id, entries, head_mac) \
                     VALUES ($1, $2, $3) \
                     ON CONFLICT (node_id) DO UPDATE SET entries = excluded.entries, \
                     head_mac = excluded.head_mac \
                     WHERE excluded.entries > shred_ledger_heads.entries",
                    &[&self.inner.node_id, &i64_of(head.entries), &head.head_mac],
                )
                .map_err(map_error)?;
                Ok(())
            })
        })
    }

    fn destructions_since(&self, cursor: Option<u64>) -> Result<Option<(u64, Vec<ShredItem>)>> {
        off_runtime(|| {
            // The head first: every destruction numbered up to it is read below (or by the
            // full scan), and the next call starts after it.
            let (head, tenants) = self.read(|conn| {
                let head: i64 = conn
                    .query_one("SELECT seq FROM kms_change_head WHERE id = 1", &[])
                    .map_err(map_error)?
                    .try_get(0)
                    .map_err(map_error)?;
                let Some(after) = cursor else {
                    return Ok((head, None));
                };
                let after = i64_of(after);
                // Sequence numbers are dense (each is taken and inserted in one
                // transaction): a log that starts past `after + 1` was pruned meanwhile.
                let oldest: Option<i64> = conn
                    .query_one("SELECT MIN(seq) FROM kms_changes", &[])
                    .map_err(map_error)?
                    .try_get(0)
                    .map_err(map_error)?;
                if oldest.is_some_and(|oldest| oldest > after.saturating_add(1)) {
                    return Ok((head, None));
                }
                let tenants = conn
                    .query(
                        "SELECT DISTINCT tenant_id FROM kms_changes WHERE kind = $1 \
                         AND seq > $2 AND seq <= $3 AND tenant_id IS NOT NULL",
                        &[&DESTROY_KIND, &after, &head],
                    )
                    .map_err(map_error)?
                    .iter()
                    .map(|row| row.try_get(0).map_err(map_error))
                    .collect::<Result<Vec<String>>>()?;
                Ok((head, Some(tenants)))
            })?;
            let items = match tenants {
                None => self.destroyed_items()?,
                Some(tenants) => self.destroyed_items_of(&tenants)?,
            };
            Ok(Some((u64_of(head), items)))
        })
    }

    fn unreconciled_key_changes(&self) -> Result<((i64, u64), Vec<KeyChange>)> {
        off_runtime(|| {
            self.read(|conn| {
                let mut tx = conn
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .map_err(map_error)?;
                let row = tx
                    .query_one(
                        "SELECT through_secs, audit_seq FROM audit_reconciled WHERE id = 1",
                        &[],
                    )
                    .map_err(map_error)?;
                let secs: i64 = row.try_get(0).map_err(map_error)?;
                let seq: i64 = row.try_get(1).map_err(map_error)?;
                let changes = tx
                    .query(
                        "SELECT v.tenant_id, v.version, v.created_at FROM key_versions v \
                         WHERE v.created_at >= $1 AND NOT EXISTS (SELECT 1 FROM \
                         audit_reconciled_boundary b WHERE b.tenant_id = v.tenant_id \
                         AND b.version = v.version) \
                         ORDER BY v.created_at, v.tenant_id, v.version",
                        &[&secs],
                    )
                    .map_err(map_error)?
                    .iter()
                    .map(|row| {
                        let id: String = row.try_get(0).map_err(map_error)?;
                        Ok(KeyChange {
                            tenant_id: tenant_id_of(&id)?,
                            version: u32_of(row.try_get(1).map_err(map_error)?, "key version")?,
                            at_secs: row.try_get(2).map_err(map_error)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                tx.commit().map_err(map_error)?;
                Ok(((secs, u64_of(seq)), changes))
            })
        })
    }

    fn set_audit_reconciled_through(
        &self,
        secs: i64,
        audit_seq: u64,
        checked: &[KeyChange],
    ) -> Result<()> {
        off_runtime(|| {
            self.pool.transaction(|tx| {
                let current: i64 = tx
                    .query_one(
                        "SELECT through_secs FROM audit_reconciled WHERE id = 1 FOR UPDATE",
                        &[],
                    )
                    .map_err(map_error)?
                    .try_get(0)
                    .map_err(map_error)?;
                let secs = secs.max(current);
                if secs > current {
                    tx.execute("DELETE FROM audit_reconciled_boundary", &[])
                        .map_err(map_error)?;
                }
                tx.execute(
                    "UPDATE audit_reconciled SET through_secs = $1, audit_seq = $2 WHERE id = 1",
                    &[&secs, &i64_of(audit_seq)],
                )
                .map_err(map_error)?;
                for change in checked.iter().filter(|c| c.at_secs >= secs) {
                    tx.execute(
                        "INSERT INTO audit_reconciled_boundary (tenant_id, version) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                        &[&change.tenant_id.as_str(), &i64::from(change.version)],
                    )
                    .map_err(map_error)?;
                }
                Ok(())
            })
        })
    }
}

fn insert_tenant(
    rows: &mut Rows<'_, '_>,
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

/// Crypto-shreds inside the caller's transaction: deletes the wrapped keys of a whole tenant
/// (`version` None) or of one version and marks them DESTROYED; a whole tenant becomes a
/// DESTROYED tombstone. Version rows are rewritten without checking their MACs first:
/// destroying never widens anything, so a tampered row must not keep its key alive.
fn shred_rows(
    rows: &mut Rows<'_, '_>,
    id: &TenantId,
    version: Option<u32>,
    destroyed_at: i64,
) -> Result<()> {
    let targets: Vec<u32> = match version {
        Some(version) => vec![version],
        None => rows
            .tx
            .query(
                "SELECT version FROM key_versions WHERE tenant_id = $1",
                &[&id.as_str()],
            )
            .map_err(map_error)?
            .iter()
            .map(|row| u32_of(row.get(0), "key version"))
            .collect::<Result<_>>()?,
    };
    match version {
        None => rows.tx.execute(
            "DELETE FROM wrapped_keys WHERE tenant_id = $1",
            &[&id.as_str()],
        ),
        Some(version) => rows.tx.execute(
            "DELETE FROM wrapped_keys WHERE tenant_id = $1 AND version = $2",
            &[&id.as_str(), &i64::from(version)],
        ),
    }
    .map_err(map_error)?;
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
    rows: &mut Rows<'_, '_>,
    id: &TenantId,
    version: &KeyVersionRecord,
    wrapped: &WrappedTenantKey,
) -> Result<()> {
    // Never wrap under a retired master version (it may be gone from the keyring already).
    let retired: Option<Option<i64>> = rows
        .tx
        .query_opt(
            "SELECT retired_at FROM master_keys WHERE version = $1",
            &[&i64::from(wrapped.master_version)],
        )
        .map_err(map_error)?
        .map(|row| row.get(0));
    if matches!(retired, Some(Some(_))) {
        return Err(Error::RetiredMasterVersion(wrapped.master_version));
    }
    rows.put_version(id, version, None)?;
    rows.tx
        .execute(
            "INSERT INTO wrapped_keys (tenant_id, version, master_version, wrapped_key) \
             VALUES ($1, $2, $3, $4)",
            &[
                &id.as_str(),
                &i64::from(version.version),
                &i64::from(wrapped.master_version),
                &wrapped.bytes,
            ],
        )
        .map_err(map_error)?;
    Ok(())
}
