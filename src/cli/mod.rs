//! The `tenant-kms` command line: one module per subcommand. Output meant for scripts goes to
//! stdout, messages to stderr. Exit codes: 0 success, 1 failure (named on stderr), 2 usage
//! (a bad flag or value, or unusable input for a client command).

pub mod audit;
pub mod audit_client;
pub mod backup;
pub mod client;
pub mod common;
pub mod crypt;
pub mod docs;
pub mod drill;
pub mod index;
pub mod json;
pub mod keyring;
pub mod migrate_store;
pub mod rotate;
pub mod selftest;
pub mod serve;
pub mod tenant;
pub mod token;
pub mod usage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::Error;

/// Exit code for a failed command.
pub const EXIT_FAILURE: u8 = 1;

/// Exit code for a usage error: a bad flag, a bad value, unusable input (what clap exits
/// with for the errors it finds itself).
pub const EXIT_USAGE: u8 = 2;

/// tenant-kms: per-tenant envelope encryption and key management over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tenant-kms", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the service (defaults: data in ./data, listening on 127.0.0.1:50051).
    Serve(serve::ServeArgs),
    /// Manage tenants, key versions and rotation policies through a running server.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Encrypt stdin for a tenant through a running server; prints base64 ciphertext.
    Encrypt(crypt::EncryptArgs),
    /// Decrypt base64 ciphertext from stdin through a running server; prints the plaintext.
    Decrypt(crypt::DecryptArgs),
    /// Re-seal a base64 ciphertext from stdin under the tenant's primary key version; the
    /// plaintext never leaves the server.
    Rewrap(crypt::RewrapArgs),
    /// Encrypt JSON lines from stdin ({"context":…,"plaintext":"<base64>","aad":"<base64>"});
    /// one result line per input line; exit 1 if any item failed.
    EncryptBatch(crypt::EncryptBatchArgs),
    /// Decrypt JSON lines from stdin ({"context":…,"ciphertext":"<base64>","aad":"<base64>"});
    /// one result line per input line; exit 1 if any item failed.
    DecryptBatch(crypt::BatchArgs),
    /// Rewrap JSON lines from stdin ({"context":…,"ciphertext":"<base64>","aad":"<base64>"});
    /// one result line per input line; exit 1 if any item failed.
    RewrapBatch(crypt::BatchArgs),
    /// Generate or unwrap data keys for envelope encryption through a running server.
    #[command(subcommand)]
    Datakey(crypt::DataKeyCommand),
    /// Rotate tenant keys or the master key on a data directory (cron-friendly).
    Rotate(rotate::RotateArgs),
    /// Verify, export or prune the audit log of a data directory, or list and verify it
    /// through a running server.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Create, list and revoke caller tokens on a data directory.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Back up keys.db and audit.db consistently while the server runs (`backup --out DIR`),
    /// or check a backup (`backup verify DIR`).
    Backup(backup::BackupArgs),
    /// Restore a full backup into a data directory (the server stopped).
    Restore(backup::RestoreArgs),
    /// Copy a data directory's store and audit log into an empty PostgreSQL database, all or
    /// nothing (`migrate-store --from ./data --to postgres://…`; the server stopped).
    MigrateStore(migrate_store::MigrateStoreArgs),
    /// Seal the master keyring under a root of trust (PKCS#11 HSM or passphrase), re-seal,
    /// unseal for migration, or show its state.
    #[command(subcommand)]
    Keyring(keyring::KeyringCommand),
    /// Run the cryptographic self-tests (known answers, Wycheproof, wire-format vectors).
    Selftest(selftest::SelftestArgs),
    /// Declare, list and compute blind indexes (searchable columns) through a running server.
    #[command(subcommand)]
    Index(index::IndexCommand),
    /// Run a breach drill (cross-tenant access, moved ciphertexts, dead tokens, enumeration,
    /// a decrypt spike) against a child server or --addr; exit 0 only if every attack was
    /// blocked and detected.
    Drill(drill::DrillArgs),
    /// A tenant's usage over a time range, per caller, operation and outcome, through a
    /// running server (`GetUsage`).
    Usage(usage::UsageArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff) to stdout, or write one page per command into a directory.
    Man(docs::ManArgs),
}

