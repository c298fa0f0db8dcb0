//! Arguments and helpers shared by the commands that work on a data directory.

use std::path::PathBuf;

use clap::Args;

use super::keyring::SealArgs;
use crate::audit::{AuditRecord, Operation, Outcome};
use crate::keys::MasterKeySource;
use crate::service::ServiceOptions;
use crate::service::state::KEYRING_FILE;

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
