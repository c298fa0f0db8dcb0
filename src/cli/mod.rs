//! The `tenant-kms` command line: one module per subcommand. Output meant for scripts goes to
//! stdout, messages to stderr. Exit codes: 0 success, 1 failure (named on stderr), 2 usage.

pub mod audit;
pub mod backup;
pub mod client;
pub mod common;
pub mod drill;
pub mod index;
pub mod keyring;
pub mod rotate;
pub mod selftest;
pub mod serve;
pub mod token;
pub mod usage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a failed command.
pub const EXIT_FAILURE: u8 = 1;

/// tenant-kms: per-tenant envelope encryption and key management over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tenant-kms", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (defaults: data in ./data, listening on 127.0.0.1:50051).
    Serve(serve::ServeArgs),
    /// Manage tenants through a running server.
    #[command(subcommand)]
    Tenant(client::TenantCommand),
    /// Encrypt stdin for a tenant through a running server; prints base64 ciphertext.
    Encrypt(client::EncryptArgs),
    /// Decrypt base64 ciphertext from stdin through a running server; prints the plaintext.
    Decrypt(client::DecryptArgs),
    /// Rotate tenant keys or the master key on a data directory (cron-friendly).
    Rotate(rotate::RotateArgs),
    /// Verify, export or prune the audit log of a data directory.
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
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Tenant(cmd) => client::run_tenant(cmd),
        Command::Encrypt(args) => client::run_encrypt(args),
        Command::Decrypt(args) => client::run_decrypt(args),
        Command::Rotate(args) => rotate::run(args),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Token(cmd) => token::run(cmd),
        Command::Backup(args) => backup::run_backup(args),
        Command::Restore(args) => backup::run_restore(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Keyring(cmd) => keyring::run(cmd),
        Command::Index(cmd) => index::run(cmd),
        Command::Drill(args) => drill::run(args),
        Command::Usage(args) => usage::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!, which panics (exit 101) when stderr is a closed pipe.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("tenant-kms: {e}\n"),
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
