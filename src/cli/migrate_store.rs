//! `tenant-kms migrate-store --from ./data --to postgres://…` (issue 14, item 5): moves a
//! deployment from the embedded SQLite store of a data directory into an empty PostgreSQL
//! database, all or nothing.
//!
//! What moves: master-key check values, the wrapped audit secret, tenants with every key
//! version (wrapped keys as they are; the target computes its own row MACs and anchor),
//! tokens, blind-index definitions, the shred-ledger head, and the whole audit log, re-chained
//! in order as the migrating node's chain and closed by a `Restore` record that names the
//! source chain's head ([`crate::backup::migrate`]). The keyring and the shred ledger stay
//! files: every node of the PostgreSQL deployment uses the same ones.
//!
//! All or nothing: the copy is built in a staging schema and published in one transaction
//! ([`crate::store::postgres::staging`]); a failed or killed run leaves the target as empty as
//! it found it, and running the command again starts afresh. The data directory's serve lock
//! is held throughout, so the command refuses while a server serves the source (and no server
//! can start on it meanwhile). The source is read only; it is left as it was.
//!
//! Exit codes: 0 migrated, 1 refused or failed (the reason on stderr; the target unchanged),
//! 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::common::{DataDirArgs, StoreArgs, StoreFlagParser, cli_record, parse_node_id};
use super::keyring::SealArgs;
use crate::audit::operation::Task;
use crate::audit::{AuditAppend, Outcome, PostgresAuditLog};
use crate::backup::migrate;
use crate::error::{Error, Result};
use crate::service::data_dir_guard::DataDirLock;
use crate::service::state::{DataDir, KEYS_DB, restored_anchor_note};
use crate::store::postgres::{PgPool, PostgresKeyStore, staging};
use crate::store::{ChangeDetection, MasterKeyStore, StoreBackend};

