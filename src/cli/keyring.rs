//! `tenant-kms keyring`: the master keyring under a root of trust (docs/OPERATIONS.md, "Root
//! of trust"). Every subcommand takes `--data-dir` and `--keyring` like the others, and the
//! `--seal …` flags that open (or, for `seal`, create) a sealed keyring.
//!
//! - `status`: is the keyring sealed, and how (opens nothing);
//! - `init-hsm-key`: generate the AES-256 root key in a PKCS#11 token;
//! - `seal`: seal a plain keyring under `--seal pkcs11|passphrase`;
//! - `reseal`: re-seal a sealed keyring under a new root (`--new-seal …`): HSM key rotation,
//!   a new passphrase, or another method;
//! - `unseal`: write the plain keyring to a file for an export-controlled migration (explicit
//!   flag; never to a terminal).
//!
//! Each change is audited in the data directory's audit log as `cli:<user>`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand, ValueEnum};

use super::common::{DataDirArgs, cli_record};
use crate::audit::operation::Task;
use crate::audit::{AuditWriter, Outcome};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keys::master::replace_private_file;
use crate::keys::seal::header::TokenMechanism;
use crate::keys::seal::pkcs11::{self, Pkcs11Config};
use crate::keys::seal::{self, RootKey, RootKeyConfig, SecretSource, passphrase};
use crate::keys::{MasterKeySource, MasterKeyring, SealedKeyring};
use crate::service::state::{DataDir, KEYS_DB};

/// A root-of-trust method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SealMethod {
    /// An AES-256 key inside a PKCS#11 token (HSM).
    Pkcs11,
    /// A passphrase through Argon2id.
    Passphrase,
}

/// How a token seals (`auto`: AES-GCM where the module offers it, else AES key wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MechanismArg {
    /// Detect: CKM_AES_GCM if offered, else CKM_AES_KEY_WRAP_PAD.
    Auto,
    /// CKM_AES_GCM with the header as AAD.
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (RFC 5649).
    AesKeyWrapPad,
}

impl MechanismArg {
    fn choice(self) -> Option<TokenMechanism> {
        match self {
            Self::Auto => None,
            Self::AesGcm => Some(TokenMechanism::AesGcm),
            Self::AesKeyWrapPad => Some(TokenMechanism::AesKeyWrapPad),
        }
    }
}

/// The root of trust of the keyring file: how it is sealed (or is to be sealed by
/// `keyring seal`). PINs and passphrases come from files, the environment or the terminal,
/// never from a flag's value.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Root of trust (sealed keyring)")]
pub struct SealArgs {
    /// The keyring file is sealed under this root: pkcs11 (HSM) or passphrase.
    #[arg(
        long,
        value_enum,
        env = "TENANT_KMS_SEAL",
        conflicts_with = "master_key_env"
    )]
    pub seal: Option<SealMethod>,
    /// PKCS#11 module (the HSM vendor's shared library).
    #[arg(long, env = "TENANT_KMS_PKCS11_MODULE", value_name = "PATH")]
    pub pkcs11_module: Option<PathBuf>,
    /// Token label [unsealing: default the label the keyring was sealed with].
    #[arg(long, env = "TENANT_KMS_PKCS11_TOKEN", conflicts_with = "pkcs11_slot")]
    pub pkcs11_token: Option<String>,
    /// Slot number, instead of a token label.
    #[arg(long)]
    pub pkcs11_slot: Option<u64>,
    /// Label of the root key [unsealing: default the label the keyring was sealed with].
    #[arg(long, env = "TENANT_KMS_PKCS11_KEY", value_name = "LABEL")]
    pub pkcs11_key: Option<String>,
    /// File holding the token's user PIN (e.g. $CREDENTIALS_DIRECTORY/pin under systemd).
    #[arg(long, env = "TENANT_KMS_PKCS11_PIN_FILE", value_name = "PATH")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// Environment variable holding the token's user PIN.
    #[arg(long, value_name = "VAR", conflicts_with = "pkcs11_pin_file")]
    pub pkcs11_pin_env: Option<String>,
    /// Sealing mechanism for new sealings.
    #[arg(long, value_enum, default_value = "auto")]
    pub pkcs11_mechanism: MechanismArg,
    /// File holding the passphrase [default: ask on the terminal].
    #[arg(long, env = "TENANT_KMS_PASSPHRASE_FILE", value_name = "PATH")]
    pub passphrase_file: Option<PathBuf>,
    /// Environment variable holding the passphrase.
    #[arg(long, value_name = "VAR", conflicts_with = "passphrase_file")]
    pub passphrase_env: Option<String>,
    /// Argon2id memory in KiB for new passphrase sealings (unsealing reads the header).
    #[arg(long, default_value_t = passphrase::DEFAULT_M_KIB)]
    pub argon2_m_kib: u32,
    /// Argon2id passes for new passphrase sealings.
    #[arg(long, default_value_t = passphrase::DEFAULT_T)]
    pub argon2_t: u32,
    /// Argon2id lanes for new passphrase sealings.
    #[arg(long, default_value_t = passphrase::DEFAULT_P)]
    pub argon2_p: u32,
}

