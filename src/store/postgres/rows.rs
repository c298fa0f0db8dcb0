//! Reading and writing the MAC'd rows of the PostgreSQL key store: the same canonical
//! encodings, generations and anchor as keys.db ([`crate::store::row_auth`]), so a row a
//! database administrator without the master key edited, forged, moved or rolled back is
//! refused exactly as on SQLite.

use postgres::GenericClient;
use postgres::types::ToSql;

use super::connect::map_error;
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result};
use crate::store::row_auth::{Anchor, RowDigest, RowKey};
use crate::store::{KeyVersionRecord, TenantRecord, TokenRecord, WrappedTenantKey};

/// SQL parameters.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A column that does not hold what the schema promises (a database writer's doing, or a bug).
pub(super) fn bad_column(what: &str) -> Error {
    Error::internal(format!("key store: invalid {what} in PostgreSQL"))
}

/// A stored integer as a `u32`.
pub(super) fn u32_of(value: i64, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| bad_column(what))
}

/// A stored integer as a `u64` (negative reads as 0, as on SQLite).
pub(super) fn u64_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A count as a stored integer (saturating, as on SQLite).
pub(super) fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A tenant id as stored.
pub(super) fn tenant_id_of(text: &str) -> Result<TenantId> {
    TenantId::parse(text).map_err(|_| bad_column("tenant id"))
}

/// Tenant columns, then `generation, mac`.
pub(super) const TENANT_COLUMNS: &str = "tenant_id, state, primary_version, created_at, \
     rotation_period_seconds, max_encryptions, deletion_time, destroyed_at, generation, mac";

/// Key-version columns with its wrapped key (`v` and `w`), then `generation, mac`.
pub(super) const VERSION_COLUMNS: &str = "v.version, v.state, v.created_at, v.encryptions, \
     w.master_version, w.wrapped_key, v.generation, v.mac";

/// The join that [`VERSION_COLUMNS`] reads from.
pub(super) const VERSION_FROM: &str = "key_versions v LEFT JOIN wrapped_keys w \
     ON w.tenant_id = v.tenant_id AND w.version = v.version";

/// Token columns, then `generation, mac`.
pub(super) const TOKEN_COLUMNS: &str = "id, name, hash, role, tenants, operations, created_at, \
     expires_at, revoked_at, generation, mac, quarantined_at";

/// A MAC'd row as stored: the record, the generation of its last write and its MAC (empty if
/// NULL, which no MAC matches).
pub(super) struct Stored<T> {
    pub record: T,
    pub generation: u64,
    pub mac: Vec<u8>,
}

fn stored<T>(row: &postgres::Row, record: T, first: usize) -> Result<Stored<T>> {
    Ok(Stored {
        record,
        generation: u64_of(row.try_get(first).map_err(map_error)?),
        mac: row
            .try_get::<_, Option<Vec<u8>>>(first + 1)
            .map_err(map_error)?
            .unwrap_or_default(),
    })
}

/// A row of [`TENANT_COLUMNS`].
pub(super) fn stored_tenant(row: &postgres::Row) -> Result<Stored<TenantRecord>> {
    let get = |i: usize| row.try_get::<_, i64>(i).map_err(map_error);
    let id: String = row.try_get(0).map_err(map_error)?;
    let record = TenantRecord {
        tenant_id: tenant_id_of(&id)?,
        state: TenantState::from_code(get(1)?).ok_or_else(|| bad_column("tenant state"))?,
        primary_version: u32_of(get(2)?, "primary version")?,
        created_at: get(3)?,
        rotation_period_seconds: u64_of(get(4)?),
        max_encryptions: u64_of(get(5)?),
        deletion_time: row.try_get(6).map_err(map_error)?,
        destroyed_at: row.try_get(7).map_err(map_error)?,
    };
    stored(row, record, 8)
}

/// A row of [`VERSION_COLUMNS`].
pub(super) fn stored_version(row: &postgres::Row) -> Result<Stored<KeyVersionRecord>> {
    let get = |i: usize| row.try_get::<_, i64>(i).map_err(map_error);
    let master: Option<i64> = row.try_get(4).map_err(map_error)?;
    let bytes: Option<Vec<u8>> = row.try_get(5).map_err(map_error)?;
    let wrapped = match (master, bytes) {
        (Some(m), Some(bytes)) => Some(WrappedTenantKey {
            master_version: u32_of(m, "master version")?,
            bytes,
        }),
        _ => None,
    };
    let record = KeyVersionRecord {
        version: u32_of(get(0)?, "key version")?,
        state: KeyVersionState::from_code(get(1)?)
            .ok_or_else(|| bad_column("key version state"))?,
        created_at: get(2)?,
        encryptions: u64_of(get(3)?),
        wrapped,
    };
    stored(row, record, 6)
}

