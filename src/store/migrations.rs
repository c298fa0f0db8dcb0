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
    // 3: a destruction committed whose WAL has not yet been checkpointed and truncated (a
    // kill -9 between the two leaves the destroyed key's bytes in keys.db-wal): its row is
    // written in the destruction's transaction and removed once the shred sequence finished,
    // and the next open re-applies the sequence while it is there.
    "CREATE TABLE shred_pending (id INTEGER PRIMARY KEY CHECK (id = 1));",
    // 4: the audit reconciliation watermark (docs/AUDIT.md, "Reconciliation at start"):
    // key-store changes at or after it are checked against the audit log at the next open.
    // Starts at the migration's time: changes made before it were never checked.
    // Two halves: a time on the store's clock (Unix seconds, like created_at) for key
    // changes, and the audit sequence number the log had then (audit records carry the
    // system clock's time, which a test clock may not match; a sequence number needs no
    // clock). The boundary table lists the changes of the watermark's own second that were
    // checked already: created_at has whole seconds, so a change of that second may have
    // come before the check (its record before the sequence number) or after it.
    "CREATE TABLE audit_reconciled (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        through_secs  INTEGER NOT NULL,
        audit_seq     INTEGER NOT NULL
     );
     INSERT INTO audit_reconciled (id, through_secs, audit_seq)
        VALUES (1, CAST(strftime('%s', 'now') AS INTEGER), 0);
     CREATE TABLE audit_reconciled_boundary (
        tenant_id TEXT NOT NULL,
        version   INTEGER NOT NULL,
        PRIMARY KEY (tenant_id, version)
     ) WITHOUT ROWID;",
    // 5: row MACs (issue 13, docs/FORMAT.md "Key-store row MACs"): every tenant, key-version
    // and token row carries the generation of its last write and a MAC over its canonical
    // encoding (`store::row_auth`); `row_anchor` holds the write counter and the digest of all
    // row MACs, MAC'd itself. SQL cannot compute a MAC (no key here), so the migration leaves
    // `mac` NULL and marks the upgrade pending; the first open with the master key
    // (`set_row_key`) MACs every existing row once, creates the anchor and clears the mark,
    // in one transaction.
    "ALTER TABLE tenants ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tenants ADD COLUMN mac BLOB;
     ALTER TABLE key_versions ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE key_versions ADD COLUMN mac BLOB;
     ALTER TABLE tokens ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tokens ADD COLUMN mac BLOB;
     CREATE TABLE row_anchor (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        counter INTEGER NOT NULL,
        digest  BLOB NOT NULL,
        mac     BLOB NOT NULL
     );
     CREATE TABLE row_mac_upgrade (id INTEGER PRIMARY KEY CHECK (id = 1));
     INSERT INTO row_mac_upgrade (id) VALUES (1);",
    // 6: blind index definitions (docs/SEARCHABLE.md). `scope` is `*` for every tenant or a
    // tenant id; a definition is never updated or deleted (a new definition is a new name),
    // and none is secret, so shredding a tenant leaves its rows (its keys are what die).
    "CREATE TABLE blind_indexes (
        scope         TEXT NOT NULL,
        name          TEXT NOT NULL,
        bits          INTEGER NOT NULL,
        normalization TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        PRIMARY KEY (scope, name)
     ) WITHOUT ROWID;
     CREATE INDEX blind_indexes_by_name ON blind_indexes(name);",
    // 7: token quarantine (issue 16, anomaly containment): set while a token is refused
    // pending an admin's release; covered by the row MAC when set.
    "ALTER TABLE tokens ADD COLUMN quarantined_at INTEGER;",
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