impl SealArgs {
    /// The root these flags name, if `--seal` is given.
    pub fn root(&self) -> Option<RootKeyConfig> {
        Some(match self.seal? {
            SealMethod::Pkcs11 => RootKeyConfig::Pkcs11(Pkcs11Config {
                module: self.pkcs11_module.clone(),
                token: self.pkcs11_token.clone(),
                slot: self.pkcs11_slot,
                key: self.pkcs11_key.clone(),
                pin: secret_source(&self.pkcs11_pin_file, &self.pkcs11_pin_env, false),
                mechanism: self.pkcs11_mechanism.choice(),
            }),
            SealMethod::Passphrase => RootKeyConfig::Passphrase {
                source: secret_source(&self.passphrase_file, &self.passphrase_env, true)?,
                m_kib: self.argon2_m_kib,
                t: self.argon2_t,
                p: self.argon2_p,
            },
        })
    }

    /// The sealed-keyring source for `path`, if `--seal` is given.
    pub fn source(&self, path: PathBuf) -> MasterKeySource {
        match self.root() {
            Some(root) => MasterKeySource::Sealed(SealedKeyring {
                path,
                root: Arc::new(RootKey::new(root)),
            }),
            None => MasterKeySource::File(path),
        }
    }
}

/// A secret from a file or a variable; with `terminal`, the terminal when neither is named.
fn secret_source(
    file: &Option<PathBuf>,
    env: &Option<String>,
    terminal: bool,
) -> Option<SecretSource> {
    match (file, env) {
        (Some(path), _) => Some(SecretSource::File(path.clone())),
        (None, Some(var)) => Some(SecretSource::Env(var.clone())),
        (None, None) => terminal.then_some(SecretSource::Terminal),
    }
}

/// The new root of `keyring reseal`. Unset PKCS#11 flags are taken from the current root when
/// both are pkcs11 (so an HSM key rotation names only `--new-pkcs11-key`); a passphrase is
/// never inherited.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "New root of trust")]
pub struct NewSealArgs {
    /// Re-seal under this root.
    #[arg(long, value_enum)]
    new_seal: SealMethod,
    /// PKCS#11 module of the new root.
    #[arg(long, value_name = "PATH")]
    new_pkcs11_module: Option<PathBuf>,
    /// Token label of the new root.
    #[arg(long, conflicts_with = "new_pkcs11_slot")]
    new_pkcs11_token: Option<String>,
    /// Slot number of the new root.
    #[arg(long)]
    new_pkcs11_slot: Option<u64>,
    /// Label of the new root key.
    #[arg(long, value_name = "LABEL")]
    new_pkcs11_key: Option<String>,
    /// File holding the new token's user PIN.
    #[arg(long, value_name = "PATH")]
    new_pkcs11_pin_file: Option<PathBuf>,
    /// Environment variable holding the new token's user PIN.
    #[arg(long, value_name = "VAR", conflicts_with = "new_pkcs11_pin_file")]
    new_pkcs11_pin_env: Option<String>,
    /// Sealing mechanism of the new root.
    #[arg(long, value_enum, default_value = "auto")]
    new_pkcs11_mechanism: MechanismArg,
    /// File holding the new passphrase [default: ask on the terminal].
    #[arg(long, value_name = "PATH")]
    new_passphrase_file: Option<PathBuf>,
    /// Environment variable holding the new passphrase.
    #[arg(long, value_name = "VAR", conflicts_with = "new_passphrase_file")]
    new_passphrase_env: Option<String>,
}