/// A row of [`TOKEN_COLUMNS`].
pub(super) fn stored_token(row: &postgres::Row) -> Result<Stored<TokenRecord>> {
    let hash: Vec<u8> = row.try_get(2).map_err(map_error)?;
    let record = TokenRecord {
        id: row.try_get(0).map_err(map_error)?,
        name: row.try_get(1).map_err(map_error)?,
        hash: hash.try_into().map_err(|_| bad_column("token hash"))?,
        role: row.try_get(3).map_err(map_error)?,
        tenants: row.try_get(4).map_err(map_error)?,
        operations: row.try_get(5).map_err(map_error)?,
        created_at: row.try_get(6).map_err(map_error)?,
        expires_at: row.try_get(7).map_err(map_error)?,
        revoked_at: row.try_get(8).map_err(map_error)?,
        quarantined_at: row.try_get(11).map_err(map_error)?,
    };
    stored(row, record, 9)
}

/// A tenant row whose MAC checked out.
pub(super) fn verified_tenant(
    key: &RowKey,
    row: Stored<TenantRecord>,
) -> Result<Stored<TenantRecord>> {
    key.verify_tenant(&row.record, row.generation, &row.mac)?;
    Ok(row)
}

/// A key-version row whose MAC checked out.
pub(super) fn verified_version(
    key: &RowKey,
    id: &TenantId,
    row: Stored<KeyVersionRecord>,
) -> Result<Stored<KeyVersionRecord>> {
    key.verify_key_version(id, &row.record, row.generation, &row.mac)?;
    Ok(row)
}

/// A token row whose MAC checked out.
pub(super) fn verified_token(key: &RowKey, row: Stored<TokenRecord>) -> Result<TokenRecord> {
    key.verify_token(&row.record, row.generation, &row.mac)?;
    Ok(row.record)
}

/// A tenant row as stored, its MAC not checked yet.
pub(super) fn load_tenant_unchecked(
    client: &mut impl GenericClient,
    id: &TenantId,
) -> Result<Option<Stored<TenantRecord>>> {
    client
        .query_opt(
            &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1"),
            &[&id.as_str()],
        )
        .map_err(map_error)?
        .map(|row| stored_tenant(&row))
        .transpose()
}

/// A tenant row whose MAC checked out, with its MAC.
pub(super) fn load_tenant_stored(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
) -> Result<Option<Stored<TenantRecord>>> {
    load_tenant_unchecked(client, id)?
        .map(|row| verified_tenant(key, row))
        .transpose()
}

/// A tenant whose MAC checked out.
pub(super) fn load_tenant(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
) -> Result<Option<TenantRecord>> {
    Ok(load_tenant_stored(client, key, id)?.map(|row| row.record))
}

/// A tenant that must exist, its MAC checked, with its MAC.
pub(super) fn require_tenant_stored(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
) -> Result<Stored<TenantRecord>> {
    load_tenant_stored(client, key, id)?.ok_or(Error::NotFound("tenant"))
}

/// A key-version row as stored, its MAC not checked yet.
pub(super) fn load_version_unchecked(
    client: &mut impl GenericClient,
    id: &TenantId,
    version: u32,
) -> Result<Option<Stored<KeyVersionRecord>>> {
    client
        .query_opt(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} \
                 WHERE v.tenant_id = $1 AND v.version = $2"
            ),
            &[&id.as_str(), &i64::from(version)],
        )
        .map_err(map_error)?
        .map(|row| stored_version(&row))
        .transpose()
}

/// A key-version row whose MAC checked out, with its MAC.
pub(super) fn load_version_stored(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
    version: u32,
) -> Result<Option<Stored<KeyVersionRecord>>> {
    load_version_unchecked(client, id, version)?
        .map(|row| verified_version(key, id, row))
        .transpose()
}

/// A key-version row whose MAC checked out.
pub(super) fn load_version(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
    version: u32,
) -> Result<Option<KeyVersionRecord>> {
    Ok(load_version_stored(client, key, id, version)?.map(|row| row.record))
}

