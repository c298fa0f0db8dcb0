//! The state every handler shares, and how it is assembled from a data directory.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audit::operation::Task;
use crate::audit::{
    AuditLog, AuditRecord, AuditWriter, ChainKeys, Durability, Outcome, SqliteAuditLog,
};
use crate::auth::cert::TlsCallers;
use crate::auth::rate::{RateLimit, RateLimiter};
use crate::auth::{Authenticator, Role, TokenSpec, issue_token};
use crate::backup::ledger::{ShredLedger, ShredReport};
use crate::clock::{Clock, SharedClock};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keys::{KeyManager, KeyPolicy, MasterKeySource};
use crate::store::{KeyStore, SqliteKeyStore};

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
    /// The wall clock every time-based decision reads (token expiry, deletion windows and
    /// their reaper, rotation age): [`crate::clock::SystemClock`] unless a test injects
    /// another.
    pub clock: SharedClock,
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
        }
    }

    /// The shred ledger file these options name (see [`ServiceOptions::shred_ledger`]).
    pub fn shred_ledger_path(&self) -> PathBuf {
        self.shred_ledger.clone().unwrap_or_else(|| {
            crate::backup::ledger::default_path(&self.master_keys, &self.data_dir)
        })
    }
}

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
        let store: Arc<dyn KeyStore> =
            Arc::new(SqliteKeyStore::open(&options.data_dir.join(KEYS_DB))?);
        let keys = Arc::new(KeyManager::open(
            Arc::clone(&store),
            options.master_keys.clone(),
            create,
            options.key_policy.clone(),
            Arc::clone(&options.clock),
        )?);
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
        keys.set_shred_recorder(ledger);
        // Read before `audit_secret` creates it: an audit key means an audit log exists.
        let audit_log_exists = store.audit_key()?.is_some();
        let chain_keys = Arc::new(
            ChainKeys::derive(&keys.audit_secret()?)
                .map_err(|_| Error::internal("audit key derivation failed"))?,
        );
        crate::audit::sqlite::check_identity(
            &options.data_dir.join(AUDIT_DB),
            &chain_keys,
            !audit_log_exists || options.new_audit_log,
            options.durability == Durability::Fsync,
            options.audit_busy_timeout,
        )?;
        audit_shred_report(options, &chain_keys, &shred)?;
        Ok(Self {
            store,
            keys,
            chain_keys,
            shred,
        })
    }

    /// Opens this data directory's audit log (`audit.db`, created if missing) with the
    /// options' durability and lock wait, chained under this directory's keys. Each call
    /// opens a log of its own (for SQLite: its own connection).
    pub fn audit_log(&self, options: &ServiceOptions) -> Result<Box<dyn AuditLog>> {
        open_audit_log(options, &self.chain_keys)
    }

    /// Starts an audit writer on this data directory's audit log: the simple way for a
    /// command to append records ([`AuditWriter::append_blocking`], then
    /// [`AuditWriter::shutdown`]).
    pub fn audit_writer(&self, options: &ServiceOptions) -> Result<AuditWriter> {
        AuditWriter::start(self.audit_log(options)?, Arc::clone(&self.chain_keys))
    }
}

/// Opens the audit log of `options`' data directory: the one place the service chooses the
/// audit backend.
fn open_audit_log(options: &ServiceOptions, keys: &Arc<ChainKeys>) -> Result<Box<dyn AuditLog>> {
    Ok(Box::new(SqliteAuditLog::open(
        &options.data_dir.join(AUDIT_DB),
        options.durability,
        options.audit_busy_timeout,
        Arc::clone(keys),
    )?))
}

/// Opens the audit log of `options`' data directory without its chain keys, for commands
/// that only read records and need no master key (`audit export`): see
/// [`SqliteAuditLog::open_unkeyed`]. Fails if there is no log.
pub fn open_audit_log_unkeyed(options: &ServiceOptions) -> Result<Box<dyn AuditLog>> {
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

/// Audits what the shred ledger check changed, as `system:shred-ledger`.
fn audit_shred_report(
    options: &ServiceOptions,
    chain_keys: &Arc<ChainKeys>,
    report: &ShredReport,
) -> Result<()> {
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
    open_audit_log(options, chain_keys)?.append(&refs)?;
    Ok(())
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
        Ok(Self {
            auth: Authenticator::new(Arc::clone(&dir.store), Arc::clone(&options.clock)),
            keys: dir.keys,
            audit,
            audit_reader,
            limiter: RateLimiter::new(options.limits.rate_limit),
            options,
        })
    }

    /// Drops caches when another process changed the key store (a rotation, a revocation).
    ///
    /// The check (see [`crate::store::ChangeDetection::change_generation`]) reads the WAL-index header of
    /// keys.db, and only when that moved runs a `PRAGMA data_version` on the process's
    /// connection. When that connection is free it runs inline (well under a microsecond when
    /// nothing changed); when a write holds it (an fsync, or a wait for another process's
    /// lock) the check moves to the blocking pool, so the async threads never stall behind
    /// the store, and the call still sees every change committed before it started.
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
