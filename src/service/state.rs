//! The state every handler shares, and how it is assembled from a data directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::audit::operation::Task;
use crate::audit::verify::{Recovery, VerifyReport};
use crate::audit::{
    AppendCost, AuditAppend, AuditLog, AuditMaintenance, AuditQuery, AuditRecord, AuditSnapshot,
    AuditWriter, ChainHead, ChainKeys, Durability, ListFilter, Operation, Outcome,
    PostgresAuditLog, SqliteAuditLog,
};
use crate::auth::cert::TlsCallers;
use crate::auth::rate::{RateLimit, RateLimiter};
use crate::auth::{Authenticator, Role, TokenSpec, issue_token};
use crate::backup::ledger::{ShredLedger, ShredReport};
use crate::clock::{Clock, SharedClock};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keys::{KeyManager, KeyPolicy, MasterKeySource};
use crate::store::postgres::{PgPool, PostgresKeyStore, off_runtime};
use crate::store::{KeyStore, SqliteKeyStore, StoreBackend};

use super::data_dir_guard;

/// Input limits (issue: tenant ids and contexts are limited by their types).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest plaintext value in bytes.
    pub max_field_bytes: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// Largest gRPC message in bytes.
    pub max_message_bytes: usize,
    /// Per-caller token bucket (calls per second and burst).
    pub rate_limit: RateLimit,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Longest a request may run: caps the caller's `grpc-timeout` and applies when it sends
    /// none.
    pub request_timeout: Duration,
    /// Longest a request's body may take to arrive; a request still waiting for its body
    /// after this is answered DEADLINE_EXCEEDED and its stream ends (issue 13).
    pub body_timeout: Duration,
    /// Requests that may wait for their bodies at once, server-wide (issue 13; see
    /// `guard`).
    pub max_awaiting_body: usize,
    /// How refusals before authentication are aggregated in the audit and budgeted (issue
    /// 13; see `refusals`).
    pub refusals: crate::service::refusals::RefusalPolicy,
    /// Longest a response may take to be handed to a client that reads slowly or not at all;
    /// then its connection is closed (issue 13; see `connections`).
    pub send_timeout: Duration,
    /// Longest a new connection may take to complete its TLS handshake and send its first
    /// request; then it is closed (see `connections`).
    pub handshake_timeout: Duration,
    /// Connections that may be open at once without having sent a request (handshakes in
    /// progress); past it the oldest is closed (see `connections`).
    pub max_unestablished_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_field_bytes: 64 * 1024,
            max_batch_items: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            rate_limit: RateLimit::default(),
            max_concurrent_requests: 1024,
            request_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            max_awaiting_body: 4096,
            refusals: crate::service::refusals::RefusalPolicy::default(),
            send_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_unestablished_connections: 1024,
        }
    }
}

/// Everything needed to open the service on a data directory.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// The data directory (created 0700 if missing).
    pub data_dir: PathBuf,
    /// Where the master keys come from.
    pub master_keys: MasterKeySource,
    /// Audit durability.
    pub durability: Durability,
    /// How long an audit commit waits for another process's write lock on `audit.db` (e.g.
    /// the `rotate` command appending) before its calls fail closed with UNAVAILABLE.
    pub audit_busy_timeout: std::time::Duration,
    /// Key policy defaults and cache size.
    pub key_policy: KeyPolicy,
    /// Input limits.
    pub limits: Limits,
    /// Shortest deletion window a caller may ask for, in seconds.
    pub min_deletion_window_seconds: u64,
    /// Deletion window when the caller names none, in seconds.
    pub default_deletion_window_seconds: u64,
    /// Issue an admin token into `<data-dir>/admin.token` when the store has no token.
    pub bootstrap_admin_token: bool,
    /// Client-certificate identities that act as callers (the `[[tls_callers]]` table).
    pub tls_callers: TlsCallers,
    /// Serve TLS (and mTLS with a client CA) instead of plaintext.
    pub tls: Option<TlsFiles>,
    /// Begin a new audit log where `audit.db` is missing or empty (`audit recover
    /// --new-log`, after moving the old one aside), instead of refusing to open.
    pub new_audit_log: bool,
    /// The shred ledger file; `None`: beside the keyring file (`<keyring>.shred-ledger`), or
    /// `<data-dir>/master.keyring.shred-ledger` with environment-provided master keys.
    pub shred_ledger: Option<PathBuf>,
    /// Set by `restore` only, after it installed a backup's `keys.db` and `audit.db`
    /// together: the key store is not held to the audit chain's latest `KeyStoreAnchor`
    /// (a backup's audit copy is taken after its key-store copy and may record a later
    /// counter); the restore records the restored counter instead.
    pub key_store_restored: bool,
    /// Usage accounting: labels in `/metrics` and how often usage is flushed to `usage.db`.
    pub usage: crate::usage::UsagePolicy,
    /// The SIEM sinks committed audit records are streamed to (none by default).
    pub audit_stream: crate::audit::stream::StreamConfig,
    /// The wall clock every time-based decision reads (token expiry, deletion windows and
    /// their reaper, rotation age): [`crate::clock::SystemClock`] unless a test injects
    /// another.
    pub clock: SharedClock,
    /// The anomaly detectors' settings and opt-in containment (issue 16; `crate::detect`).
    pub detect: crate::detect::Policy,
    /// Where anomalies are also POSTed (`crate::webhook`); none by default.
    pub webhook: Option<crate::webhook::WebhookConfig>,
    /// The key store: SQLite in the data directory (default) or a shared PostgreSQL
    /// (`--store`, issue 14).
    pub store: crate::store::StoreBackend,
    /// With a shared store: the longest a node may serve without having confirmed it read
    /// every change other nodes made; past it, calls fail UNAVAILABLE (fail closed).
    pub staleness_bound: Duration,
    /// This node's identity (`--node-id`); `None`: the one kept in the data directory
    /// (see [`crate::service::node_id::resolve`]).
    pub node_id: Option<String>,
}