/// A tenant's key-version rows, oldest first, each MAC checked, with their MACs.
pub(super) fn load_versions_stored(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
) -> Result<Vec<Stored<KeyVersionRecord>>> {
    client
        .query(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE v.tenant_id = $1 \
                 ORDER BY v.version"
            ),
            &[&id.as_str()],
        )
        .map_err(map_error)?
        .iter()
        .map(|row| verified_version(key, id, stored_version(row)?))
        .collect()
}

/// A tenant's key versions, oldest first, each MAC checked.
pub(super) fn load_versions(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &TenantId,
) -> Result<Vec<KeyVersionRecord>> {
    Ok(load_versions_stored(client, key, id)?
        .into_iter()
        .map(|row| row.record)
        .collect())
}

/// A token row (by id) whose MAC checked out, with its MAC.
pub(super) fn load_token_stored(
    client: &mut impl GenericClient,
    key: &RowKey,
    id: &str,
) -> Result<Option<Stored<TokenRecord>>> {
    let Some(row) = client
        .query_opt(
            &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"),
            &[&id],
        )
        .map_err(map_error)?
    else {
        return Ok(None);
    };
    let row = stored_token(&row)?;
    key.verify_token(&row.record, row.generation, &row.mac)?;
    Ok(Some(row))
}

/// An integrity failure found by the store itself (not by a row's MAC), logged here.
pub(super) fn integrity(what: impl Into<String>) -> Error {
    let what = what.into();
    tracing::error!(problem = %what, "key store failed its integrity check");
    Error::StoreIntegrity(what)
}

/// The anchor, its MAC checked and not older than `seen` (the highest counter this handle
/// saw: a lower one means the database was replaced by an earlier copy). With `lock`, the
/// anchor row stays locked to the end of the transaction: every MAC'd write takes it first,
/// which orders all writers of all nodes (the compare-and-set reads after it see the latest
/// commit under READ COMMITTED).
pub(super) fn load_anchor(
    client: &mut impl GenericClient,
    key: &RowKey,
    seen: u64,
    lock: bool,
) -> Result<Anchor> {
    let sql = if lock {
        "SELECT counter, digest, mac FROM row_anchor WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT counter, digest, mac FROM row_anchor WHERE id = 1"
    };
    let Some(row) = client.query_opt(sql, &[]).map_err(map_error)? else {
        return Err(integrity("the row anchor is missing"));
    };
    let counter: i64 = row.try_get(0).map_err(map_error)?;
    let digest: Vec<u8> = row.try_get(1).map_err(map_error)?;
    let mac: Vec<u8> = row.try_get(2).map_err(map_error)?;
    let anchor = Anchor {
        counter: u64_of(counter),
        digest: RowDigest::from_slice(&digest)
            .ok_or_else(|| integrity("the row anchor is malformed"))?,
    };
    key.verify_anchor(&anchor, &mac)?;
    if anchor.counter < seen {
        return Err(integrity(format!(
            "the row anchor's write counter is {}, below the {seen} this node saw: the \
             database was replaced by an earlier copy",
            anchor.counter
        )));
    }
    Ok(anchor)
}

/// Writes the anchor (inserting it the first time).
pub(super) fn store_anchor(
    client: &mut impl GenericClient,
    key: &RowKey,
    anchor: &Anchor,
) -> Result<()> {
    let mac = key.anchor_mac(anchor);
    client
        .execute(
            "INSERT INTO row_anchor (id, counter, digest, mac) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET counter = excluded.counter, \
             digest = excluded.digest, mac = excluded.mac",
            &[
                &i64_of(anchor.counter),
                &anchor.digest.0.as_slice(),
                &mac.as_slice(),
            ],
        )
        .map_err(map_error)?;
    Ok(())
}

