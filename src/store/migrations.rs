//! Schema migrations for `keys.db`. Each entry moves the schema up by one version and runs in
//! the same transaction as the bump of `schema_version`; entries are never edited once
//! released, only appended.

use rusqlite::{Connection, OptionalExtension};

/// The migrations, in order; index 0 takes the schema from version 0 to 1.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE master_keys (
        version     INTEGER PRIMARY KEY,
        check_value BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        retired_at  INTEGER
     );
     CREATE TABLE tenants (
        tenant_id               TEXT PRIMARY KEY,
        state                   INTEGER NOT NULL,
        primary_version         INTEGER NOT NULL,
        created_at              INTEGER NOT NULL,
        rotation_period_seconds INTEGER NOT NULL,
        max_encryptions         INTEGER NOT NULL,
        deletion_time           INTEGER,
        destroyed_at            INTEGER
     ) WITHOUT ROWID;
     CREATE TABLE key_versions (
        tenant_id   TEXT NOT NULL REFERENCES tenants(tenant_id),
        version     INTEGER NOT NULL,
        state       INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        encryptions INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, version)
     ) WITHOUT ROWID;
     -- Key material apart from metadata, so destroying a key is a DELETE (zeroed by
     -- secure_delete) while its metadata stays for ListKeyVersions and the audit.
     CREATE TABLE wrapped_keys (
        tenant_id      TEXT NOT NULL,
        version        INTEGER NOT NULL,
        master_version INTEGER NOT NULL,
        wrapped_key    BLOB NOT NULL,
        PRIMARY KEY (tenant_id, version)
     );
     CREATE INDEX wrapped_keys_by_master ON wrapped_keys(master_version);
     CREATE TABLE audit_key (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        master_version INTEGER NOT NULL,
        wrapped_key    BLOB NOT NULL
     );
     CREATE TABLE tokens (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        hash        BLOB NOT NULL UNIQUE,
        role        TEXT NOT NULL,
        tenants     TEXT NOT NULL,
        operations  TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        revoked_at  INTEGER
     );",
    // 2: the shred ledger's head as this store last saw it (backup issue): a ledger shorter
    // than this, or missing, is refused at start (see backup::ledger).
    "CREATE TABLE shred_ledger_head (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        entries  INTEGER NOT NULL,
        head_mac BLOB NOT NULL
     );",
];

/// Brings the schema up to date. Refuses a database newer than this binary.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<Result<(), String>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = tx
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    let target = MIGRATIONS.len() as i64;
    if current > target {
        return Ok(Err(format!(
            "keys.db has schema version {current}, newer than this binary's {target}"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [index as i64 + 1],
        )?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// Checks, without writing, that a database's schema is one this binary can read (a backup
/// opened read-only).
pub fn check_readable(conn: &Connection) -> rusqlite::Result<Result<(), String>> {
    let current: Option<i64> = conn
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .optional()?;
    let target = MIGRATIONS.len() as i64;
    Ok(match current {
        None => Err("not a tenant-kms keys.db (no schema version)".into()),
        Some(v) if v > target => Err(format!(
            "keys.db has schema version {v}, newer than this binary's {target}"
        )),
        Some(_) => Ok(()),
    })
}