/// PEM files of the server's TLS identity and, for mTLS, the client CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificate(s) (PEM) that client certificates must chain to; when set, every
    /// connection must present a valid client certificate (the handshake fails otherwise).
    pub client_ca: Option<PathBuf>,
}

impl ServiceOptions {
    /// Defaults for a data directory: keyring file inside it, fsync durability, 1-day
    /// minimum and 7-day default deletion windows.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            master_keys: MasterKeySource::File(data_dir.join(KEYRING_FILE)),
            data_dir,
            durability: Durability::Fsync,
            audit_busy_timeout: crate::audit::sqlite::DEFAULT_BUSY_TIMEOUT,
            key_policy: KeyPolicy::default(),
            limits: Limits::default(),
            min_deletion_window_seconds: 24 * 3600,
            default_deletion_window_seconds: 7 * 24 * 3600,
            bootstrap_admin_token: true,
            tls_callers: TlsCallers::default(),
            tls: None,
            shred_ledger: None,
            clock: crate::clock::system(),
            new_audit_log: false,
            key_store_restored: false,
            detect: crate::detect::Policy::default(),
            webhook: None,
            usage: crate::usage::UsagePolicy::default(),
            audit_stream: crate::audit::stream::StreamConfig::default(),
            store: crate::store::StoreBackend::Sqlite,
            staleness_bound: DEFAULT_STALENESS_BOUND,
            node_id: None,
        }
    }

    /// This node's identity: [`ServiceOptions::node_id`] if set, else the one kept in the data
    /// directory (created there on first use).
    pub fn resolve_node_id(&self) -> Result<String> {
        super::node_id::resolve(&self.data_dir, self.node_id.as_deref())
    }

    /// The shred ledger file these options name (see [`ServiceOptions::shred_ledger`]).
    pub fn shred_ledger_path(&self) -> PathBuf {
        self.shred_ledger.clone().unwrap_or_else(|| {
            crate::backup::ledger::default_path(&self.master_keys, &self.data_dir)
        })
    }
}

/// Default of [`ServiceOptions::staleness_bound`]: a change made through one node is honoured
/// by every other node within this time.
pub const DEFAULT_STALENESS_BOUND: Duration = Duration::from_secs(1);

/// File names inside a data directory.
pub const KEYS_DB: &str = "keys.db";
/// The audit database.
pub const AUDIT_DB: &str = "audit.db";
/// The default master keyring file.
pub const KEYRING_FILE: &str = "master.keyring";
/// The first-start admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The shared state of a running service.
pub struct AppState {
    /// Keys.
    pub keys: Arc<KeyManager>,
    /// Tokens → callers.
    pub auth: Authenticator,
    /// The group-commit audit writer.
    pub audit: AuditWriter,
    /// The audit log for queries and verification (its own connection, apart from the
    /// writer's).
    pub audit_reader: Arc<dyn AuditLog>,
    /// Per-caller rate limits.
    pub limiter: RateLimiter,
    /// The anomaly detectors every finished call is shown to (`service::anomaly`).
    pub detectors: crate::detect::Detectors,
    /// Usage accounting per tenant and caller (counted by `Call::finish`).
    pub usage: Arc<crate::usage::UsageMeter>,
    /// The anomaly webhook, when configured (its delivery task is started by
    /// `server::run`).
    pub webhook: Option<crate::webhook::Webhook>,
    /// The options it was opened with.
    pub options: ServiceOptions,
}

/// The key store, key manager and audit chain keys of a data directory: what every command
/// that works on a data directory needs.
pub struct DataDir {
    /// The key store.
    pub store: Arc<dyn KeyStore>,
    /// The key manager.
    pub keys: Arc<KeyManager>,
    /// The audit chain keys.
    pub chain_keys: Arc<ChainKeys>,
    /// What the shred ledger check did when the directory opened.
    pub shred: ShredReport,
    /// The highest key-store anchor counter known to be recorded in the audit chain, shared
    /// by every audit log this directory hands out (see [`AnchoringLog`]).
    anchored: Arc<AtomicU64>,
    /// Whether the audit log existed before this open (a first start anchors nothing at
    /// start: no earlier copy of its key store can exist).
    audit_log_existed: bool,
    /// The pool of a PostgreSQL key store (`None` on SQLite).
    postgres: Option<PgPool>,
}

