//! Versioned schema migrations of the PostgreSQL key store. Each entry moves the schema up by
//! one version; all pending entries and the bump of `kms_schema_version` run in one
//! transaction under a transaction-scoped advisory lock, so of several nodes starting at once
//! exactly one applies them and the others find them done. Entries are never edited once
//! released, only appended. A schema newer than this binary is refused.

use postgres::GenericClient;

use super::connect::{PgPool, map_error};
use crate::error::{Error, Result};

/// The advisory lock key that serializes migrations (any fixed 64-bit value; "tkms-mig").
const MIGRATION_LOCK: i64 = 0x746b_6d73_2d6d_6967;

/// The migrations, in order; index 0 takes the schema from version 0 to 1.
const MIGRATIONS: &[&str] = &[
    // 1: the key store (the same tables and row MACs as keys.db, docs/FORMAT.md "Key-store
    // row MACs"), and the change log every node follows (docs/ARCHITECTURE.md).
    r#"CREATE TABLE master_keys (
        version     BIGINT PRIMARY KEY,
        check_value BYTEA NOT NULL,
        created_at  BIGINT NOT NULL,
        retired_at  BIGINT
     );
     CREATE TABLE tenants (
        tenant_id               TEXT COLLATE "C" PRIMARY KEY,
        state                   BIGINT NOT NULL,
        primary_version         BIGINT NOT NULL,
        created_at              BIGINT NOT NULL,
        rotation_period_seconds BIGINT NOT NULL,
        max_encryptions         BIGINT NOT NULL,
        deletion_time           BIGINT,
        destroyed_at            BIGINT,
        generation              BIGINT NOT NULL DEFAULT 0,
        mac                     BYTEA
     );
     CREATE TABLE key_versions (
        tenant_id   TEXT COLLATE "C" NOT NULL REFERENCES tenants(tenant_id),
        version     BIGINT NOT NULL,
        state       BIGINT NOT NULL,
        created_at  BIGINT NOT NULL,
        encryptions BIGINT NOT NULL DEFAULT 0,
        generation  BIGINT NOT NULL DEFAULT 0,
        mac         BYTEA,
        PRIMARY KEY (tenant_id, version)
     );
     -- Key material apart from metadata: destroying a key is a DELETE of its row here.
     CREATE TABLE wrapped_keys (
        tenant_id      TEXT COLLATE "C" NOT NULL,
        version        BIGINT NOT NULL,
        master_version BIGINT NOT NULL,
        wrapped_key    BYTEA NOT NULL,
        PRIMARY KEY (tenant_id, version)
     );
     CREATE INDEX wrapped_keys_by_master ON wrapped_keys(master_version);
     CREATE TABLE audit_key (
        id             INTEGER PRIMARY KEY CHECK (id = 1),
        master_version BIGINT NOT NULL,
        wrapped_key    BYTEA NOT NULL
     );
     CREATE TABLE tokens (
        id          TEXT COLLATE "C" PRIMARY KEY,
        name        TEXT COLLATE "C" NOT NULL,
        hash        BYTEA NOT NULL UNIQUE,
        role        TEXT COLLATE "C" NOT NULL,
        tenants     TEXT COLLATE "C" NOT NULL,
        operations  TEXT COLLATE "C" NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT,
        revoked_at  BIGINT,
        generation  BIGINT NOT NULL DEFAULT 0,
        mac         BYTEA,
        quarantined_at BIGINT
     );
     CREATE TABLE shred_ledger_head (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        entries  BIGINT NOT NULL,
        head_mac BYTEA NOT NULL
     );
     CREATE TABLE audit_reconciled (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        through_secs  BIGINT NOT NULL,
        audit_seq     BIGINT NOT NULL
     );
     INSERT INTO audit_reconciled (id, through_secs, audit_seq)
        VALUES (1, CAST(EXTRACT(EPOCH FROM now()) AS BIGINT), 0);
     CREATE TABLE audit_reconciled_boundary (
        tenant_id TEXT COLLATE "C" NOT NULL,
        version   BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, version)
     );
     CREATE TABLE row_anchor (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        counter BIGINT NOT NULL,
        digest  BYTEA NOT NULL,
        mac     BYTEA NOT NULL
     );
     -- A new store is 'upgraded' (gets its anchor) by the first start with the master key.
     CREATE TABLE row_mac_upgrade (id INTEGER PRIMARY KEY CHECK (id = 1));
     INSERT INTO row_mac_upgrade (id) VALUES (1);
     CREATE TABLE blind_indexes (
        scope         TEXT COLLATE "C" NOT NULL,
        name          TEXT COLLATE "C" NOT NULL,
        bits          BIGINT NOT NULL,
        normalization TEXT COLLATE "C" NOT NULL,
        created_at    BIGINT NOT NULL,
        PRIMARY KEY (scope, name)
     );
     CREATE INDEX blind_indexes_by_name ON blind_indexes(name);
     -- The change log: one row per committed change, numbered by kms_change_head in commit
     -- order (the head row's lock orders the writers), so a follower that read up to seq N
     -- has seen every change numbered up to N.
     CREATE TABLE kms_change_head (
        id  INTEGER PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL
     );
     INSERT INTO kms_change_head (id, seq) VALUES (1, 0);
     CREATE TABLE kms_changes (
        seq       BIGINT PRIMARY KEY,
        writer    BIGINT NOT NULL,
        node_id   TEXT COLLATE "C" NOT NULL,
        kind      TEXT COLLATE "C" NOT NULL,
        tenant_id TEXT,
        at        TIMESTAMPTZ NOT NULL DEFAULT now()
     );"#,
    // 2: one shred-ledger head per node (issue 14): each node keeps a ledger file of its own
    // (docs/OPERATIONS.md §15), so one shared head would refuse every node but the one that
    // wrote it last. (The backend was unreleased when this replaced the single head.) And no
    // planner statistics of wrapped keys: ANALYZE would copy sample values (histogram
    // bounds) into pg_statistic, where a destroyed key would outlive its row.
    r#"ALTER TABLE wrapped_keys ALTER COLUMN wrapped_key SET STATISTICS 0;
     ALTER TABLE audit_key ALTER COLUMN wrapped_key SET STATISTICS 0;
     CREATE TABLE shred_ledger_heads (
        node_id  TEXT COLLATE "C" PRIMARY KEY,
        entries  BIGINT NOT NULL,
        head_mac BYTEA NOT NULL
     );
     DROP TABLE shred_ledger_head;"#,
];

