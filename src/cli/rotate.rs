//! `tenant-kms rotate`: the key-rotation command, for operators and cron. Works on a data
//! directory whether or not a server runs on it (every write is a transaction, and a running
//! server notices the change on its next call). Every change is audited as `cli:<user>`.
//!
//! Exit codes: 0 all done (or nothing to do), 1 something failed (each failure named).

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::common::{DataDirArgs, cli_record};
use crate::audit::{AuditWriter, Outcome};
use crate::domain::{TenantId, unix_now};
use crate::error::{Error, Result};
use crate::keys::MasterKeySource;
use crate::keys::{KeyManager, MasterKeyring};
use crate::service::state::DataDir;

/// Flags of `rotate`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["tenant", "due", "master"])))]
pub struct RotateArgs {
    /// Rotate this tenant's key (new primary version).
    #[arg(long)]
    tenant: Option<String>,
    /// Rotate every tenant due under its policy or nonce budget, and destroy tenants whose
    /// deletion window has passed.
    #[arg(long)]
    due: bool,
    /// Create a new master-key version and re-wrap every tenant key under it (resumable: run
    /// again after an interruption and it finishes the re-wrap).
    #[arg(long)]
    master: bool,
    /// Show what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Tenant keys re-wrapped per transaction with --master.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    #[command(flatten)]
    data: DataDirArgs,
}

/// One action of a run.
#[derive(Debug, Serialize)]
struct Action {
    action: &'static str,
    target: String,
    result: String,
    ok: bool,
}

/// The summary printed at the end.
#[derive(Debug, Default, Serialize)]
struct Summary {
    dry_run: bool,
    actions: Vec<Action>,
    failures: usize,
}

impl Summary {
    fn push(&mut self, action: &'static str, target: &str, result: Result<String>) {
        let (ok, result) = match result {
            Ok(text) => (true, text),
            Err(e) => (false, e.to_string()),
        };
        if !ok {
            self.failures += 1;
        }
        self.actions.push(Action {
            action,
            target: target.to_owned(),
            result,
            ok,
        });
    }

    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).unwrap_or_default());
            return;
        }
        println!("{:<10} {:<40} {:<6} RESULT", "ACTION", "TARGET", "OK");
        for a in &self.actions {
            println!(
                "{:<10} {:<40} {:<6} {}",
                a.action,
                a.target,
                if a.ok { "yes" } else { "NO" },
                a.result
            );
        }
        println!(
            "{} action(s), {} failure(s){}",
            self.actions.len(),
            self.failures,
            if self.dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        );
    }
}

fn audited<T>(
    audit: &AuditWriter,
    operation: &str,
    tenant: &str,
    result: Result<T>,
    versions: impl Fn(&T) -> Vec<u32>,
) -> Result<T> {
    let (outcome, detail, versions) = match &result {
        Ok(value) => (Outcome::Ok, String::new(), versions(value)),
        Err(e) => (
            crate::service::status::outcome(e),
            e.to_string(),
            Vec::new(),
        ),
    };
    audit.append_blocking(cli_record(operation, tenant, versions, outcome, detail))?;
    result
}

/// Runs `rotate`.
pub fn run(args: RotateArgs) -> Result<ExitCode> {
    let options = args.data.options();
    let mut summary = Summary {
        dry_run: args.dry_run,
        ..Summary::default()
    };
    if args.master {
        rotate_master(&args, &mut summary)?;
    } else {
        let dir = DataDir::open(&options, false)?;
        let audit = dir.audit_writer(&options)?;
        if let Some(tenant) = &args.tenant {
            let id = TenantId::parse(tenant)?;
            if args.dry_run {
                summary.push("rotate", tenant, Ok("would rotate".into()));
            } else {
                let result = audited(
                    &audit,
                    "RotateTenantKey",
                    tenant,
                    dir.keys.rotate(&id),
                    |t| vec![t.primary_version],
                );
                summary.push(
                    "rotate",
                    tenant,
                    result.map(|t| format!("primary is now v{}", t.primary_version)),
                );
            }
        }
        if args.due {
            rotate_due(&dir.keys, &audit, args.dry_run, &mut summary)?;
        }
        audit.shutdown();
    }
    summary.print(args.json);
    Ok(if summary.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

/// The share of a nonce budget at which `--due` rotates ahead of the automatic rotation.
const BUDGET_MARGIN: f64 = 0.1;

fn rotate_due(
    keys: &KeyManager,
    audit: &AuditWriter,
    dry_run: bool,
    summary: &mut Summary,
) -> Result<()> {
    let due = keys.store().tenants_due(unix_now(), BUDGET_MARGIN)?;
    for id in &due.rotate {
        if dry_run {
            summary.push("rotate", id.as_str(), Ok("due: would rotate".into()));
            continue;
        }
        let result = audited(
            audit,
            "RotateTenantKey",
            id.as_str(),
            keys.rotate(id),
            |t| vec![t.primary_version],
        );
        summary.push(
            "rotate",
            id.as_str(),
            result.map(|t| format!("primary is now v{}", t.primary_version)),
        );
    }
    for id in &due.destroy {
        if dry_run {
            summary.push(
                "destroy",
                id.as_str(),
                Ok("deletion window passed: would destroy".into()),
            );
            continue;
        }
        let result = audited(
            audit,
            "DestroyTenant",
            id.as_str(),
            keys.destroy_tenant(id),
            |_| Vec::new(),
        );
        summary.push("destroy", id.as_str(), result.map(|_| "destroyed".into()));
    }
    Ok(())
}

fn rotate_master(args: &RotateArgs, summary: &mut Summary) -> Result<()> {
    let options = args.data.options();
    let dir = DataDir::open(&options, false)?;
    let pending = dir.keys.keys_off_primary()?;
    if args.dry_run {
        let text = if pending > 0 {
            format!(
                "would finish re-wrapping {pending} key(s) under master v{}",
                dir.keys.primary_master_version()
            )
        } else {
            format!(
                "would create master v{} and re-wrap every key under it",
                dir.keys.primary_master_version() + 1
            )
        };
        summary.push("master", "keyring", Ok(text));
        return Ok(());
    }
    let dir = if pending > 0 {
        eprintln!("resuming: {pending} key(s) still wrapped under an older master version");
        dir
    } else {
        match &options.master_keys {
            MasterKeySource::File(path) => {
                let version = MasterKeyring::add_version_to_file(path)?;
                eprintln!("created master key version {version} in {}", path.display());
            }
            MasterKeySource::Env(var) => {
                return Err(Error::FailedPrecondition(format!(
                    "every key is already under the newest master version; with keys from \
                     {var}, add a new version there first, then run rotate --master again"
                )));
            }
        }
        drop(dir);
        DataDir::open(&options, false)?
    };
    let audit = dir.audit_writer(&options)?;
    let started = std::time::Instant::now();
    let result = dir.keys.rewrap_to_primary(args.batch, |done| {
        if done % 10_000 < args.batch as u64 {
            eprintln!("re-wrapped {done} key(s)");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let result = audited(&audit, "RotateMasterKey", "", result, |s| {
        vec![s.primary_master_version]
    });
    summary.push(
        "master",
        "keyring",
        result.map(|s| {
            format!(
                "all keys under master v{}; re-wrapped {} in {:.2}s ({:.0}/s); retired {:?}",
                s.primary_master_version,
                s.rewrapped,
                elapsed,
                s.rewrapped as f64 / elapsed.max(1e-9),
                s.retired
            )
        }),
    );
    audit.shutdown();
    Ok(())
}