impl DataDir {
    /// Opens a data directory. With `create`, a missing directory and keyring are created
    /// (first start); without it they must exist.
    ///
    /// Refuses (issue 13) a directory group or others may write, a first start in a directory
    /// that served before but lost its `keys.db`, and an `audit.db` that is missing, re-created
    /// or another directory's (see [`data_dir_guard`] and
    /// [`crate::audit::sqlite::check_identity`]).
    pub fn open(options: &ServiceOptions, create: bool) -> Result<Self> {
        data_dir_guard::check_dir_mode(&options.data_dir)?;
        let (store, postgres) = open_key_store(options, create)?;
        let keys = Arc::new(KeyManager::open(
            Arc::clone(&store),
            options.master_keys.clone(),
            create,
            options.key_policy.clone(),
            Arc::clone(&options.clock),
        )?);
        // Read before `audit_secret` creates it: an audit key means an audit log exists. On
        // PostgreSQL the audit secret and the audit log (one chain per node) are both in the
        // shared database.
        let audit_log_exists = store.audit_key()?.is_some();
        let audit_secret = keys.audit_secret()?;
        let chain_keys = Arc::new(
            ChainKeys::derive(&audit_secret)
                .map_err(|_| Error::internal("audit key derivation failed"))?,
        );
        // Before any tenant, key-version or token row is read or written (the shred ledger
        // below does both): the row MAC key, derived from the audit secret, so that master-key
        // rotation (which re-wraps that secret) leaves every row MAC valid. Installing it
        // finishes a pending upgrade (unless the audit chain, which a writer of keys.db cannot
        // forge, says it happened already) and checks every row against the anchor. The chain
        // is searched only when the store asks for the upgrade (once in its life; the search
        // reads the whole log when it finds nothing); an upgrade that appears after this
        // check is a rewrite, and refused.
        let upgraded_before = audit_log_exists
            && (!store.row_mac_upgrade_due()?
                || row_mac_upgrade_recorded(options, postgres.as_ref(), &chain_keys)?);
        // Read before the key store's anchor is (set_row_key below): another process may
        // change the store and record its new counter meanwhile, and the store only moves
        // forward, so a recorded counter read first never exceeds a genuine store's.
        let recorded = if audit_log_exists && !options.new_audit_log {
            recorded_key_store_anchor(options, postgres.as_ref(), &chain_keys)?
        } else {
            None
        };
        let upgraded = store.set_row_key(
            crate::store::row_auth::RowKey::derive(&audit_secret)
                .map_err(|_| Error::internal("row key derivation failed"))?,
            !upgraded_before,
        )?;
        // Before anything writes a row (the shred ledger below may): a write would move the
        // counter up and could hide a rollback.
        let anchored = Arc::new(AtomicU64::new(0));
        if let Some(recorded) = recorded {
            if upgraded.is_some() {
                // The one-time upgrade to row MACs (allowed only when the chain records none
                // before) built the anchor afresh: its counter starts a new line, which the
                // RowMacUpgrade record below begins and the anchor after it sets.
                tracing::warn!(
                    recorded = recorded.counter,
                    "row-MAC upgrade: the key store's anchor counter starts again"
                );
            } else if options.key_store_restored {
                tracing::warn!(
                    counter = store.anchor_counter(),
                    recorded = recorded.counter,
                    "restore: the restored keys.db is the key store from now on; its anchor is \
                     recorded after the Restore record"
                );
            } else {
                refuse_key_store_rollback(store.anchor_counter(), &recorded)?;
                anchored.store(recorded.counter, Ordering::Release);
            }
        }
        // Before anything serves: destroyed tenants and versions recorded in the shred
        // ledger are shredded again (a restored backup), and the ledger must be whole.
        if options.shred_ledger.is_none() && matches!(options.master_keys, MasterKeySource::Env(_))
        {
            tracing::warn!(
                path = %options.shred_ledger_path().display(),
                "master keys come from the environment and no --shred-ledger is set: the shred \
                 ledger is inside the data directory and does not survive it being wiped"
            );
        }
        let ledger = Arc::new(ShredLedger::new(
            options.shred_ledger_path(),
            options.master_keys.clone(),
            Arc::clone(&store),
        ));
        let shred = ledger.enforce(&keys)?;
        crate::backup::ledger::follow_shared_store(&ledger)?;
        keys.set_shred_recorder(ledger);
        if postgres.is_none() {
            // A PostgreSQL log is bound to its database's audit key by its signed registry
            // and heads (docs/AUDIT.md §9); there is no file to swap.
            crate::audit::sqlite::check_identity(
                &options.data_dir.join(AUDIT_DB),
                &chain_keys,
                !audit_log_exists || options.new_audit_log,
                options.durability == Durability::Fsync,
                options.audit_busy_timeout,
            )?;
        }
        let anchoring = |log: Box<dyn AuditLog>| -> Box<dyn AuditLog> {
            Box::new(AnchoringLog {
                log,
                store: Arc::clone(&store),
                anchored: Arc::clone(&anchored),
            })
        };
        audit_shred_report(
            anchoring(open_audit_log(options, postgres.as_ref(), &chain_keys)?).as_ref(),
            &shred,
        )?;
        // Only an upgrade of existing rows is recorded: a new store's first key install is
        // not (it would shift every record's sequence number of a fresh directory).
        if let Some(rows) = upgraded.filter(|rows| *rows > 0) {
            let record = AuditRecord::local(Task::RowMacUpgrade, "system:key-store", Outcome::Ok)
                .detail(format!(
                    "{rows} tenant, key-version and token rows MAC'd for the first time, as they \
                     stood"
                ));
            anchoring(open_audit_log(options, postgres.as_ref(), &chain_keys)?)
                .append(&[&record])?;
        }
        if options.key_store_restored {
            // The restore's own record names the restored store's counter
            // ([`DataDir::restored_key_store_note`]) and begins its line: no separate anchor.
            anchored.store(store.anchor_counter(), Ordering::Release);
        }
        Ok(Self {
            store,
            keys,
            chain_keys,
            shred,
            anchored,
            audit_log_existed: audit_log_exists,
            postgres,
        })
    }