/// Flags of `migrate-store`. The keyring flags mean what they mean for every data-directory
/// command ([`DataDirArgs`]); the target's connection settings are those of [`StoreArgs`].
#[derive(Debug, Args)]
pub struct MigrateStoreArgs {
    /// The data directory to copy (its SQLite store and audit log; no server may serve it).
    #[arg(long)]
    from: PathBuf,
    /// The PostgreSQL database to copy into (postgres://user@host[:port]/db); it must hold no
    /// tenant-kms store. A password is refused here: use --store-password-file or PGPASSWORD.
    #[arg(long, value_parser = StoreFlagParser)]
    to: String,
    /// Master keyring file (default: <from>/master.keyring).
    #[arg(long, conflicts_with = "master_key_env")]
    keyring: Option<PathBuf>,
    /// Read the master keys from this environment variable instead of a keyring file.
    #[arg(long)]
    master_key_env: Option<String>,
    /// Shred ledger file (default: beside the keyring, as for every command).
    #[arg(long, env = "TENANT_KMS_SHRED_LEDGER")]
    shred_ledger: Option<PathBuf>,
    /// How the keyring file is sealed.
    #[command(flatten)]
    seal: SealArgs,
    /// File holding the PostgreSQL password on its first line (mode 0600).
    #[arg(long)]
    store_password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that must sign the PostgreSQL server's certificate.
    #[arg(long)]
    store_tls_ca: Option<PathBuf>,
    /// The node whose audit chain receives the data directory's records [default: the one in
    /// <from>/node.id, created if missing: the node that will serve from this directory].
    #[arg(long, value_parser = parse_node_id)]
    node_id: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl MigrateStoreArgs {
    /// The data-directory arguments of the source, with the target as its store: one path
    /// from flags to options for every command.
    fn data(&self) -> DataDirArgs {
        DataDirArgs {
            data_dir: self.from.clone(),
            keyring: self.keyring.clone(),
            master_key_env: self.master_key_env.clone(),
            shred_ledger: self.shred_ledger.clone(),
            seal: self.seal.clone(),
            store: StoreArgs {
                store: Some(self.to.clone()),
                store_password_file: self.store_password_file.clone(),
                store_tls_ca: self.store_tls_ca.clone(),
                store_pool_size: Some(4),
                node_id: self.node_id.clone(),
            },
        }
    }
}

/// Runs `migrate-store`.
pub fn run(args: MigrateStoreArgs) -> Result<ExitCode> {
    let mut options = args.data().options();
    let pg = match std::mem::take(&mut options.store) {
        StoreBackend::Postgres(pg) => pg,
        StoreBackend::Sqlite => {
            return Err(Error::InvalidArgument(
                "--to must name a PostgreSQL database (postgres://…)".into(),
            ));
        }
    };
    // `options` now names the source: SQLite in --from.
    if !args.from.join(KEYS_DB).exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} holds no keys.db: not a tenant-kms data directory",
            args.from.display()
        )));
    }
    let _serve_lock = DataDirLock::acquire(&args.from, "migrate-store")?;
    let source = DataDir::open(&options, false)?;
    let node_id = options.resolve_node_id()?;
    let pool = PgPool::connect(&pg)?;
    let (migration_lock, schema) = staging::prepare(&pool)?;
    let copied = copy_into_staging(&args, &options, &source, &pg, &node_id);
    let copied = copied.and_then(|copied| {
        crate::store::failpoint(crate::store::FAILPOINT_MIGRATE_BEFORE_PUBLISH);
        staging::publish(&pool, &schema).map(|_| copied)
    });
    let copied = match copied {
        Ok(copied) => copied,
        Err(e) => {
            // The target schema was never touched; the half-built copy goes too (a killed run
            // leaves it for the next run, which drops it first).
            if let Err(cleanup) = staging::discard(&pool) {
                tracing::warn!(error = %cleanup, "the staging schema stays; the next run drops it");
            }
            return Err(e);
        }
    };
    drop(migration_lock);
    let summary = serde_json::json!({
        "ok": true,
        "target": pool.target(),
        "schema": schema,
        "node_id": node_id,
        "copied": copied,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "migrated {} to {} (schema {schema}): {} tenants, {} key versions ({} wrapped keys), \
             {} tokens, {} index definitions, {} audit records into the chain of node {node_id}",
            args.from.display(),
            pool.target(),
            copied.tenants,
            copied.key_versions,
            copied.wrapped_keys,
            copied.tokens,
            copied.index_definitions,
            copied.audit_records
        );
    }
    eprintln!(
        "next: serve from PostgreSQL with the same keyring and shred ledger (serve --data-dir {} \
         --store …); do not serve {} on SQLite again (its copy has moved on)",
        args.from.display(),
        args.from.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Copies the source into the staging schema of the target database; returns what moved.
fn copy_into_staging(
    args: &MigrateStoreArgs,
    options: &crate::service::ServiceOptions,
    source: &DataDir,
    pg: &crate::store::postgres::PgOptions,
    node_id: &str,
) -> Result<migrate::Copied> {
    let staged = PgPool::connect(&staging::staging_options(pg))?;
    let target = PostgresKeyStore::open(staged.clone(), node_id, options.staleness_bound)?;
    // The same audit secret as the source's (copied below), so the same row key and chain
    // keys: the keyring opens both alike.
    let audit_secret = source.keys.audit_secret()?;
    target.set_row_key(
        crate::store::row_auth::RowKey::derive(&audit_secret)
            .map_err(|_| Error::internal("row key derivation failed"))?,
        true,
    )?;
    let mut copied = migrate::copy_key_store(source.store.as_ref(), &target)?;
    let log = PostgresAuditLog::open(staged, node_id, Arc::clone(&source.chain_keys))?;
    let (records, head) = migrate::copy_audit_log(source.audit_log(options)?.as_ref(), &log)?;
    copied.audit_records = records;
    let detail = format!(
        "{}{}",
        migrate::closing_detail(&args.from.display().to_string(), records, &head),
        restored_anchor_note(target.anchor_counter())
    );
    log.append(&[&cli_record(
        Task::Restore,
        "",
        Vec::new(),
        Outcome::Ok,
        detail,
    )])?;
    Ok(copied)
}