/// The full check: the anchor's MAC and counter, every row's MAC (with `every_row`; else only
/// the digest of the stored MACs), and the anchor's digest against the rows'. One snapshot
/// (REPEATABLE READ) so a concurrent write cannot fall between the reads. Returns the
/// anchor's counter.
pub(super) fn full_check(
    client: &mut postgres::Client,
    key: &RowKey,
    seen: u64,
    every_row: bool,
) -> Result<u64> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(map_error)?;
    let anchor = load_anchor(&mut tx, key, seen, false)?;
    let mut sum = Anchor::empty();
    if every_row {
        for row in tx
            .query(&format!("SELECT {TENANT_COLUMNS} FROM tenants"), &[])
            .map_err(map_error)?
        {
            let row = verified_tenant(key, stored_tenant(&row)?)?;
            sum.add(key, &row.mac);
        }
        for row in tx
            .query(
                &format!("SELECT {VERSION_COLUMNS}, v.tenant_id FROM {VERSION_FROM}"),
                &[],
            )
            .map_err(map_error)?
        {
            let id: String = row.try_get(8).map_err(map_error)?;
            let id = tenant_id_of(&id)?;
            let row = verified_version(key, &id, stored_version(&row)?)?;
            sum.add(key, &row.mac);
        }
        for row in tx
            .query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"), &[])
            .map_err(map_error)?
        {
            let row = stored_token(&row)?;
            key.verify_token(&row.record, row.generation, &row.mac)?;
            sum.add(key, &row.mac);
        }
    } else {
        for row in tx
            .query(
                "SELECT mac FROM tenants UNION ALL SELECT mac FROM key_versions \
                 UNION ALL SELECT mac FROM tokens",
                &[],
            )
            .map_err(map_error)?
        {
            let mac: Option<Vec<u8>> = row.try_get(0).map_err(map_error)?;
            sum.add(key, &mac.unwrap_or_default());
        }
    }
    tx.commit().map_err(map_error)?;
    if sum.digest != anchor.digest {
        return Err(integrity(
            "the row anchor does not match the rows: a tenant, key-version or token row was \
             deleted, inserted, or replaced by an earlier copy",
        ));
    }
    Ok(anchor.counter)
}

/// The MAC'd rows of one write transaction: every row written gets the next generation and
/// its MAC, and the anchor follows, written back by [`Rows::finish`] in the same transaction
/// together with the change-log entry.
pub(super) struct Rows<'a, 't> {
    pub tx: &'a mut postgres::Transaction<'t>,
    pub key: &'a RowKey,
    anchor: Anchor,
}

impl<'a, 't> Rows<'a, 't> {
    /// Takes the anchor (locked to the end of the transaction).
    pub fn begin(
        tx: &'a mut postgres::Transaction<'t>,
        key: &'a RowKey,
        seen: u64,
    ) -> Result<Self> {
        let anchor = load_anchor(tx, key, seen, true)?;
        Ok(Self { tx, key, anchor })
    }

    /// Takes a replaced or deleted row's MAC out of the digest.
    pub fn forget(&mut self, old_mac: &[u8]) {
        self.anchor.remove(self.key, old_mac);
    }

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

    /// Runs a statement that must change exactly one row; else [`Error::ConcurrentChange`].
    fn one_row(&mut self, sql: &str, params: Params<'_>) -> Result<()> {
        match self.tx.execute(sql, params) {
            Ok(1) => Ok(()),
            Ok(_) => Err(Error::ConcurrentChange),
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Err(Error::ConcurrentChange)
            }
            Err(e) => Err(map_error(e)),
        }
    }

    /// Writes a tenant row: inserts it (`old_mac` None) or replaces the one whose MAC was
    /// `old_mac`.
    pub fn put_tenant(&mut self, tenant: &TenantRecord, old_mac: Option<&[u8]>) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.tenant_mac(tenant, g));
        let sql = if old_mac.is_some() {
            "UPDATE tenants SET state = $2, primary_version = $3, created_at = $4, \
             rotation_period_seconds = $5, max_encryptions = $6, deletion_time = $7, \
             destroyed_at = $8, generation = $9, mac = $10 WHERE tenant_id = $1"
        } else {
            "INSERT INTO tenants (tenant_id, state, primary_version, created_at, \
             rotation_period_seconds, max_encryptions, deletion_time, destroyed_at, generation, \
             mac) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        };
        self.one_row(
            sql,
            &[
                &tenant.tenant_id.as_str(),
                &tenant.state.code(),
                &i64::from(tenant.primary_version),
                &tenant.created_at,
                &i64_of(tenant.rotation_period_seconds),
                &i64_of(tenant.max_encryptions),
                &tenant.deletion_time,
                &tenant.destroyed_at,
                &generation,
                &mac.as_slice(),
            ],
        )
    }

    /// Writes a key-version row's metadata (never its wrapped key).
    pub fn put_version(
        &mut self,
        id: &TenantId,
        version: &KeyVersionRecord,
        old_mac: Option<&[u8]>,
    ) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.key_version_mac(id, version, g));
        let sql = if old_mac.is_some() {
            "UPDATE key_versions SET state = $3, created_at = $4, encryptions = $5, \
             generation = $6, mac = $7 WHERE tenant_id = $1 AND version = $2"
        } else {
            "INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions, \
             generation, mac) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        };
        self.one_row(
            sql,
            &[
                &id.as_str(),
                &i64::from(version.version),
                &version.state.code(),
                &version.created_at,
                &i64_of(version.encryptions),
                &generation,
                &mac.as_slice(),
            ],
        )
    }

    /// Writes a token row.
    pub fn put_token(&mut self, token: &TokenRecord, old_mac: Option<&[u8]>) -> Result<()> {
        let (generation, mac) = self.next(old_mac, |key, g| key.token_mac(token, g));
        let sql = if old_mac.is_some() {
            "UPDATE tokens SET name = $2, hash = $3, role = $4, tenants = $5, operations = $6, \
             created_at = $7, expires_at = $8, revoked_at = $9, generation = $10, mac = $11, \
             quarantined_at = $12 WHERE id = $1"
        } else {
            "INSERT INTO tokens (id, name, hash, role, tenants, operations, created_at, \
             expires_at, revoked_at, generation, mac, quarantined_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
        };
        self.one_row(
            sql,
            &[
                &token.id,
                &token.name,
                &token.hash.as_slice(),
                &token.role,
                &token.tenants,
                &token.operations,
                &token.created_at,
                &token.expires_at,
                &token.revoked_at,
                &generation,
                &mac.as_slice(),
                &token.quarantined_at,
            ],
        )
    }

    /// Writes the anchor back; returns its counter.
    pub fn finish(self) -> Result<u64> {
        store_anchor(self.tx, self.key, &self.anchor)?;
        Ok(self.anchor.counter)
    }
}