    /// The PostgreSQL connection pool when the key store is in PostgreSQL (`--store`), shared
    /// by everything of this directory that lives in that database.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        self.postgres.as_ref()
    }

    /// The text `restore` ends its Restore record's detail with: the restored key store's
    /// anchor counter, the baseline of the rollback check from that record on (docs/AUDIT.md,
    /// "Key-store anchors").
    pub fn restored_key_store_note(&self) -> String {
        restored_anchor_note(self.store.anchor_counter())
    }

    /// Records the key store's anchor counter as it stands now in the audit chain (a
    /// `KeyStoreAnchor` record), through `audit`, unless the chain already holds it (or a
    /// later one). The service calls it at start after reconciliation, so that a change no
    /// audit record followed (a crash between the two commits) is anchored before anything
    /// serves. Not on a first start (a new audit log): its first-start token is anchored
    /// with the first change after it.
    pub fn record_key_store_anchor(&self, audit: &AuditWriter) -> Result<()> {
        let counter = self.store.anchor_counter();
        if self.audit_log_existed && counter > self.anchored.load(Ordering::Acquire) {
            audit.append_blocking(key_store_anchor_record(counter))?;
        }
        Ok(())
    }

    /// Opens this data directory's audit log (`audit.db`, created if missing) with the
    /// options' durability and lock wait, chained under this directory's keys. Each call
    /// opens a log of its own (for SQLite: its own connection).
    ///
    /// Every batch appended through it that follows a key-store change of this process
    /// (one the store's anchor counter shows and the chain does not record yet) carries a
    /// `KeyStoreAnchor` record after its own records, in the same transaction
    /// ([`AnchoringLog`]).
    pub fn audit_log(&self, options: &ServiceOptions) -> Result<Box<dyn AuditLog>> {
        Ok(Box::new(AnchoringLog {
            log: open_audit_log(options, self.postgres.as_ref(), &self.chain_keys)?,
            store: Arc::clone(&self.store),
            anchored: Arc::clone(&self.anchored),
        }))
    }

    /// Starts an audit writer on this data directory's audit log: the simple way for a
    /// command to append records ([`AuditWriter::append_blocking`], then
    /// [`AuditWriter::shutdown`]).
    pub fn audit_writer(&self, options: &ServiceOptions) -> Result<AuditWriter> {
        AuditWriter::start(self.audit_log(options)?, Arc::clone(&self.chain_keys))
    }
}

/// Opens the key store `options` name: the one place the service chooses the key-store
/// backend. SQLite: `keys.db` in the data directory (created with `create`, refused when the
/// directory served before and lost it). PostgreSQL: the shared database, reached through a
/// pool that waits for it at start; the pool is returned too, for the other parts that live in
/// that database.
fn open_key_store(
    options: &ServiceOptions,
    create: bool,
) -> Result<(Arc<dyn KeyStore>, Option<PgPool>)> {
    match &options.store {
        StoreBackend::Sqlite => {
            if create {
                if !options.data_dir.join(KEYS_DB).exists() {
                    data_dir_guard::refuse_lost_key_store(
                        &options.data_dir,
                        &earlier_life_signs(options),
                    )?;
                }
                fsutil::create_private_dir(&options.data_dir)?;
            } else if !options.data_dir.join(KEYS_DB).exists() {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds no keys.db: not a tenant-kms data directory",
                    options.data_dir.display()
                )));
            }
            let store = SqliteKeyStore::open(&options.data_dir.join(KEYS_DB))?;
            Ok((Arc::new(store), None))
        }
        StoreBackend::Postgres(pg) => {
            // The data directory still holds this node's keyring (unless elsewhere) and its
            // node id; the audit log is in the database too (`open_audit_log`).
            fsutil::create_private_dir(&options.data_dir)?;
            let pool = off_runtime(|| PgPool::connect(pg))?;
            let node_id = options.resolve_node_id()?;
            let store = off_runtime(|| {
                PostgresKeyStore::open(pool.clone(), &node_id, options.staleness_bound)
            })?;
            tracing::info!(target_db = %pool.target(), node_id, "key store: PostgreSQL");
            Ok((Arc::new(store), Some(pool)))
        }
    }
}

/// Opens the audit log of `options`' data directory: the one place the service chooses the
/// audit backend. With the key store in PostgreSQL (`postgres`, its pool), this node's chain
/// of the PostgreSQL audit log in the same database (docs/AUDIT.md §9); otherwise `audit.db`.
fn open_audit_log(
    options: &ServiceOptions,
    postgres: Option<&PgPool>,
    keys: &Arc<ChainKeys>,
) -> Result<Box<dyn AuditLog>> {
    if let Some(pool) = postgres {
        let node = options.resolve_node_id()?;
        let log = off_runtime(|| PostgresAuditLog::open(pool.clone(), &node, Arc::clone(keys)))?;
        return Ok(Box::new(log));
    }
    Ok(Box::new(SqliteAuditLog::open(
        &options.data_dir.join(AUDIT_DB),
        options.durability,
        options.audit_busy_timeout,
        Arc::clone(keys),
    )?))
}

/// Opens the audit log of `options`' data directory without its chain keys, for commands
/// that only read records and need no master key (`audit export`): see
/// [`SqliteAuditLog::open_unkeyed`] (or, with `--store postgres://…`,
/// [`PostgresAuditLog::open_unkeyed`] on that database). Fails if there is no log.
pub fn open_audit_log_unkeyed(options: &ServiceOptions) -> Result<Box<dyn AuditLog>> {
    if let StoreBackend::Postgres(pg) = &options.store {
        let node = options.resolve_node_id()?;
        let log = off_runtime(|| {
            PgPool::connect(pg).and_then(|pool| PostgresAuditLog::open_unkeyed(pool, &node))
        })?;
        return Ok(Box::new(log));
    }
    let path = options.data_dir.join(AUDIT_DB);
    if !path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} does not exist",
            path.display()
        )));
    }
    Ok(Box::new(SqliteAuditLog::open_unkeyed(
        &path,
        options.durability,
        options.audit_busy_timeout,
    )?))
}

