//! `tenant-kms audit verify|export|prune|recover`: offline access to a data directory's audit
//! log (`audit list` and `audit verify-chain` go through a server: [`super::audit_client`]).
//! They work while a server runs on the same directory (SQLite transactions keep them
//! consistent). Exit codes: 0 success (for `verify`: the log is whole), 1 failure (for
//! `verify`: a break, named on stdout), 2 usage.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::common::{DataDirArgs, cli_caller, cli_record};
use crate::audit::operation::Task;
use crate::audit::verify::VerifyReport;
use crate::audit::{AuditLog, ListFilter, MergeCursor, MergedRecord, Outcome};
use crate::error::{Error, Result};
use crate::service::state::{AUDIT_DB, DataDir, open_audit_log_unkeyed};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 0 and print the count if whole, exit 1 naming the first bad
    /// record otherwise.
    Verify(VerifyArgs),
    /// Write records as JSON lines to stdout.
    Export(ExportArgs),
    /// Remove records older than a date, leaving a signed checkpoint so the rest verifies.
    Prune(PruneArgs),
    /// Accept a log that does not verify as it stands: append an audited recovery record that
    /// acknowledges its breaks and re-signs its head, so the service can extend it again.
    /// Deletes nothing.
    Recover(RecoverArgs),
    /// List audit events through a running server (ListAuditEvents), one JSON line each.
    List(super::audit_client::ListArgs),
    /// Have a running server verify its audit chain (VerifyAuditChain); exit 1 if broken.
    VerifyChain(super::client::ClientArgs),
}