impl NewSealArgs {
    fn root(&self, current: &SealArgs) -> Result<RootKeyConfig> {
        Ok(match self.new_seal {
            SealMethod::Pkcs11 => {
                let inherit = current.seal == Some(SealMethod::Pkcs11);
                let pick = |new: &Option<String>, old: &Option<String>| {
                    new.clone().or_else(|| old.clone().filter(|_| inherit))
                };
                let pin = secret_source(&self.new_pkcs11_pin_file, &self.new_pkcs11_pin_env, false)
                    .or_else(|| {
                        secret_source(&current.pkcs11_pin_file, &current.pkcs11_pin_env, false)
                            .filter(|_| inherit)
                    });
                RootKeyConfig::Pkcs11(Pkcs11Config {
                    module: self
                        .new_pkcs11_module
                        .clone()
                        .or_else(|| current.pkcs11_module.clone().filter(|_| inherit)),
                    token: pick(&self.new_pkcs11_token, &current.pkcs11_token),
                    slot: self
                        .new_pkcs11_slot
                        .or(current.pkcs11_slot.filter(|_| inherit)),
                    key: pick(&self.new_pkcs11_key, &current.pkcs11_key),
                    pin,
                    mechanism: self.new_pkcs11_mechanism.choice(),
                })
            }
            SealMethod::Passphrase => RootKeyConfig::Passphrase {
                source: secret_source(&self.new_passphrase_file, &self.new_passphrase_env, true)
                    .ok_or_else(|| Error::internal("passphrase source"))?,
                m_kib: current.argon2_m_kib,
                t: current.argon2_t,
                p: current.argon2_p,
            },
        })
    }
}

/// `keyring` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyringCommand {
    /// Show whether the keyring file is sealed, and under what (opens nothing).
    Status(StatusArgs),
    /// Generate the AES-256 root key in a PKCS#11 token: sensitive, never extractable.
    InitHsmKey(InitHsmKeyArgs),
    /// Seal a plain keyring under --seal pkcs11|passphrase.
    Seal(SealCommandArgs),
    /// Re-seal a sealed keyring under a new root (--new-seal …): a new HSM key, a new
    /// passphrase, or the other method.
    Reseal(ResealArgs),
    /// Write the keyring in plain text to a file, for an export-controlled migration
    /// (audited; never to a terminal). The keyring file stays sealed.
    Unseal(UnsealArgs),
}

/// Arguments of `keyring status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `keyring init-hsm-key` (`--seal pkcs11` and its flags name the new key).
#[derive(Debug, Args)]
pub struct InitHsmKeyArgs {
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `keyring seal`.
#[derive(Debug, Args)]
pub struct SealCommandArgs {
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `keyring reseal` (`--seal …` opens the keyring, `--new-seal …` re-seals it).
#[derive(Debug, Args)]
pub struct ResealArgs {
    #[command(flatten)]
    data: DataDirArgs,
    #[command(flatten)]
    new: NewSealArgs,
}

/// Arguments of `keyring unseal`.
#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// Write the plain keyring here (a new 0600 file), or `-` for stdout when it is not a
    /// terminal.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Confirms that the plain keyring leaves the root of trust for an export-controlled
    /// migration.
    #[arg(long, required = true)]
    export_controlled: bool,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Runs a `keyring` subcommand.
pub fn run(command: KeyringCommand) -> Result<ExitCode> {
    match command {
        KeyringCommand::Status(args) => status(&args.data),
        KeyringCommand::InitHsmKey(args) => init_hsm_key(&args.data),
        KeyringCommand::Seal(args) => seal_plain(&args.data),
        KeyringCommand::Reseal(args) => reseal(&args.data, &args.new),
        KeyringCommand::Unseal(args) => unseal(&args),
    }?;
    Ok(ExitCode::SUCCESS)
}

fn keyring_path(data: &DataDirArgs) -> Result<PathBuf> {
    data.master_keys()
        .keyring_file()
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            Error::InvalidArgument(
                "keyring commands work on a keyring file, not on --master-key-env".into(),
            )
        })
}