/// Files inside the data directory that exist only once it has served: the audit log, the
/// first-start admin token, and the shred ledger when it lives there. A keyring file is not
/// one (operators provision it before the first start), nor is a ledger outside the directory
/// (one ledger may serve several data directories on the same keyring).
fn earlier_life_signs(options: &ServiceOptions) -> Vec<PathBuf> {
    let dir = &options.data_dir;
    let mut signs = vec![dir.join(AUDIT_DB), dir.join(ADMIN_TOKEN_FILE)];
    let ledger = options.shred_ledger_path();
    if ledger.parent() == Some(dir.as_path()) {
        signs.push(ledger);
    }
    signs
}

/// Whether the audit log records the key store's upgrade to row MACs (a `RowMacUpgrade`
/// record). Read before the upgrade may run: the chain is keyed, so a writer of keys.db who
/// rewrote it into its pre-upgrade form cannot also erase this without breaking the chain.
fn row_mac_upgrade_recorded(
    options: &ServiceOptions,
    postgres: Option<&PgPool>,
    chain_keys: &Arc<ChainKeys>,
) -> Result<bool> {
    if postgres.is_none() && !options.data_dir.join(AUDIT_DB).exists() {
        // The identity check below refuses a missing log.
        return Ok(false);
    }
    let found = open_audit_log(options, postgres, chain_keys)?.list(&crate::audit::ListFilter {
        operation: Task::RowMacUpgrade.stored_name().to_owned(),
        limit: 1,
        ..Default::default()
    })?;
    Ok(!found.is_empty())
}

/// Audits what the shred ledger check changed, as `system:shred-ledger`, into `log`.
fn audit_shred_report(log: &dyn AuditLog, report: &ShredReport) -> Result<()> {
    let records: Vec<AuditRecord> = report
        .reapplied
        .iter()
        .map(|item| {
            (
                item,
                Task::ShredLedgerReapply,
                "destroyed again: the shred ledger records it destroyed",
            )
        })
        .chain(report.recorded_from_store.iter().map(|item| {
            (
                item,
                Task::ShredLedgerRecord,
                "recorded in the shred ledger from the key store",
            )
        }))
        .map(|(item, operation, detail)| {
            AuditRecord::local(operation, "system:shred-ledger", Outcome::Ok)
                .tenant(item.tenant_id.as_str())
                .versions(item.version.into_iter().collect())
                .detail(detail)
        })
        .collect();
    if records.is_empty() {
        return Ok(());
    }
    for item in &report.reapplied {
        tracing::warn!(tenant = %item.tenant_id, version = ?item.version, "shredded again: the shred ledger records it destroyed");
    }
    let refs: Vec<&AuditRecord> = records.iter().collect();
    log.append(&refs)?;
    Ok(())
}

/// The caller named in `KeyStoreAnchor` records.
pub const KEY_STORE_ANCHOR_CALLER: &str = "system:key-store";

/// What a `KeyStoreAnchor` record's detail says before the counter (docs/AUDIT.md): the
/// detail is exactly this and the counter in decimal.
const ANCHOR_DETAIL: &str = "key-store row-anchor write counter ";

/// What separates the restored key store's counter from the rest of a Restore record's
/// detail.
const RESTORE_ANCHOR_SEPARATOR: &str = "; ";

/// Records looked at, newest first, per read of the audit log while looking for the latest
/// key-store anchors; also how far before the newest anchor older ones still count (anchors
/// of two processes may land out of order, by as little as their appends race).
const ANCHOR_WINDOW: u64 = 1000;

/// The text an `ok` Restore record's detail ends with to name `counter` as the anchor counter
/// of the key store it installs (`restore`, and `migrate-store`, whose copy is a restore into
/// a new backend): the rollback check's baseline from that record on.
pub fn restored_anchor_note(counter: u64) -> String {
    format!("{RESTORE_ANCHOR_SEPARATOR}{ANCHOR_DETAIL}{counter}")
}

/// The `KeyStoreAnchor` record of `counter`.
fn key_store_anchor_record(counter: u64) -> AuditRecord {
    AuditRecord::local(Task::KeyStoreAnchor, KEY_STORE_ANCHOR_CALLER, Outcome::Ok)
        .detail(format!("{ANCHOR_DETAIL}{counter}"))
}

/// The counter a `KeyStoreAnchor` record names (`None` for any other record, or a detail
/// not in the one format).
fn anchored_counter(record: &AuditRecord) -> Option<u64> {
    if !Operation::Task(Task::KeyStoreAnchor).is(&record.operation) || record.outcome != Outcome::Ok
    {
        return None;
    }
    parse_counter(record.detail.strip_prefix(ANCHOR_DETAIL)?)
}

/// The counter an `ok` Restore record's detail ends with (`None` for a restore by a build
/// from before key-store anchors).
fn restored_counter(record: &AuditRecord) -> Option<u64> {
    let (_, tail) = record.detail.rsplit_once(RESTORE_ANCHOR_SEPARATOR)?;
    parse_counter(tail.strip_prefix(ANCHOR_DETAIL)?)
}