/// Arguments of `audit recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Begin a new, empty audit log instead: the current audit.db (if any) is moved to
    /// <data-dir>/audit-replaced-<time>/ and kept as evidence, and the new log's first record
    /// says so. For a log beyond repair, or one that is lost. Refused while a server runs.
    #[arg(long)]
    new_log: bool,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also check that record SEQ still has MAC (hex), as printed by an earlier verify and
    /// kept elsewhere: catches a rollback to an older copy of the log.
    #[arg(long, value_name = "SEQ:MAC")]
    anchor: Option<String>,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// From this time (RFC 3339, e.g. 2026-11-01T00:00:00Z), inclusive.
    #[arg(long)]
    since: Option<String>,
    /// Until this time (RFC 3339), exclusive.
    #[arg(long)]
    until: Option<String>,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Arguments of `audit prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove records before this time (RFC 3339 or a date like 2026-01-01).
    #[arg(long)]
    before: String,
    #[command(flatten)]
    data: DataDirArgs,
}

/// The one parser of the CLI's time flags (`--since`, `--until`, `--before`, online or
/// offline): an RFC 3339 time in UTC (`2026-11-01T00:00:00Z`, fractions allowed) or a plain
/// date (`2026-11-01`, midnight UTC), as the time since the Unix epoch.
pub(super) fn time_arg(text: &str) -> std::result::Result<std::time::Duration, String> {
    let is_date = text.len() == 10 && !text.contains('T');
    let full = if is_date {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    let time = humantime::parse_rfc3339_weak(&full).map_err(|_| {
        format!("'{text}' is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z) or a date")
    })?;
    time.duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("'{text}' is before 1970"))
}

/// [`time_arg`] in unix microseconds; a bad time is a usage error.
pub(super) fn parse_time(text: &str) -> Result<i64> {
    let micros = time_arg(text).map_err(Error::InvalidArgument)?.as_micros();
    Ok(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// Opens the data directory's audit log for an offline command; it must exist already (on
/// PostgreSQL, `--store`, it is in the database: every chain, this node's for appends).
fn open_log(dir: &DataDir, options: &crate::service::ServiceOptions) -> Result<Box<dyn AuditLog>> {
    let path = options.data_dir.join(AUDIT_DB);
    if dir.postgres_pool().is_none() && !path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} does not exist",
            path.display()
        )));
    }
    dir.audit_log(options)
}

/// Prints a verification report for people.
fn print_report(report: &VerifyReport) {
    if report.ok {
        println!(
            "OK: {} records verified (head {}, anchor {}:{})",
            report.records_checked, report.head_seq, report.head_seq, report.head_mac
        );
    } else {
        println!(
            "FAILED: first bad record {}: {} ({} records checked)",
            report.first_bad_seq, report.reason, report.records_checked
        );
    }
    let unacknowledged = report.unacknowledged().count() as u64;
    for b in report
        .breaks
        .iter()
        .filter(|b| b.seq != report.first_bad_seq)
    {
        match b.acknowledged_by {
            Some(by) => println!(
                "  acknowledged by recovery record {by}: record {}: {}",
                b.seq, b.reason
            ),
            None => println!("  also: record {}: {}", b.seq, b.reason),
        }
    }
    if report.breaks_total > report.breaks.len() as u64 {
        println!(
            "  … {} more break(s) not listed",
            report.breaks_total - report.breaks.len() as u64
        );
    }
    if !report.ok && unacknowledged > 0 {
        eprintln!(
            "tenant-kms: the audit log is not whole. Keep a copy of audit.db as evidence; \
             `tenant-kms audit recover` accepts it as it stands (audited, deletes nothing)."
        );
    }
}

fn export(args: &ExportArgs) -> Result<()> {
    use std::io::Write;
    let options = args.data.options();
    let log = open_audit_log_unkeyed(&options)?;
    let filter = ListFilter {
        tenant_id: crate::service::audit_service::parse_tenant_filter(
            args.tenant.as_deref().unwrap_or(""),
        )?,
        since_micros: args.since.as_deref().map(parse_time).transpose()?,
        until_micros: args.until.as_deref().map(parse_time).transpose()?,
        limit: 10_000,
        ..ListFilter::default()
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Every node's chain, merged in time order (one chain on SQLite: sequence order).
    let mut after: Option<MergeCursor> = None;
    loop {
        let rows = log.list_merged(&filter, after.as_ref())?;
        let Some(last) = rows.last() else { break };
        after = Some(last.cursor());
        for MergedRecord {
            chain,
            seq,
            record: r,
        } in rows
        {
            let mut line = r.export_json(seq);
            if !chain.is_empty() {
                // The node whose chain holds it (PostgreSQL); a single-node log has one chain.
                line["node_id"] = serde_json::Value::String(chain);
            }
            writeln!(out, "{line}")
                .map_err(|e| Error::Internal(format!("cannot write to stdout: {e}")))?;
        }
    }
    out.flush()
        .map_err(|e| Error::Internal(format!("cannot write to stdout: {e}")))
}

/// Runs an `audit` subcommand.
pub fn run(command: AuditCommand) -> Result<ExitCode> {
    match command {
        AuditCommand::List(args) => super::audit_client::run_list(args),
        AuditCommand::VerifyChain(client) => super::audit_client::run_verify_chain(client),
        AuditCommand::Verify(args) => {
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let log = open_log(&dir, &options)?;
            let mut report = log.verify()?;
            if let Some(anchor) = &args.anchor {
                let (seq, mac) = anchor
                    .split_once(':')
                    .and_then(|(seq, mac)| Some((seq.parse::<u64>().ok()?, hex::decode(mac).ok()?)))
                    .ok_or_else(|| Error::InvalidArgument("--anchor must be SEQ:HEX-MAC".into()))?;
                if let Some(problem) = log.check_anchor(seq, &mac)? {
                    report.ok = false;
                    if report.first_bad_seq == 0 || seq < report.first_bad_seq {
                        report.first_bad_seq = seq;
                        report.reason = problem;
                    }
                }
            }
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print_report(&report);
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(super::EXIT_FAILURE)
            })
        }
        AuditCommand::Export(args) => {
            export(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Prune(args) => {
            let before = parse_time(&args.before)?;
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let log = open_log(&dir, &options)?;
            let removed = log.prune(before)?;
            drop(log);
            let audit = dir.audit_writer(&options)?;
            audit.append_blocking(cli_record(
                Task::AuditPrune,
                "",
                Vec::new(),
                Outcome::Ok,
                format!("removed {removed} records before {}", args.before),
            ))?;
            audit.shutdown();
            eprintln!("removed {removed} record(s); a signed checkpoint keeps the rest verifiable");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Recover(args) if args.new_log => new_log(&args),
        AuditCommand::Recover(args) => {
            let options = args.data.options();
            let dir = DataDir::open(&options, false)?;
            let log = open_log(&dir, &options)?;
            let recovery = log.recover(&cli_caller())?;
            if args.json {
                println!("{}", serde_json::to_string(&recovery).unwrap_or_default());
            } else {
                print_report(&recovery.report);
                if recovery.recovery_seq == 0 {
                    println!("nothing to recover: the log verifies");
                } else {
                    println!(
                        "RECOVERED: record {} acknowledges {} break(s) and re-signs the head; \
                         no record was deleted",
                        recovery.recovery_seq,
                        recovery.report.unacknowledged().count()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `audit recover --new-log`: moves the current log aside (under the serve lock, so no server
/// writes into the moved file) and begins a new one whose first record, by `cli:<user>`, says
/// where the old one went. The one deliberate way past the start-up refusal of a missing or
/// re-created audit.db.
fn new_log(args: &RecoverArgs) -> Result<ExitCode> {
    let mut options = args.data.options();
    let data_dir = options.data_dir.clone();
    if !data_dir.join(crate::service::state::KEYS_DB).exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} holds no keys.db: not a tenant-kms data directory",
            data_dir.display()
        )));
    }
    let _lock =
        crate::service::data_dir_guard::DataDirLock::acquire(&data_dir, "audit recover --new-log")?;
    let mut aside = None;
    for suffix in ["", "-wal", "-shm"] {
        let path = data_dir.join(format!("{AUDIT_DB}{suffix}"));
        if !path.exists() {
            continue;
        }
        let dir = match &aside {
            Some(dir) => std::path::PathBuf::clone(dir),
            None => {
                let dir = data_dir.join(format!(
                    "audit-replaced-{}",
                    crate::domain::unix_now_micros()
                ));
                crate::fsutil::create_private_dir(&dir)?;
                aside = Some(dir.clone());
                dir
            }
        };
        std::fs::rename(&path, dir.join(format!("{AUDIT_DB}{suffix}")))
            .map_err(|e| Error::Internal(format!("cannot move {} aside: {e}", path.display())))?;
    }
    crate::fsutil::sync_dir(&data_dir)?;
    options.new_audit_log = true;
    let dir = DataDir::open(&options, false)?;
    let detail = match &aside {
        Some(old) => format!(
            "began a new audit log; the previous one is kept in {}",
            old.display()
        ),
        None => "began a new audit log; the previous one was missing".to_owned(),
    };
    let audit = dir.audit_writer(&options)?;
    audit.append_blocking(cli_record(
        Task::AuditNewLog,
        "",
        Vec::new(),
        Outcome::Ok,
        detail.clone(),
    ))?;
    audit.shutdown();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "new_log": true,
                "previous": aside.as_ref().map(|p| p.display().to_string()),
            })
        );
    } else {
        println!("NEW LOG: {detail}");
    }
    Ok(ExitCode::SUCCESS)
}
