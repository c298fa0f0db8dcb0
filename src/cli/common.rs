//! Arguments and helpers shared by the commands that work on a data directory.

use std::path::PathBuf;

use clap::Args;

use super::keyring::SealArgs;
use crate::audit::{AuditRecord, Operation, Outcome};
use crate::config::{FileConfig, bounded_count, max, parse_duration_seconds};
use crate::error::{Error, Result};
use crate::keys::MasterKeySource;
use crate::service::ServiceOptions;
use crate::service::state::KEYRING_FILE;
use crate::store::{STORE_ENV, StoreBackend};

/// Where the data and the master keys are.
#[derive(Debug, Clone, Args)]
pub struct DataDirArgs {
    /// Data directory.
    #[arg(long, default_value = "./data", env = "TENANT_KMS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Master keyring file (default: <data-dir>/master.keyring).
    #[arg(long, conflicts_with = "master_key_env")]
    pub keyring: Option<PathBuf>,
    /// Read the master keys from this environment variable (`1:<hex>,2:<hex>`) instead of a
    /// keyring file.
    #[arg(long)]
    pub master_key_env: Option<String>,
    /// Shred ledger file (default: <keyring>.shred-ledger beside the keyring file; with
    /// --master-key-env, <data-dir>/master.keyring.shred-ledger). Keep it with the master keys.
    #[arg(long, env = "TENANT_KMS_SHRED_LEDGER")]
    pub shred_ledger: Option<PathBuf>,
    /// How the keyring file is sealed (`--seal pkcs11|passphrase` and its flags).
    #[command(flatten)]
    pub seal: SealArgs,
    /// Which key store (`--store` and its settings).
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Which key store a command uses and how to reach it (issue 14): the one place every
/// data-directory command and `serve` parse `--store`, `TENANT_KMS_STORE` and the config
/// file's `store*` keys, and `--node-id`.
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// Key store: a PostgreSQL connection string (postgres://user@host[:port][,host2…]/db,
    /// with ?target_session_attrs=read-write for several hosts) shared by every node;
    /// default: SQLite in the data directory. Also TENANT_KMS_STORE. A password is refused
    /// here (ps shows it): use --store-password-file, PGPASSWORD, the config file or
    /// TENANT_KMS_STORE.
    #[arg(long, value_parser = StoreFlagParser)]
    pub store: Option<String>,
    /// File holding the PostgreSQL password on its first line (mode 0600).
    #[arg(long)]
    pub store_password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that must sign the PostgreSQL server's certificate: TLS is then
    /// required and verified.
    #[arg(long)]
    pub store_tls_ca: Option<PathBuf>,
    /// Most PostgreSQL connections this process opens [default: 16].
    #[arg(long)]
    pub store_pool_size: Option<u32>,
    /// This node's identity in the audit chains of a shared store [default: generated once,
    /// kept in <data-dir>/node.id].
    #[arg(long, value_parser = parse_node_id)]
    pub node_id: Option<String>,
}

/// clap's check of `--store`: a connection string with a password is refused on the command
/// line, where every user of the machine can read it. A parser of its own so that clap's
/// error does not repeat the value (and the password) on stderr.
#[derive(Debug, Clone, Copy)]
pub(super) struct StoreFlagParser;

impl clap::builder::TypedValueParser for StoreFlagParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<String, clap::Error> {
        use clap::error::ErrorKind;
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(ErrorKind::InvalidUtf8, "--store must be UTF-8\n").with_cmd(cmd)
        })?;
        if crate::store::postgres::has_password(text) {
            return Err(clap::Error::raw(
                ErrorKind::ValueValidation,
                "--store: the connection string carries a password, which the command line \
                 would show to every user (ps); remove it and use --store-password-file, \
                 PGPASSWORD, the config file's `store` or TENANT_KMS_STORE\n",
            )
            .with_cmd(cmd));
        }
        Ok(text.to_owned())
    }
}

/// clap's check of `--node-id`.
pub(super) fn parse_node_id(text: &str) -> std::result::Result<String, String> {
    crate::service::node_id::parse(text).map_err(|e| e.to_string())
}