/// A counter in decimal digits only.
fn parse_counter(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A key-store anchor counter the audit chain records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordedAnchor {
    /// The counter.
    counter: u64,
    /// The sequence number of the record that names it.
    seq: u64,
}

/// The highest counter among the latest `KeyStoreAnchor` records of `options`' audit log:
/// the newest one and those up to [`ANCHOR_WINDOW`] records before it, none before the last
/// `ok` Restore or RowMacUpgrade record (each begins a new line of the key store; the
/// counter a Restore record's detail ends with counts when no anchor follows it). `None` when the log
/// holds no such record (a log from before key-store anchors, a new log, just restored).
fn recorded_key_store_anchor(
    options: &ServiceOptions,
    postgres: Option<&PgPool>,
    chain_keys: &Arc<ChainKeys>,
) -> Result<Option<RecordedAnchor>> {
    if postgres.is_none() && !options.data_dir.join(AUDIT_DB).exists() {
        // The identity check refuses a missing log later.
        return Ok(None);
    }
    latest_anchor(open_audit_log(options, postgres, chain_keys)?.as_ref())
}

/// [`recorded_key_store_anchor`] over any audit log: reads backwards from the head, one
/// window of records at a time, so the cost is the records since the latest anchor (the
/// latest key-store change or start), not the whole log.
fn latest_anchor(log: &dyn AuditLog) -> Result<Option<RecordedAnchor>> {
    let mut end = log.head()?.seq;
    let mut best: Option<RecordedAnchor> = None;
    // Once the newest anchor is found, older ones count only down to this sequence number.
    let mut floor = 0u64;
    while end > floor {
        let start = end.saturating_sub(ANCHOR_WINDOW).max(floor);
        let page = log.list(&ListFilter {
            after_seq: start,
            limit: usize::try_from(end - start).unwrap_or(usize::MAX),
            ..ListFilter::default()
        })?;
        for (seq, record) in page.iter().rev().filter(|(seq, _)| *seq <= end) {
            let new_line = Operation::Task(Task::Restore).is(&record.operation)
                || Operation::Task(Task::RowMacUpgrade).is(&record.operation);
            if new_line && record.outcome == Outcome::Ok {
                // A restore (or the upgrade to row MACs) begins the store's new line: nothing
                // before it counts, and a Restore record names the restored counter.
                if best.is_none() {
                    best = restored_counter(record)
                        .map(|counter| RecordedAnchor { counter, seq: *seq });
                }
                return Ok(best);
            }
            if let Some(counter) = anchored_counter(record) {
                if best.is_none() {
                    floor = seq.saturating_sub(ANCHOR_WINDOW);
                }
                if best.is_none_or(|b| counter > b.counter) {
                    best = Some(RecordedAnchor { counter, seq: *seq });
                }
            }
        }
        if page.is_empty() {
            // Pruned below here: nothing older to read.
            break;
        }
        end = start;
    }
    Ok(best)
}

/// Refuses a key store whose anchor counter is below the one the audit chain recorded: the
/// whole of keys.db was put back to an earlier copy (a store ahead of the chain is fine: a
/// crash between a key-store commit and its audit record leaves it so).
fn refuse_key_store_rollback(counter: u64, recorded: &RecordedAnchor) -> Result<()> {
    if counter >= recorded.counter {
        return Ok(());
    }
    tracing::error!(
        counter,
        recorded = recorded.counter,
        record = recorded.seq,
        "keys.db is older than the audit log: refusing to open it"
    );
    Err(Error::StoreIntegrity(format!(
        "keys.db is older than the audit log says it was: its row-anchor write counter is \
         {counter}, but audit record {} (KeyStoreAnchor) recorded {} after a later change. \
         keys.db was put back to an earlier copy, which would undo every revocation, \
         suspension, rotation and nonce-budget reservation made since. Put back the keys.db \
         that belongs with this audit.db, or restore a backup as a pair with `tenant-kms \
         restore --from <backup> --force` (which records the restored key store in the \
         audit chain); see docs/OPERATIONS.md, \"A data file is missing\"",
        recorded.seq, recorded.counter
    )))
}

/// An audit log that anchors the key store: each non-empty batch appended after a change
/// the store's anchor counter shows (and the chain does not record yet) gets a
/// `KeyStoreAnchor` record after its own records, in the same transaction, so the record of
/// a key-store change and the anchor of its counter are durable together (one fsync) and a
/// later start can refuse an earlier copy of keys.db. The counter is read from memory
/// before the append: the batch's records were submitted after their changes committed, so
/// it covers them. Changes are control-plane or nonce-budget reservations (one per chunk of
/// encryptions), so few batches carry one. Everything else passes through.
struct AnchoringLog {
    log: Box<dyn AuditLog>,
    store: Arc<dyn KeyStore>,
    /// The highest counter known recorded (shared by the logs of one [`DataDir`]).
    anchored: Arc<AtomicU64>,
}

impl AnchoringLog {
    /// Appends `records` through `append` (the inner log's, waiting or not), with the anchor
    /// record after them when one is due. `None` when `append` gave up: nothing was written.
    fn append_with(
        &self,
        records: &[&AuditRecord],
        append: impl FnOnce(&[&AuditRecord]) -> Result<Option<u64>>,
    ) -> Result<Option<u64>> {
        let counter = self.store.anchor_counter();
        // A batch that is an anchor already (`DataDir::record_key_store_anchor`) needs none.
        let anchors_itself = records
            .iter()
            .any(|record| anchored_counter(record).is_some());
        if records.is_empty() || anchors_itself || counter <= self.anchored.load(Ordering::Acquire)
        {
            let first = append(records)?;
            if first.is_some()
                && let Some(max) = records.iter().filter_map(|r| anchored_counter(r)).max()
            {
                self.anchored.fetch_max(max, Ordering::AcqRel);
            }
            return Ok(first);
        }
        let anchor = key_store_anchor_record(counter);
        let mut batch = records.to_vec();
        batch.push(&anchor);
        let first = append(&batch)?;
        if first.is_some() {
            self.anchored.fetch_max(counter, Ordering::AcqRel);
        }
        Ok(first)
    }
}

impl AuditAppend for AnchoringLog {
    fn append(&self, records: &[&AuditRecord]) -> Result<u64> {
        self.append_with(records, |batch| self.log.append(batch).map(Some))?
            .ok_or_else(|| Error::internal("an audit append that waits gave up"))
    }

    fn head(&self) -> Result<ChainHead> {
        self.log.head()
    }

    fn append_cost(&self) -> AppendCost {
        self.log.append_cost()
    }

    fn append_without_waiting(&self, records: &[&AuditRecord]) -> Result<Option<u64>> {
        self.append_with(records, |batch| self.log.append_without_waiting(batch))
    }

    fn wal_checkpoint_due(&self) -> bool {
        self.log.wal_checkpoint_due()
    }

    fn wal_checkpoint(&self) -> Result<()> {
        self.log.wal_checkpoint()
    }

    // The pipelined fsync of the inner log passes through too (the trait's defaults would
    // make every commit sync on the writer thread, holding the write lock through the
    // fsync). An anchor committed in a batch whose sync then fails is in the file, made
    // durable by the next sync that succeeds; if the power fails first, the start-up anchor
    // (`DataDir::record_key_store_anchor`) records the counter again.
    fn syncs_apart(&self) -> bool {
        self.log.syncs_apart()
    }

    fn append_unsynced(&self, records: &[&AuditRecord]) -> Result<u64> {
        self.append_with(records, |batch| self.log.append_unsynced(batch).map(Some))?
            .ok_or_else(|| Error::internal("an audit append that waits gave up"))
    }

    fn sync_committed(&self) -> Result<()> {
        self.log.sync_committed()
    }
}

impl AuditQuery for AnchoringLog {
    fn list(&self, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>> {
        self.log.list(filter)
    }

    fn count(&self) -> Result<u64> {
        self.log.count()
    }
}

impl AuditMaintenance for AnchoringLog {
    fn verify(&self) -> Result<VerifyReport> {
        self.log.verify()
    }

    fn check_tail(&self) -> Result<VerifyReport> {
        self.log.check_tail()
    }

    fn check_anchor(&self, seq: u64, mac: &[u8]) -> Result<Option<String>> {
        self.log.check_anchor(seq, mac)
    }

    fn prune(&self, before_micros: i64) -> Result<u64> {
        self.log.prune(before_micros)
    }

    fn recover(&self, caller: &str) -> Result<Recovery> {
        self.log.recover(caller)
    }
}

impl AuditSnapshot for AnchoringLog {
    fn snapshot_to(&self, dest: &Path) -> Result<ChainHead> {
        self.log.snapshot_to(dest)
    }
}

impl AppState {
    /// Opens (and on first start creates) everything the service needs.
    ///
    /// First runs the cryptographic power-on self-test (`crate::selftest::power_on`): if
    /// AES-GCM, HKDF or the wire format give a wrong known answer, nothing is opened and the
    /// service refuses to start.
    pub fn open(options: ServiceOptions) -> Result<Self> {
        crate::selftest::power_on().map_err(|failure| {
            tracing::error!(%failure, "power-on self-test failed");
            Error::Internal(format!("{failure}; refusing to serve"))
        })?;
        let dir = DataDir::open(&options, true)?;
        // Before the writer starts (it owns the log's tail from then on) and before anything
        // serves: key changes a crash left without an audit record get one.
        super::reconcile::reconcile(
            dir.store.as_ref(),
            dir.audit_log(&options)?.as_ref(),
            options.clock.now_unix(),
        )?;
        let audit = dir.audit_writer(&options)?;
        let audit_reader: Arc<dyn AuditLog> = Arc::from(dir.audit_log(&options)?);
        if options.bootstrap_admin_token {
            bootstrap_admin_token(
                dir.store.as_ref(),
                &options.data_dir,
                options.clock.as_ref(),
            )?;
        }
        dir.record_key_store_anchor(&audit)?;
        let webhook = options
            .webhook
            .as_ref()
            .map(|config| crate::webhook::Webhook::open(config, Arc::clone(&options.clock)))
            .transpose()?;
        let usage_store =
            crate::usage::SqliteUsageStore::open(&options.data_dir.join(crate::usage::USAGE_DB))?;
        let usage = Arc::new(crate::usage::UsageMeter::new(
            options.usage,
            Arc::clone(&options.clock),
            Arc::new(usage_store),
        ));
        Ok(Self {
            usage,
            webhook,
            auth: Authenticator::new(Arc::clone(&dir.store), Arc::clone(&options.clock)),
            keys: dir.keys,
            audit,
            audit_reader,
            limiter: RateLimiter::new(options.limits.rate_limit),
            detectors: crate::detect::Detectors::new(
                options.detect.clone(),
                Arc::clone(&options.clock),
            ),
            options,
        })
    }

    /// Drops caches when another process changed the key store (a rotation, a revocation).
    ///
    /// The check (see [`crate::store::ChangeDetection::change_generation`]) reads the WAL-index header of
    /// keys.db, which needs no connection, and only when that moved runs a `PRAGMA
    /// data_version` on the process's connection. When that connection is free the full
    /// check runs inline; when a write holds it (an fsync, another call's full check, a wait
    /// for another process's lock) the full check moves to the blocking pool, so the async
    /// threads never stall behind the store, and the call still sees every change committed
    /// before it started.
    pub async fn refresh(&self) -> Result<()> {
        let generation = match self.keys.store().try_change_generation() {
            Some(generation) => generation?,
            None => {
                let keys = Arc::clone(&self.keys);
                super::blocking(move || keys.store().change_generation()).await?
            }
        };
        if self.keys.drop_caches_for(generation, || self.auth.clear()) {
            // A master rotation by another process is rare; its check reads the store, so it
            // runs on the blocking pool.
            let keys = Arc::clone(&self.keys);
            super::blocking(move || {
                keys.reload_keyring_if_stale();
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}

/// On the first start (no token in the store), issues an admin token for every tenant, writes
/// it to `<data-dir>/admin.token` (0600) and says so once on stderr (showing the token only if
/// stderr is a terminal).
fn bootstrap_admin_token(store: &dyn KeyStore, data_dir: &Path, clock: &dyn Clock) -> Result<()> {
    if !store.list_tokens()?.is_empty() {
        return Ok(());
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let issued = issue_token(
        store,
        &TokenSpec {
            name: "bootstrap-admin".into(),
            role: Role::Admin,
            tenants: "*".into(),
            operations: "*".into(),
            ttl_seconds: None,
        },
        clock,
    )?;
    // Never overwrite a token file: one here while the store has no token means the store
    // was replaced, and the file is the operator's only copy of the old token.
    if path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} exists but keys.db holds no token: keys.db was replaced or re-created; restore \
             it from a backup (docs/OPERATIONS.md, \"A data file is missing\")",
            path.display()
        )));
    }
    fsutil::write_private_file(&path, format!("{}\n", issued.secret.as_str()).as_bytes())?;
    // The token itself is shown only to a person at a terminal: when stderr is a file, a pipe
    // or the journal, it would be stored in clear wherever the logs go (and the trace-log leak
    // test would find it). The file is the durable copy either way.
    // Written, not eprintln!'d: a closed stderr must not panic the start.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let _ = writeln!(
            std::io::stderr(),
            "tenant-kms: first start: created an admin token (id {}), saved to {} (mode 0600):\n{}\n\
             It is shown only this once; keep it secret.",
            issued.record.id,
            path.display(),
            issued.secret.as_str()
        );
    } else {
        // A log event, so that it reaches log shippers in the log format (`--log-format json`).
        tracing::warn!(
            token_id = %issued.record.id,
            path = %path.display(),
            "first start: created an admin token (mode 0600); it is not printed because \
             stderr is not a terminal"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::secret::SecretKey;

    fn new_log(dir: &Path) -> SqliteAuditLog {
        let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
        SqliteAuditLog::open(
            &dir.join(AUDIT_DB),
            Durability::Process,
            crate::audit::sqlite::DEFAULT_BUSY_TIMEOUT,
            keys,
        )
        .unwrap()
    }

    fn other() -> AuditRecord {
        AuditRecord::local(Task::Backup, "cli:test", Outcome::Ok)
    }

    fn latest(log: &SqliteAuditLog) -> Option<u64> {
        latest_anchor(log).unwrap().map(|anchor| anchor.counter)
    }

    #[test]
    fn the_latest_anchors_count_and_a_restore_begins_a_new_line() {
        let temp = tempfile::tempdir().unwrap();
        let log = new_log(temp.path());
        assert_eq!(latest(&log), None, "no anchor yet: no baseline");
        // Two processes' anchors landed out of order: the highest of them counts.
        log.append(&[
            &key_store_anchor_record(7),
            &other(),
            &key_store_anchor_record(5),
        ])
        .unwrap();
        assert_eq!(latest(&log), Some(7));
        // More than a window of other records since: still found, reading backwards.
        let filler: Vec<AuditRecord> = (0..2 * ANCHOR_WINDOW + 10).map(|_| other()).collect();
        log.append(&filler.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(latest(&log), Some(7));
        // A failed restore is no boundary; an `ok` one is, with the counter it names.
        let restore = |outcome, counter: u64| {
            AuditRecord::local(Task::Restore, "cli:test", outcome).detail(format!(
                "restored backup b; nothing replaced{RESTORE_ANCHOR_SEPARATOR}{ANCHOR_DETAIL}\
                 {counter}"
            ))
        };
        log.append(&[&restore(Outcome::Internal, 1)]).unwrap();
        assert_eq!(latest(&log), Some(7));
        log.append(&[&restore(Outcome::Ok, 3)]).unwrap();
        assert_eq!(latest(&log), Some(3), "the restored line's baseline");
        log.append(&[&key_store_anchor_record(4)]).unwrap();
        assert_eq!(latest(&log), Some(4));
        // Only the one detail format names a counter.
        for detail in [
            "",
            "8",
            "key-store row-anchor write counter ",
            "key-store row-anchor write counter +9",
            "key-store row-anchor write counter 9 ",
        ] {
            let record =
                AuditRecord::local(Task::KeyStoreAnchor, KEY_STORE_ANCHOR_CALLER, Outcome::Ok)
                    .detail(detail);
            assert_eq!(anchored_counter(&record), None, "{detail:?}");
        }
        assert_eq!(anchored_counter(&key_store_anchor_record(9)), Some(9));
        let mut not_ok = key_store_anchor_record(9);
        not_ok.outcome = Outcome::Internal;
        assert_eq!(anchored_counter(&not_ok), None);
    }

    #[test]
    fn only_a_store_behind_the_chain_is_refused_and_the_message_says_what_to_do() {
        let recorded = RecordedAnchor {
            counter: 5,
            seq: 42,
        };
        assert!(refuse_key_store_rollback(5, &recorded).is_ok());
        assert!(
            refuse_key_store_rollback(6, &recorded).is_ok(),
            "ahead: a crash window"
        );
        let refused = refuse_key_store_rollback(4, &recorded).unwrap_err();
        assert!(matches!(refused, Error::StoreIntegrity(_)));
        let text = refused.to_string();
        for part in [
            "counter is 4",
            "audit record 42",
            "recorded 5",
            "tenant-kms restore --from",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
    }
}