/// Every tenant, key-version and token row MAC'd as it stands and the anchor created: what a
/// new database gets from the first start with the master key (the `row_mac_upgrade` mark of
/// the schema). Returns how many rows it MAC'd.
pub(super) fn mac_existing_rows(tx: &mut postgres::Transaction<'_>, key: &RowKey) -> Result<u64> {
    let mut anchor = Anchor::empty();
    let mut count = 0u64;
    let tenants: Vec<TenantRecord> = tx
        .query(&format!("SELECT {TENANT_COLUMNS} FROM tenants"), &[])
        .map_err(map_error)?
        .iter()
        .map(|row| stored_tenant(row).map(|s| s.record))
        .collect::<Result<_>>()?;
    for tenant in &tenants {
        let generation = anchor.next_generation();
        let mac = key.tenant_mac(tenant, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE tenants SET generation = $2, mac = $3 WHERE tenant_id = $1",
            &[
                &tenant.tenant_id.as_str(),
                &i64_of(generation),
                &mac.as_slice(),
            ],
        )
        .map_err(map_error)?;
        count += 1;
    }
    let versions: Vec<(TenantId, KeyVersionRecord)> = tx
        .query(
            &format!("SELECT {VERSION_COLUMNS}, v.tenant_id FROM {VERSION_FROM}"),
            &[],
        )
        .map_err(map_error)?
        .iter()
        .map(|row| {
            let id: String = row.try_get(8).map_err(map_error)?;
            Ok((tenant_id_of(&id)?, stored_version(row)?.record))
        })
        .collect::<Result<_>>()?;
    for (id, version) in &versions {
        let generation = anchor.next_generation();
        let mac = key.key_version_mac(id, version, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE key_versions SET generation = $3, mac = $4 WHERE tenant_id = $1 \
             AND version = $2",
            &[
                &id.as_str(),
                &i64::from(version.version),
                &i64_of(generation),
                &mac.as_slice(),
            ],
        )
        .map_err(map_error)?;
        count += 1;
    }
    let tokens: Vec<TokenRecord> = tx
        .query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"), &[])
        .map_err(map_error)?
        .iter()
        .map(|row| stored_token(row).map(|s| s.record))
        .collect::<Result<_>>()?;
    for token in &tokens {
        let generation = anchor.next_generation();
        let mac = key.token_mac(token, generation);
        anchor.add(key, &mac);
        tx.execute(
            "UPDATE tokens SET generation = $2, mac = $3 WHERE id = $1",
            &[&token.id, &i64_of(generation), &mac.as_slice()],
        )
        .map_err(map_error)?;
        count += 1;
    }
    store_anchor(tx, key, &anchor)?;
    Ok(count)
}