impl Command {
    /// The client flags of a command that talks to a running server: for such a command,
    /// a flag or input found unusable before any call is made is a usage error.
    fn client(&self) -> Option<&client::ClientArgs> {
        match self {
            Command::Tenant(cmd) => cmd.client(),
            Command::Encrypt(a) => Some(a.client()),
            Command::Decrypt(a) => Some(a.client()),
            Command::Rewrap(a) => Some(a.client()),
            Command::EncryptBatch(a) => Some(a.client()),
            Command::DecryptBatch(a) | Command::RewrapBatch(a) => Some(a.client()),
            Command::Datakey(cmd) => Some(cmd.client()),
            Command::Index(cmd) => Some(cmd.client()),
            Command::Audit(audit::AuditCommand::List(a)) => Some(&a.client),
            Command::Audit(audit::AuditCommand::VerifyChain(c)) => Some(c),
            _ => None,
        }
    }
}

/// Each RPC of the protos and the command that calls it (words, then flags that select it).
/// `tests/integration/cli.rs` checks this against the protos and the clap definitions both ways, so a
/// new RPC without a command fails the build's tests.
pub const RPC_COMMANDS: &[(&str, &str)] = &[
    ("KeyService/Encrypt", "encrypt"),
    ("KeyService/Decrypt", "decrypt"),
    ("KeyService/EncryptBatch", "encrypt-batch"),
    ("KeyService/DecryptBatch", "decrypt-batch"),
    ("KeyService/GenerateDataKey", "datakey generate"),
    ("KeyService/DecryptDataKey", "datakey decrypt"),
    ("KeyService/Rewrap", "rewrap"),
    ("KeyService/RewrapBatch", "rewrap-batch"),
    (
        "KeyService/GenerateDataKeyWithoutPlaintext",
        "datakey generate --without-plaintext",
    ),
    ("KeyService/ComputeBlindIndex", "index compute"),
    ("TenantService/CreateTenant", "tenant create"),
    ("TenantService/GetTenant", "tenant get"),
    ("TenantService/ListTenants", "tenant list"),
    ("TenantService/RotateTenantKey", "tenant rotate"),
    ("TenantService/ListKeyVersions", "tenant versions"),
    ("TenantService/DisableKeyVersion", "tenant disable-version"),
    ("TenantService/EnableKeyVersion", "tenant enable-version"),
    ("TenantService/DestroyKeyVersion", "tenant destroy-version"),
    ("TenantService/SetRotationPolicy", "tenant set-policy"),
    ("TenantService/SuspendTenant", "tenant suspend"),
    ("TenantService/ResumeTenant", "tenant resume"),
    ("TenantService/ScheduleTenantDeletion", "tenant delete"),
    ("TenantService/CancelTenantDeletion", "tenant cancel-delete"),
    ("TenantService/DeclareBlindIndex", "index declare"),
    ("TenantService/ListBlindIndexes", "index list"),
    ("AuditService/ListAuditEvents", "audit list"),
    ("AuditService/VerifyAuditChain", "audit verify-chain"),
    ("AuditService/GetUsage", "usage"),
    ("TenantService/QuarantineToken", "token quarantine"),
    ("TenantService/ReleaseToken", "token release"),
    ("TenantService/ContainToken", "token contain"),
];

/// The clap definition of the whole command line (for completions, man pages and tests).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_client = cli.command.client().is_some();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Tenant(cmd) => tenant::run(cmd),
        Command::Encrypt(args) => crypt::run_encrypt(args),
        Command::Decrypt(args) => crypt::run_decrypt(args),
        Command::Rewrap(args) => crypt::run_rewrap(args),
        Command::EncryptBatch(args) => crypt::run_encrypt_batch(args),
        Command::DecryptBatch(args) => crypt::run_decrypt_batch(args),
        Command::RewrapBatch(args) => crypt::run_rewrap_batch(args),
        Command::Datakey(cmd) => crypt::run_datakey(cmd),
        Command::Rotate(args) => rotate::run(args),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Token(cmd) => token::run(cmd),
        Command::Backup(args) => backup::run_backup(args),
        Command::Restore(args) => backup::run_restore(args),
        Command::MigrateStore(args) => migrate_store::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Keyring(cmd) => keyring::run(cmd),
        Command::Index(cmd) => index::run(cmd),
        Command::Drill(args) => drill::run(args),
        Command::Usage(args) => usage::run(args),
        Command::Completions(args) => docs::run_completions(args),
        Command::Man(args) => docs::run_man(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A client command's own checks (flags, token, stdin) fail before any call with
            // InvalidArgument: a usage error. The server's refusals arrive as other kinds.
            let code = match &e {
                Error::InvalidArgument(_) if is_client => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
            // Not eprintln!, which panics (exit 101) when stderr is a closed pipe.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("tenant-kms: {e}\n"),
            );
            ExitCode::from(code)
        }
    }
}