/// Reads a sealed keyring file (ciphertext and header only: never used for a plain one).
fn read_file(path: &Path) -> Result<String> {
    fsutil::check_private(path)?;
    std::fs::read_to_string(path)
        .map_err(|e| Error::FailedPrecondition(format!("cannot read {}: {e}", path.display())))
}

/// The audit log of the data directory, opened through `source` (which must open the
/// keyring: the audit chain key hangs off the master keys).
fn open_audit(data: &DataDirArgs, source: MasterKeySource) -> Result<AuditWriter> {
    let mut options = data.options();
    options.master_keys = source;
    let dir = DataDir::open(&options, false)?;
    dir.audit_writer(&options)
}

fn append(audit: AuditWriter, operation: Task, outcome: Outcome, detail: String) -> Result<()> {
    let result = audit.append_blocking(cli_record(operation, "", Vec::new(), outcome, detail));
    audit.shutdown();
    result.map(|_| ())
}

/// Audits a failed step (best effort: the step's own error is what the operator needs) and
/// passes the error on.
fn failed<T>(audit: AuditWriter, operation: Task, error: Error) -> Result<T> {
    let _ = append(
        audit,
        operation,
        crate::service::status::outcome(&error),
        error.to_string(),
    );
    Err(error)
}

fn status(data: &DataDirArgs) -> Result<()> {
    let path = keyring_path(data)?;
    fsutil::check_private(&path)?;
    // A plain keyring is not read into memory here: it is secret text.
    let state = if seal::is_sealed_file(&path) {
        seal::describe(&read_file(&path)?)?
    } else {
        "NOT sealed: plain text; seal it with `tenant-kms keyring seal --seal pkcs11|passphrase`"
            .into()
    };
    println!("{}: {state}", path.display());
    Ok(())
}

fn init_hsm_key(data: &DataDirArgs) -> Result<()> {
    let Some(RootKeyConfig::Pkcs11(config)) = data.seal.root() else {
        return Err(Error::InvalidArgument(
            "init-hsm-key needs --seal pkcs11 and the --pkcs11-* flags of the key to create".into(),
        ));
    };
    // Audited in the data directory when there is one. Its keyring is opened as it is: plain,
    // or sealed under the key its header names (same module and PIN), since the key being
    // created cannot open anything yet.
    let audit = if data.data_dir.join(KEYS_DB).exists() {
        let path = keyring_path(data)?;
        let source = if seal::is_sealed_file(&path) {
            MasterKeySource::Sealed(SealedKeyring {
                path,
                root: Arc::new(RootKey::new(RootKeyConfig::Pkcs11(Pkcs11Config {
                    token: None,
                    slot: None,
                    key: None,
                    ..config.clone()
                }))),
            })
        } else {
            MasterKeySource::File(path)
        };
        Some(open_audit(data, source)?)
    } else {
        eprintln!(
            "note: {} holds no data directory yet, so this key creation is not audited there",
            data.data_dir.display()
        );
        None
    };
    let key = config.key.clone().unwrap_or_default();
    match pkcs11::generate_root_key(&config) {
        Ok(token) => {
            let detail = format!(
                "generated AES-256 root key '{key}' in token '{token}' (sensitive, not extractable)"
            );
            eprintln!("{detail}");
            match audit {
                Some(audit) => append(audit, Task::CreateRootKey, Outcome::Ok, detail),
                None => Ok(()),
            }
        }
        Err(e) => match audit {
            Some(audit) => failed(audit, Task::CreateRootKey, e),
            None => Err(e),
        },
    }
}

/// Seals `plaintext` under `root`, proves the result opens (with the file key just made),
/// and replaces the keyring file with it.
fn seal_and_replace(root: &RootKey, plaintext: &[u8], path: &Path) -> Result<String> {
    let sealed = root.seal_new(plaintext)?;
    let reopened = root.unseal(&sealed)?;
    if reopened.as_slice() != plaintext {
        return Err(Error::internal(
            "the sealed keyring does not open to the same keys",
        ));
    }
    replace_private_file(path, sealed.as_bytes())?;
    seal::describe(&sealed)
}

