//! `tenant-kms token create|list|revoke|quarantine|release|contain`: caller tokens on a data
//! directory (a running server sees a change at its next call). `create` prints
//! the token alone on stdout (so `TOKEN=$(tenant-kms token create …)` works); everything else
//! goes to stderr. Only hashes are stored.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::common::{DataDirArgs, cli_caller, cli_record};
use crate::audit::Outcome;
use crate::audit::operation::Task;
use crate::auth::{DATA_PERMISSIONS, Role, TokenSpec, issue_token};
use crate::config::parse_duration_seconds;
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::service::state::DataDir;

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once.
    Create(CreateArgs),
    /// List tokens (never their secrets).
    List(ListArgs),
    /// Revoke a token by id; takes effect on the next call, in every process.
    Revoke(RevokeArgs),
    /// Quarantine a token by id: refused PERMISSION_DENIED until released (suspected misuse).
    Quarantine(RevokeArgs),
    /// Release a quarantined token.
    Release(RevokeArgs),
    /// Quarantine a token and suspend every ACTIVE tenant it may act for, in one step; prints
    /// what it did (JSON on stdout). Undo with `token release` and `tenant resume`.
    Contain(RevokeArgs),
}

/// Arguments of `token create`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").args(["tenants", "all_tenants"])))]
pub struct CreateArgs {
    /// admin, service or auditor.
    #[arg(long)]
    role: String,
    /// Comma-separated tenants the token may act for.
    #[arg(long)]
    tenants: Option<String>,
    /// Every tenant.
    #[arg(long)]
    all_tenants: bool,
    /// Limit a service token to these operations (encrypt, decrypt, generate-data-key,
    /// decrypt-data-key, rewrap, generate-data-key-without-plaintext).
    #[arg(long)]
    operations: Option<String>,
    /// Lifetime, e.g. 30d (default: no expiry).
    #[arg(long)]
    ttl: Option<String>,
    /// A name to recognise it by.
    #[arg(long, default_value = "")]
    name: String,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `token list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `token revoke`, `quarantine`, `release` and `contain`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token id (from `token list`).
    id: String,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Runs a `token` subcommand.
pub fn run(command: TokenCommand) -> Result<ExitCode> {
    match command {
        TokenCommand::Create(args) => {
            let role = Role::parse(&args.role).ok_or_else(|| {
                Error::InvalidArgument("--role must be admin, service or auditor".into())
            })?;
            let tenants = match (&args.tenants, args.all_tenants) {
                (_, true) => "*".to_owned(),
                (Some(list), false) => {
                    let ids: Vec<String> = list
                        .split(',')
                        .map(|t| TenantId::parse(t.trim()).map(|t| t.as_str().to_owned()))
                        .collect::<Result<_>>()?;
                    ids.join(",")
                }
                (None, false) => {
                    return Err(Error::InvalidArgument(
                        "name the tenants with --tenants a,b or --all-tenants".into(),
                    ));
                }
            };
            let operations = match &args.operations {
                None => "*".to_owned(),
                Some(_) if role != Role::Service => {
                    return Err(Error::InvalidArgument(
                        "--operations applies to service tokens only".into(),
                    ));
                }
                Some(list) => {
                    for op in list.split(',') {
                        if !DATA_PERMISSIONS.contains(&op.trim()) {
                            return Err(Error::InvalidArgument(format!(
                                "unknown operation '{op}' (known: {})",
                                DATA_PERMISSIONS.join(", ")
                            )));
                        }
                    }
                    list.split(',').map(str::trim).collect::<Vec<_>>().join(",")
                }
            };
            let ttl_seconds = args
                .ttl
                .as_deref()
                .map(parse_duration_seconds)
                .transpose()?;
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let issued = issue_token(
                dir.store.as_ref(),
                &TokenSpec {
                    name: args.name,
                    role,
                    tenants,
                    operations,
                    ttl_seconds,
                },
                options.clock.as_ref(),
            )?;
            let audit = dir.audit_writer(&options)?;
            audit.append_blocking(cli_record(
                Task::TokenCreate,
                "",
                Vec::new(),
                Outcome::Ok,
                format!("token {} role {}", issued.record.id, issued.record.role),
            ))?;
            audit.shutdown();
            eprintln!(
                "created token {} (role {}, tenants {}); it is shown only once",
                issued.record.id, issued.record.role, issued.record.tenants
            );
            println!("{}", issued.secret.as_str());
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List(args) => {
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let now = options.clock.now_unix();
            for t in dir.store.list_tokens()? {
                let status = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.quarantined_at.is_some() {
                    "quarantined"
                } else if t.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{}",
                    serde_json::json!({
                        "id": t.id, "name": t.name, "role": t.role, "tenants": t.tenants,
                        "operations": t.operations, "created_at": t.created_at,
                        "expires_at": t.expires_at, "status": status,
                    })
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Quarantine(args) => quarantine(&args, true),
        TokenCommand::Release(args) => quarantine(&args, false),
        TokenCommand::Contain(args) => {
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let (done, records) =
                crate::service::containment::contain(&dir.keys, &args.id, &cli_caller())?;
            let audit = dir.audit_writer(&options)?;
            for record in records {
                audit.append_blocking(record)?;
            }
            audit.shutdown();
            eprintln!(
                "token {} {}; {} tenant(s) suspended, {} left as they were",
                args.id,
                if done.quarantined {
                    "quarantined"
                } else {
                    "was already quarantined"
                },
                done.suspended.len(),
                done.left.len()
            );
            println!(
                "{}",
                serde_json::json!({
                    "token": args.id,
                    "quarantined": done.quarantined,
                    "suspended": done.suspended,
                    "left": done.left.iter()
                        .map(|(t, s)| serde_json::json!({"tenant": t, "state": s}))
                        .collect::<Vec<_>>(),
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke(args) => {
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let revoked = dir.store.revoke_token(&args.id, options.clock.now_unix())?;
            let audit = dir.audit_writer(&options)?;
            audit.append_blocking(cli_record(
                Task::TokenRevoke,
                "",
                Vec::new(),
                if revoked {
                    Outcome::Ok
                } else {
                    Outcome::NotFound
                },
                format!("token {}", args.id),
            ))?;
            audit.shutdown();
            if revoked {
                eprintln!("revoked token {}", args.id);
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no active token with id {}", args.id);
                Ok(ExitCode::from(super::EXIT_FAILURE))
            }
        }
    }
}

/// `token quarantine` (`on`) or `token release`.
fn quarantine(args: &RevokeArgs, on: bool) -> Result<ExitCode> {
    let options = args.data.options();
    let dir = DataDir::open(&options, false)?;
    let (changed, record) = crate::service::containment::set_quarantine(
        &dir.keys,
        &args.id,
        on,
        &cli_caller(),
        "by an operator",
    )?;
    let audit = dir.audit_writer(&options)?;
    audit.append_blocking(record)?;
    audit.shutdown();
    let verb = if on { "quarantined" } else { "released" };
    if changed {
        eprintln!("token {} {verb}", args.id);
    } else {
        eprintln!("token {} was already {verb}", args.id);
    }
    Ok(ExitCode::SUCCESS)
}
