//! `tenant-kms rotate`: the key-rotation command, for operators and cron. Works on a data
//! directory whether or not a server runs on it (every write is a transaction, and a running
//! server notices the change on its next call). Every change is audited as `cli:<user>`.
//!
//! - `--tenant T`: a new primary version for T.
//! - `--due`: every tenant whose primary is older than its rotation period or near its nonce
//!   budget, and every tenant whose deletion window has passed (destroyed).
//! - `--master`: a new master-key version, then every wrapped key re-wrapped under it in
//!   batches (one transaction each); resumable; the old version is retired once no key uses it.
//!
//! Output: a summary table on stdout (`--json`: one JSON object, with the run's time and each
//! action's time and reason), progress on stderr.
//! Exit codes: 0 all done (or nothing to do), 1 something failed (each failure named in the
//! summary), 2 usage error.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::common::{DataDirArgs, cli_record};
use crate::audit::operation::{Rpc, Task};
use crate::audit::{AuditWriter, Operation, Outcome};
use crate::clock::SharedClock;
use crate::domain::TenantId;
use crate::domain::lifecycle;
use crate::error::{Error, Result};
use crate::keys::{KeyManager, MasterKeySource, MasterKeyring, RewrapSummary};
use crate::service::ServiceOptions;
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
    /// again after an interruption and it finishes the re-wrap and retires the old version).
    #[arg(long)]
    master: bool,
    /// Show what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Tenant keys re-wrapped per transaction with --master.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Pause between --master batches, e.g. 50ms, so a busy server sharing the data directory
    /// gets the store between them.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    batch_pause: Duration,
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
    /// When it was done (RFC 3339, the command's clock).
    time: String,
    /// Why it was done: what was due and by which rule, or the flag that asked for it.
    reason: String,
}

/// The summary printed at the end.
#[derive(Debug, Default, Serialize)]
struct Summary {
    /// When the run started (RFC 3339, the command's clock).
    time: String,
    dry_run: bool,
    actions: Vec<Action>,
    failures: usize,
    /// What `--master` did, for scripts.
    #[serde(skip_serializing_if = "Option::is_none")]
    master: Option<RewrapSummary>,
    /// The clock the times are read from (the process clock).
    #[serde(skip)]
    clock: Option<SharedClock>,
}

impl Summary {
    /// The clock's time in RFC 3339.
    fn now(&self) -> String {
        let micros = self
            .clock
            .as_ref()
            .map_or_else(|| crate::clock::system().now_micros(), |c| c.now_micros());
        let time = u64::try_from(micros)
            .map(|m| std::time::UNIX_EPOCH + Duration::from_micros(m))
            .unwrap_or(std::time::UNIX_EPOCH);
        humantime::format_rfc3339_seconds(time).to_string()
    }

