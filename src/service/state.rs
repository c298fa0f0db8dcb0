//! The state every handler shares, and how it is assembled from a data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::audit::{AuditWriter, ChainKeys, Durability};
use crate::auth::{Authenticator, Role, TokenSpec, issue_token};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keys::{KeyManager, KeyPolicy, MasterKeySource};
use crate::store::{KeyStore, SqliteKeyStore};

/// Input limits (issue: tenant ids and contexts are limited by their types).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest plaintext value in bytes.
    pub max_field_bytes: usize,
    /// Most items in one batch.
    pub max_batch_items: usize,
    /// Largest gRPC message in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_field_bytes: 64 * 1024,
            max_batch_items: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
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
            key_policy: KeyPolicy::default(),
            limits: Limits::default(),
            min_deletion_window_seconds: 24 * 3600,
            default_deletion_window_seconds: 7 * 24 * 3600,
            bootstrap_admin_token: true,
        }
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
    /// A read connection for audit queries and verification.
    pub audit_reader: Arc<Mutex<rusqlite::Connection>>,
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
}

impl DataDir {
    /// Opens a data directory. With `create`, a missing directory and keyring are created
    /// (first start); without it they must exist.
    pub fn open(options: &ServiceOptions, create: bool) -> Result<Self> {
        if create {
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
        )?);
        let chain_keys = Arc::new(
            ChainKeys::derive(&keys.audit_secret()?)
                .map_err(|_| Error::internal("audit key derivation failed"))?,
        );
        Ok(Self {
            store,
            keys,
            chain_keys,
        })
    }

    /// Starts an audit writer on this data directory's `audit.db`.
    pub fn audit_writer(&self, options: &ServiceOptions) -> Result<AuditWriter> {
        AuditWriter::start(
            options.data_dir.join(AUDIT_DB),
            options.durability,
            Arc::clone(&self.chain_keys),
        )
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
        let audit = dir.audit_writer(&options)?;
        let audit_reader = crate::audit::sqlite::open(
            &options.data_dir.join(AUDIT_DB),
            options.durability == Durability::Fsync,
        )?;
        if options.bootstrap_admin_token {
            bootstrap_admin_token(dir.store.as_ref(), &options.data_dir)?;
        }
        Ok(Self {
            auth: Authenticator::new(Arc::clone(&dir.store)),
            keys: dir.keys,
            audit,
            audit_reader: Arc::new(Mutex::new(audit_reader)),
            options,
        })
    }

    /// Drops caches when another process changed the key store (a rotation, a revocation).
    pub fn refresh(&self) -> Result<()> {
        if self.keys.refresh()? {
            self.auth.clear();
        }
        Ok(())
    }
}

/// On the first start (no token in the store), issues an admin token for every tenant, writes
/// it to `<data-dir>/admin.token` (0600) and says so once on stderr.
fn bootstrap_admin_token(store: &dyn KeyStore, data_dir: &Path) -> Result<()> {
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
    )?;
    let _ = std::fs::remove_file(&path);
    fsutil::write_private_file(&path, format!("{}\n", issued.secret.as_str()).as_bytes())?;
    eprintln!(
        "tenant-kms: first start: created an admin token (id {}), saved to {} (mode 0600):\n{}\n\
         It is shown only this once; keep it secret.",
        issued.record.id,
        path.display(),
        issued.secret.as_str()
    );
    Ok(())
}