/// The schema version this binary writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings the schema up to date, one node at a time; refuses a database whose schema is newer
/// than this binary's.
pub fn migrate(pool: &PgPool) -> Result<()> {
    pool.transaction(|tx| {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(map_error)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS kms_schema_version (version BIGINT NOT NULL)")
            .map_err(map_error)?;
        let current = schema_version(tx)?;
        let target = current_version();
        if current > target {
            return Err(newer_schema(current, target));
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).map_err(map_error)?;
            tx.execute("DELETE FROM kms_schema_version", &[])
                .map_err(map_error)?;
            tx.execute(
                "INSERT INTO kms_schema_version (version) VALUES ($1)",
                &[&(index as i64 + 1)],
            )
            .map_err(map_error)?;
            tracing::info!(version = index + 1, "key store: schema migrated");
        }
        Ok(())
    })
}

/// The stored schema version (0 for a database without one).
fn schema_version(client: &mut impl GenericClient) -> Result<i64> {
    let row = client
        .query_opt("SELECT version FROM kms_schema_version", &[])
        .map_err(map_error)?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// The refusal of a schema this binary does not know.
fn newer_schema(found: i64, known: i64) -> Error {
    Error::FailedPrecondition(format!(
        "the PostgreSQL key store has schema version {found}, newer than this binary's \
         {known}: upgrade tenant-kms on this node before starting it"
    ))
}
