//! The staging schema of `migrate-store` (issue 14, item 5): all or nothing in one transaction.
//!
//! The copy of a data directory is built, through the ordinary key store and audit log, in a
//! schema of its own ([`STAGING_SCHEMA`], reached with `search_path`), which no node reads. Only
//! when everything is there does [`publish`] move every table of it into the target schema
//! (the role's default, normally `public`) in one transaction. A migration that fails or is
//! killed before that leaves the target schema exactly as it was (empty) and a staging schema
//! that the next run drops and builds again: a run is never half-visible to a node.
//!
//! A target schema that already holds any table of the store is refused before anything is
//! written, and again inside the publishing transaction (a node may have started on the target
//! meanwhile). One session-level advisory lock keeps two runs from sharing the staging schema.

use super::connect::{PgOptions, PgPool, map_error};
use crate::error::{Error, Result};

/// The schema a migration builds its copy in.
pub const STAGING_SCHEMA: &str = "tenant_kms_migration";

/// The advisory lock one `migrate-store` run holds for its whole run ("tkms-mst").
const MIGRATE_LOCK: i64 = 0x746b_6d73_2d6d_7374;

/// Tables whose presence makes a schema "a tenant-kms store": the key store's schema version
/// and its core tables, the audit log's, and the change log.
const STORE_TABLES: &[&str] = &[
    "kms_schema_version",
    "tenants",
    "key_versions",
    "wrapped_keys",
    "tokens",
    "audit_records",
    "audit_chains",
    "kms_changes",
];

/// A running migration's hold on the target database: released when dropped (its own
/// connection closes, and PostgreSQL drops the session lock with it).
pub struct MigrationLock {
    _client: postgres::Client,
}

/// Takes the migration lock of the database `pool` reaches, checks that its target schema
/// holds no store, and (re)creates an empty staging schema, dropping what an interrupted run
/// left there. Returns the lock and the name of the target schema.
pub fn prepare(pool: &PgPool) -> Result<(MigrationLock, String)> {
    let mut client = pool.dedicated()?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATE_LOCK])
        .map_err(map_error)?
        .get(0);
    if !locked {
        return Err(Error::FailedPrecondition(
            "another migrate-store runs into this database; wait for it to finish".into(),
        ));
    }
    let target: Option<String> = client
        .query_one("SELECT current_schema()", &[])
        .map_err(map_error)?
        .get(0);
    let target = target.ok_or_else(|| {
        Error::FailedPrecondition(
            "the role has no schema it can create tables in (search_path names none that \
             exists); create one or set search_path"
                .into(),
        )
    })?;
    if target == STAGING_SCHEMA {
        return Err(Error::InvalidArgument(format!(
            "the target schema cannot be {STAGING_SCHEMA}, the migration's staging schema"
        )));
    }
    refuse_non_empty(&mut client, &target)?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {STAGING_SCHEMA} CASCADE; CREATE SCHEMA {STAGING_SCHEMA}"
        ))
        .map_err(map_error)?;
    Ok((MigrationLock { _client: client }, target))
}

/// `options` reaching the staging schema instead of the role's default.
pub fn staging_options(options: &PgOptions) -> PgOptions {
    let mut staged = options.clone();
    staged.search_path = Some(STAGING_SCHEMA.to_owned());
    staged
}

/// Moves every table of the staging schema into `target` and drops the staging schema (and
/// the functions in it, which nodes create themselves), in one transaction, after checking
/// again that `target` holds no store. Returns how many tables moved.
pub fn publish(pool: &PgPool, target: &str) -> Result<usize> {
    let mut conn = pool.get()?;
    let mut tx = conn.transaction().map_err(map_error)?;
    refuse_non_empty(&mut tx, target)?;
    let tables: Vec<String> = tx
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
            &[&STAGING_SCHEMA],
        )
        .map_err(map_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if tables.is_empty() {
        return Err(Error::FailedPrecondition(
            "the staging schema holds nothing to publish".into(),
        ));
    }
    for table in &tables {
        tx.batch_execute(&format!(
            "ALTER TABLE {STAGING_SCHEMA}.{} SET SCHEMA {}",
            quote_ident(table),
            quote_ident(target)
        ))
        .map_err(map_error)?;
    }
    // Functions hold no data and every node creates them (`CREATE OR REPLACE`) when it opens
    // the store in the target schema: dropped rather than moved, so a leftover of the same
    // name in the target cannot block the publication.
    let functions: Vec<String> = tx
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
            &[&STAGING_SCHEMA],
        )
        .map_err(map_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for function in &functions {
        // `regprocedure` text is schema-qualified and quoted as SQL needs it.
        tx.batch_execute(&format!("DROP FUNCTION {function}"))
            .map_err(map_error)?;
    }
    tx.batch_execute(&format!("DROP SCHEMA {STAGING_SCHEMA}"))
        .map_err(map_error)?;
    tx.commit().map_err(map_error)?;
    Ok(tables.len())
}

/// Drops the staging schema and whatever a failed run built in it (the target schema is never
/// touched before [`publish`]).
pub fn discard(pool: &PgPool) -> Result<()> {
    pool.get()?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {STAGING_SCHEMA} CASCADE"))
        .map_err(map_error)
}

/// Refuses a `schema` that holds any of the store's tables (a migration copies only into an
/// empty database, so it can never mix with or overwrite a live store).
fn refuse_non_empty(client: &mut impl postgres::GenericClient, schema: &str) -> Result<()> {
    let names: Vec<String> = STORE_TABLES.iter().map(|t| (*t).to_owned()).collect();
    let found: Vec<String> = client
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2) \
             ORDER BY tablename",
            &[&schema, &names],
        )
        .map_err(map_error)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !found.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "the target database is not empty: schema {schema} already holds a tenant-kms \
             store ({}); migrate-store copies only into an empty database and changed nothing",
            found.join(", ")
        )));
    }
    Ok(())
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_with_doubled_quotes() {
        assert_eq!(quote_ident("public"), "\"public\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn staging_options_only_change_the_schema() {
        let options = PgOptions::new("postgres://kms@127.0.0.1/kms");
        let staged = staging_options(&options);
        assert_eq!(staged.search_path.as_deref(), Some(STAGING_SCHEMA));
        assert_eq!(*staged.url, *options.url);
        assert!(options.search_path.is_none());
    }
}