    fn push(
        &mut self,
        action: &'static str,
        target: &str,
        reason: impl Into<String>,
        result: Result<String>,
    ) {
        let (ok, result) = match result {
            Ok(text) => (true, text),
            Err(e) => (false, e.to_string()),
        };
        if !ok {
            self.failures += 1;
        }
        let time = self.now();
        self.actions.push(Action {
            action,
            target: target.to_owned(),
            result,
            ok,
            time,
            reason: reason.into(),
        });
    }

    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).unwrap_or_default());
            return;
        }
        println!("{:<10} {:<40} {:<4} RESULT", "ACTION", "TARGET", "OK");
        for a in &self.actions {
            println!(
                "{:<10} {:<40} {:<4} {}",
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

/// Audits the outcome of one change (as `cli:<user>`) and passes the result on. A change
/// whose audit record cannot be written is reported as failed.
fn audited<T>(
    audit: &AuditWriter,
    operation: impl Into<Operation>,
    tenant: &str,
    result: Result<T>,
    versions: impl Fn(&T) -> Vec<u32>,
    detail: &str,
) -> Result<T> {
    let (outcome, detail, versions) = match &result {
        Ok(value) => (Outcome::Ok, detail.to_owned(), versions(value)),
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
        clock: Some(options.clock.clone()),
        ..Summary::default()
    };
    summary.time = summary.now();
    let result = if args.master {
        rotate_master(&args, &options, &mut summary)
    } else {
        rotate_tenants(&args, &options, &mut summary)
    };
    if let Err(e) = result {
        // Reported in the summary too, so `--json` output always parses.
        summary.push(
            "run",
            &options.data_dir.display().to_string(),
            "the run could not complete",
            Err(e),
        );
    }
    summary.print(args.json);
    for failure in summary.actions.iter().filter(|a| !a.ok) {
        eprintln!(
            "tenant-kms rotate: {} {} failed: {}",
            failure.action, failure.target, failure.result
        );
    }
    Ok(if summary.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

fn rotate_tenants(
    args: &RotateArgs,
    options: &ServiceOptions,
    summary: &mut Summary,
) -> Result<()> {
    let dir = DataDir::open(options, false)?;
    let audit = dir.audit_writer(options)?;
    if let Some(tenant) = &args.tenant {
        let result = TenantId::parse(tenant).and_then(|id| {
            if args.dry_run {
                preview_rotation(&dir.keys, &id)
            } else {
                audited(
                    &audit,
                    Rpc::RotateTenantKey,
                    id.as_str(),
                    dir.keys.rotate(&id),
                    |t| vec![t.primary_version],
                    "rotate --tenant",
                )
                .map(|t| format!("primary is now v{}", t.primary_version))
            }
        });
        summary.push("rotate", tenant, "requested with --tenant", result);
    }
    if args.due {
        rotate_due(&dir.keys, &audit, args.dry_run, summary)?;
    }
    audit.shutdown();
    Ok(())
}

/// What rotating `id` would do, or why it would fail.
fn preview_rotation(keys: &KeyManager, id: &TenantId) -> Result<String> {
    let tenant = keys.store().tenant(id)?.ok_or(Error::NotFound("tenant"))?;
    lifecycle::check_rotation(tenant.state, tenant.primary_version, tenant.primary_version)?;
    let next = lifecycle::next_version(keys.store().key_versions(id)?.iter().map(|v| v.version));
    Ok(format!(
        "would add v{next} as primary (now v{})",
        tenant.primary_version
    ))
}

/// The share of a nonce budget at which `--due` rotates ahead of the automatic rotation.
const BUDGET_MARGIN: f64 = crate::store::ROTATION_BUDGET_MARGIN;

fn rotate_due(
    keys: &KeyManager,
    audit: &AuditWriter,
    dry_run: bool,
    summary: &mut Summary,
) -> Result<()> {
    let due = keys
        .store()
        .tenants_due(keys.clock().now_unix(), BUDGET_MARGIN)?;
    for id in &due.rotate {
        let reason = due_reason(keys, id);
        if dry_run {
            summary.push(
                "rotate",
                id.as_str(),
                reason,
                Ok("due: would rotate".into()),
            );
            continue;
        }
        let result = audited(
            audit,
            Rpc::RotateTenantKey,
            id.as_str(),
            keys.rotate(id),
            |t| vec![t.primary_version],
            "rotate --due: rotation period or nonce budget",
        );
        summary.push(
            "rotate",
            id.as_str(),
            reason,
            result.map(|t| format!("primary is now v{}", t.primary_version)),
        );
    }
    for id in &due.destroy {
        let reason = deletion_reason(keys, id);
        if dry_run {
            summary.push(
                "destroy",
                id.as_str(),
                reason,
                Ok("deletion window passed: would destroy".into()),
            );
            continue;
        }
        let result = audited(
            audit,
            Task::DestroyTenant,
            id.as_str(),
            keys.destroy_tenant(id),
            |_| Vec::new(),
            "rotate --due: deletion window passed",
        );
        summary.push(
            "destroy",
            id.as_str(),
            reason,
            result.map(|_| "destroyed: key material shredded".into()),
        );
    }
    Ok(())
}

/// Why `id` is due for rotation, by the rule that made it due: the primary's age against
/// the rotation period, or its sealed values against the nonce budget.
fn due_reason(keys: &KeyManager, id: &TenantId) -> String {
    let Ok(Some(tenant)) = keys.store().tenant(id) else {
        return "due under its rotation policy".into();
    };
    let primary = keys
        .store()
        .key_versions(id)
        .ok()
        .and_then(|vs| vs.into_iter().find(|v| v.version == tenant.primary_version));
    let Some(primary) = primary else {
        return "due under its rotation policy".into();
    };
    let age = u64::try_from(keys.clock().now_unix() - primary.created_at).unwrap_or(0);
    let period = tenant.rotation_period_seconds;
    if period > 0 && age >= period {
        format!(
            "rotation period: primary v{} is {} old; the policy rotates every {}",
            primary.version,
            humantime::format_duration(Duration::from_secs(age)),
            humantime::format_duration(Duration::from_secs(period))
        )
    } else {
        format!(
            "nonce budget: primary v{} has sealed {} of its {} values; --due rotates at {}%",
            primary.version,
            primary.encryptions,
            tenant.max_encryptions,
            ((1.0 - BUDGET_MARGIN) * 100.0).round()
        )
    }
}

/// Why `id` is due for destruction: its deletion window has passed.
fn deletion_reason(keys: &KeyManager, id: &TenantId) -> String {
    let when = keys
        .store()
        .tenant(id)
        .ok()
        .flatten()
        .and_then(|t| t.deletion_time)
        .and_then(|t| u64::try_from(t).ok())
        .map(|t| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
                .to_string()
        })
        .unwrap_or_default();
    format!("deletion window passed at {when}")
}

/// An audit record of a master-key step (no tenant; the versions are master versions).
fn master_record(
    audit: &AuditWriter,
    operation: impl Into<Operation>,
    versions: Vec<u32>,
    items: u64,
    detail: String,
) -> Result<()> {
    let mut record = cli_record(operation, "", versions, Outcome::Ok, detail);
    record.item_count = u32::try_from(items).unwrap_or(u32::MAX);
    audit.append_blocking(record).map(|_| ())
}

fn rotate_master(args: &RotateArgs, options: &ServiceOptions, summary: &mut Summary) -> Result<()> {
    let dir = DataDir::open(options, false)?;
    let unfinished = dir.keys.unfinished_master_versions()?;
    let pending = dir.keys.keys_off_primary()?;
    let primary = dir.keys.primary_master_version();
    let resume = !unfinished.is_empty() || pending > 0;
    if args.dry_run {
        let text = if resume {
            format!(
                "would finish an interrupted rotation: re-wrap {pending} key(s) under master \
                 v{primary}, then retire {unfinished:?}"
            )
        } else {
            format!(
                "would create master v{}, re-wrap {} key(s) under it and retire v{primary}",
                primary + 1,
                dir.store.count_wrapped_under(primary)?
            )
        };
        summary.push("master", "keyring", "requested with --master", Ok(text));
        return Ok(());
    }
    let audit = dir.audit_writer(options)?;
    let dir = if resume {
        eprintln!(
            "resuming: {pending} key(s) still wrapped under older master version(s) {unfinished:?}"
        );
        dir
    } else {
        let version = match &options.master_keys {
            MasterKeySource::File(path) => MasterKeyring::add_version_to_file(path)?,
            // Re-sealed in memory under the same root; the plaintext never reaches the disk.
            MasterKeySource::Sealed(sealed) => sealed.add_version()?,
            MasterKeySource::Env(var) => {
                return Err(Error::FailedPrecondition(format!(
                    "every key is already under the newest master version; with keys from \
                     {var}, add a new version there first, then run rotate --master again"
                )));
            }
        };
        eprintln!("created master key version {version}");
        master_record(
            &audit,
            Task::RotateMasterKey,
            vec![version],
            0,
            format!("created master key version {version}"),
        )?;
        drop(dir);
        // Reopened so the new version is checked against and recorded in keys.db before any
        // key is wrapped under it.
        DataDir::open(options, false)?
    };
    let started = std::time::Instant::now();
    let result =
        dir.keys
            .rewrap_to_primary(usize::try_from(args.batch).unwrap_or(usize::MAX), |p| {
                // Audited before the progress line, so whoever watches the progress (an
                // operator, a test) sees only batches that are committed and audited.
                master_record(
                    &audit,
                    Task::RewrapTenantKeys,
                    vec![p.from_master, p.to_master],
                    p.batch,
                    format!(
                        "re-wrapped {} key(s) from master v{} to v{}",
                        p.batch, p.from_master, p.to_master
                    ),
                )?;
                eprintln!(
                    "re-wrapped {} key(s) (master v{} -> v{})",
                    p.total, p.from_master, p.to_master
                );
                if !args.batch_pause.is_zero() {
                    std::thread::sleep(args.batch_pause);
                }
                Ok(())
            });
    let elapsed = started.elapsed().as_secs_f64();
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = master_record(
                &audit,
                Task::RewrapTenantKeys,
                Vec::new(),
                0,
                format!("failed: {e}"),
            );
            audit.shutdown();
            return Err(e);
        }
    };
    for version in &done.retired {
        master_record(
            &audit,
            Task::RetireMasterKey,
            vec![*version],
            0,
            format!("master key version {version} wraps no key any more"),
        )?;
    }
    summary.push(
        "master",
        "keyring",
        "requested with --master",
        Ok(format!(
            "all keys under master v{}; re-wrapped {} in {:.2}s ({:.0}/s); retired {:?}",
            done.primary_master_version,
            done.rewrapped,
            elapsed,
            done.rewrapped as f64 / elapsed.max(1e-9),
            done.retired
        )),
    );
    for version in &done.still_in_use {
        summary.push(
            "retire",
            &format!("master v{version}"),
            "an old master version is retired once it wraps no key",
            Err(Error::FailedPrecondition(format!(
                "master v{version} still wraps keys written meanwhile by a process with an \
                 older keyring; run rotate --master again"
            ))),
        );
    }
    summary.master = Some(done);
    audit.shutdown();
    Ok(())
}