impl StoreArgs {
    /// Sets `options`' store and node id from these flags, over `TENANT_KMS_STORE`, over the
    /// config file `file` (durations there are parsed here too: `store_connect_timeout`,
    /// `staleness_bound`).
    pub fn apply(&self, file: &FileConfig, options: &mut ServiceOptions) -> Result<()> {
        let env = std::env::var(STORE_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        let setting = self.store.clone().or(env).or(file.store.clone());
        options.store = StoreBackend::from_setting(setting.as_deref());
        if let Some(pg) = options.store.postgres_mut() {
            pg.password_file = self
                .store_password_file
                .clone()
                .or(file.store_password_file.clone());
            pg.tls_ca = self.store_tls_ca.clone().or(file.store_tls_ca.clone());
            if let Some(n) = self.store_pool_size.or(file.store_pool_size) {
                pg.pool_size = bounded_count("store_pool_size", n, max::POOL_SIZE)?.max(1);
            }
            if let Some(text) = &file.store_connect_timeout {
                match parse_duration_seconds(text)? {
                    0 => {
                        return Err(Error::InvalidArgument(
                            "store_connect_timeout must be at least 1s".into(),
                        ));
                    }
                    seconds => pg.connect_timeout = std::time::Duration::from_secs(seconds),
                }
            }
        }
        if let Some(text) = &file.staleness_bound {
            options.staleness_bound = parse_staleness_bound(text)?;
        }
        options.node_id = match self.node_id.clone() {
            Some(id) => Some(id),
            None => file
                .node_id
                .as_deref()
                .map(crate::service::node_id::parse)
                .transpose()?,
        };
        Ok(())
    }
}

/// `staleness_bound` as a duration: at least 100 ms (the change log is polled several times
/// within it), at most an hour.
pub fn parse_staleness_bound(text: &str) -> Result<std::time::Duration> {
    let bound = humantime::parse_duration(text.trim()).map_err(|_| {
        Error::InvalidArgument(format!(
            "staleness_bound '{text}' is not a duration (examples: 500ms, 1s, 5s)"
        ))
    })?;
    if bound < std::time::Duration::from_millis(100) || bound > std::time::Duration::from_secs(3600)
    {
        return Err(Error::InvalidArgument(format!(
            "staleness_bound '{text}' must be between 100ms and 1h"
        )));
    }
    Ok(bound)
}

impl DataDirArgs {
    /// The master-key source these arguments name (sealed when `--seal` is given).
    pub fn master_keys(&self) -> MasterKeySource {
        match (&self.master_key_env, &self.keyring) {
            (Some(var), _) => MasterKeySource::Env(var.clone()),
            (None, Some(path)) => self.seal.source(path.clone()),
            (None, None) => self.seal.source(self.data_dir.join(KEYRING_FILE)),
        }
    }

    /// Service options for offline commands on this data directory, on the process clock
    /// ([`crate::clock::process_clock`]).
    pub fn options(&self) -> ServiceOptions {
        let mut options = ServiceOptions::new(&self.data_dir);
        options.clock = crate::clock::process_clock();
        options.master_keys = self.master_keys();
        options.bootstrap_admin_token = false;
        options.shred_ledger = self.shred_ledger.clone();
        // Without a config file nothing here can fail: flags and the environment only name
        // the store; its durations keep their defaults.
        if let Err(e) = self.store.apply(&FileConfig::default(), &mut options) {
            tracing::warn!(error = %e, "store settings ignored");
        }
        options
    }
}

/// How the audit names an operator running a command: `cli:<os user>`.
pub fn cli_caller() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// An audit record for a command-line operation, by [`cli_caller`] on this machine: the
/// simple way for a command to audit what it did (append it with
/// [`crate::audit::AuditWriter::append_blocking`]).
pub fn cli_record(
    operation: impl Into<Operation>,
    tenant: &str,
    versions: Vec<u32>,
    outcome: Outcome,
    detail: String,
) -> AuditRecord {
    AuditRecord::local(operation, cli_caller(), outcome)
        .tenant(tenant)
        .versions(versions)
        .detail(detail)
}