fn seal_plain(data: &DataDirArgs) -> Result<()> {
    let root = data.seal.root().ok_or_else(|| {
        Error::InvalidArgument("keyring seal needs --seal pkcs11|passphrase and its flags".into())
    })?;
    let path = keyring_path(data)?;
    let plain = MasterKeySource::File(path.clone());
    // Refuses a keyring that is already sealed (use reseal) or missing.
    let keyring = MasterKeyring::load(&plain, false)?;
    let audit = open_audit(data, plain)?;
    let root = RootKey::new(root);
    match seal_and_replace(&root, keyring.to_file_text().as_bytes(), &path) {
        Ok(how) => {
            let detail = format!("sealed the master keyring {}: {how}", path.display());
            eprintln!("{detail}");
            append(audit, Task::SealKeyring, Outcome::Ok, detail)
        }
        Err(e) => failed(audit, Task::SealKeyring, e),
    }
}

/// The current sealed keyring named by the flags.
fn current_sealed(data: &DataDirArgs) -> Result<SealedKeyring> {
    match data.master_keys() {
        MasterKeySource::Sealed(sealed) => Ok(sealed),
        _ => Err(Error::InvalidArgument(
            "name the current root with --seal pkcs11|passphrase and its flags".into(),
        )),
    }
}

fn reseal(data: &DataDirArgs, new: &NewSealArgs) -> Result<()> {
    let current = current_sealed(data)?;
    let mut new_root = new.root(&data.seal)?;
    // Opens the keyring through the current root first, which refuses a plain file.
    let audit = open_audit(data, MasterKeySource::Sealed(current.clone()))?;
    let before = read_file(&current.path)?;
    // Same token by default: the label the keyring was sealed with, when no flag names one.
    if let (RootKeyConfig::Pkcs11(config), (header, _, _)) =
        (&mut new_root, seal::header::parse(&before)?)
        && let seal::header::RootParams::Pkcs11(old) = header.root
        && config.token.is_none()
        && config.slot.is_none()
        && data.seal.seal == Some(SealMethod::Pkcs11)
    {
        config.token = Some(old.token);
    }
    let from = seal::describe(&before)?;
    let result = current
        .root
        .unseal(&before)
        .and_then(|plaintext| seal_and_replace(&RootKey::new(new_root), &plaintext, &current.path));
    match result {
        Ok(to) => {
            let detail = format!(
                "re-sealed the master keyring {}: from {} to {}",
                current.path.display(),
                from.trim_start_matches("sealed: "),
                to.trim_start_matches("sealed: ")
            );
            eprintln!("{detail}");
            append(audit, Task::ResealKeyring, Outcome::Ok, detail)
        }
        Err(e) => failed(audit, Task::ResealKeyring, e),
    }
}

fn unseal(args: &UnsealArgs) -> Result<()> {
    let current = current_sealed(&args.data)?;
    let to_stdout = args.out.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        return Err(Error::FailedPrecondition(
            "refusing to write the plain keyring to a terminal: redirect stdout or use --out FILE"
                .into(),
        ));
    }
    let audit = open_audit(&args.data, MasterKeySource::Sealed(current.clone()))?;
    let result = read_file(&current.path)
        .and_then(|file| current.root.unseal(&file))
        .and_then(|plaintext| {
            if to_stdout {
                let mut out = std::io::stdout().lock();
                out.write_all(&plaintext)
                    .and_then(|()| out.flush())
                    .map_err(|e| Error::Internal(format!("cannot write stdout: {e}")))
            } else {
                write_plain(&args.out, &plaintext)
            }
        });
    match result {
        Ok(()) => {
            let detail = format!(
                "wrote the plain master keyring of {} to {} (export-controlled migration; {} \
                 stays sealed)",
                current.path.display(),
                if to_stdout {
                    "stdout".into()
                } else {
                    args.out.display().to_string()
                },
                current.path.display()
            );
            eprintln!("{detail}");
            append(audit, Task::UnsealKeyring, Outcome::Ok, detail)
        }
        Err(e) => failed(audit, Task::UnsealKeyring, e),
    }
}

/// Writes the plain keyring to a new 0600 file, refusing a path that is a terminal.
fn write_plain(path: &Path, plaintext: &[u8]) -> Result<()> {
    if let Ok(existing) = std::fs::OpenOptions::new().write(true).open(path)
        && existing.is_terminal()
    {
        return Err(Error::FailedPrecondition(format!(
            "refusing to write the plain keyring to the terminal {}",
            path.display()
        )));
    }
    fsutil::write_private_file(path, plaintext)
}
