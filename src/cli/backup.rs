//! `tenant-kms backup`, `backup verify`, `restore`, `tenant export` and `tenant import`: the
//! recovery commands. They work on a data directory like `rotate` does (a server may run on it,
//! except for `restore`, which takes the serve lock and so refuses while a server holds it),
//! and every change is audited as `cli:<user>`.
//!
//! Exit codes: 0 done, 1 refused or failed (the reason on stderr), 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::common::{DataDirArgs, cli_record};
use crate::audit::operation::Task;
use crate::audit::{AuditWriter, Operation, Outcome};
use crate::backup::ledger::ShredLedger;
use crate::backup::snapshot;
use crate::backup::tenant_export;
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::keys::MasterKeyring;
use crate::service::ServiceOptions;
use crate::service::data_dir_guard::{DataDirLock, SERVE_LOCK_FILE};
use crate::service::state::{ADMIN_TOKEN_FILE, DataDir};

/// Flags of `backup`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// Directory to write the backup into (new, or empty).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataDirArgs,
}

/// `backup` subcommands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Check a backup without restoring it: checksums, the manifest's MAC, the master-key check
    /// values, that every wrapped key unwraps with the keyring at hand, and the audit chain.
    /// With `--store postgres://…` and no directory: check a (restored) PostgreSQL database the
    /// same way: check values, every row MAC and the anchor, every wrapped key, every audit
    /// chain.
    Verify(BackupVerifyArgs),
}

/// Flags of `backup verify`.
#[derive(Debug, Args)]
pub struct BackupVerifyArgs {
    /// The backup directory (omit it with `--store postgres://…` to check that database).
    dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Flags of `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup directory.
    #[arg(long)]
    from: PathBuf,
    /// Replace the data of a non-empty data directory (the replaced files are kept in
    /// <data-dir>/replaced-<time>/).
    #[arg(long)]
    force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Flags of `tenant export`.
#[derive(Debug, Args)]
pub struct TenantExportArgs {
    /// The tenant id.
    tenant_id: String,
    /// File to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    data: DataDirArgs,
}

/// Flags of `tenant import`.
#[derive(Debug, Args)]
pub struct TenantImportArgs {
    /// The export file.
    file: PathBuf,
    /// Import only if the file is bound to this tenant id.
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    data: DataDirArgs,
}

fn print(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

/// Appends the audit record of a command's result, then returns the result.
fn audited<T>(
    audit: &AuditWriter,
    operation: impl Into<Operation>,
    tenant: &str,
    result: Result<T>,
    describe: impl Fn(&T) -> (Vec<u32>, String),
) -> Result<T> {
    let record = match &result {
        Ok(value) => {
            let (versions, detail) = describe(value);
            cli_record(operation, tenant, versions, Outcome::Ok, detail)
        }
        Err(e) => cli_record(
            operation,
            tenant,
            Vec::new(),
            crate::service::status::outcome(e),
            e.to_string(),
        ),
    };
    audit.append_blocking(record)?;
    result
}

/// Runs `backup` or `backup verify`.
pub fn run_backup(args: BackupArgs) -> Result<ExitCode> {
    if let Some(BackupCommand::Verify(verify)) = args.command {
        return run_verify(verify);
    }
    let out = args
        .out
        .ok_or_else(|| Error::InvalidArgument("--out DIR is required".into()))?;
    let options = args.data.options();
    let dir = DataDir::open(&options, false)?;
    let ring = MasterKeyring::load(&options.master_keys, false)?;
    let ledger_head = dir.store.shred_ledger_head()?;
    let audit = dir.audit_writer(&options)?;
    let audit_log = dir.audit_log(&options)?;
    let started = std::time::Instant::now();
    let result = snapshot::create(
        &out,
        dir.store.as_ref(),
        audit_log.as_ref(),
        &ring,
        ledger_head,
    );
    let seconds = started.elapsed().as_secs_f64();
    let result = audited(&audit, Task::Backup, "", result, |m| {
        (
            Vec::new(),
            format!(
                "backup {} to {}: {} tenants, {} wrapped keys, audit head {}",
                m.backup_id,
                out.display(),
                m.counts.tenants,
                m.counts.wrapped_keys,
                m.audit_head.seq
            ),
        )
    });
    audit.shutdown();
    let manifest = result?;
    print(
        args.json,
        &serde_json::json!({
            "backup_id": manifest.backup_id,
            "dir": out.display().to_string(),
            "tenants": manifest.counts.tenants,
            "wrapped_keys": manifest.counts.wrapped_keys,
            "audit_head_seq": manifest.audit_head.seq,
            "seconds": seconds,
        }),
        &format!(
            "backup {} written to {} in {seconds:.2}s: {} tenants, {} wrapped keys, audit head {}",
            manifest.backup_id,
            out.display(),
            manifest.counts.tenants,
            manifest.counts.wrapped_keys,
            manifest.audit_head.seq
        ),
    );
    Ok(ExitCode::SUCCESS)
}

fn run_verify(args: BackupVerifyArgs) -> Result<ExitCode> {
    let options = args.data.options();
    let ring = MasterKeyring::load(&options.master_keys, false)?;
    let started = std::time::Instant::now();
    let Some(backup_dir) = &args.dir else {
        return verify_store(&args, &options, &ring, started);
    };
    let report = snapshot::verify(backup_dir, &ring)?;
    let seconds = started.elapsed().as_secs_f64();
    print(
        args.json,
        &serde_json::json!({ "ok": true, "report": report, "seconds": seconds }),
        &format!(
            "OK: backup {} ({} tenants): checksums and manifest MAC verified, {} wrapped keys \
             unwrap with the keyring at hand, {} audit records verified (head {}) in {seconds:.2}s",
            report.backup_id,
            report.tenants,
            report.wrapped_keys_unwrapped,
            report.audit_records,
            report.audit_head_seq
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// `backup verify --store postgres://…`: whether a (restored) PostgreSQL database is whole for
/// the keyring at hand. Opening it checks what a node's start checks (the master-key check
/// values, every row MAC and the row anchor, the shred ledger, which it re-applies); then
/// every wrapped key must unwrap and every audit chain and signed head must verify. The first
/// failure is the error, naming what failed (a tenant and version, a row, a record).
fn verify_store(
    args: &BackupVerifyArgs,
    options: &ServiceOptions,
    ring: &MasterKeyring,
    started: std::time::Instant,
) -> Result<ExitCode> {
    let Some(pg) = options.store.postgres() else {
        return Err(Error::InvalidArgument(
            "name a backup directory, or --store postgres://… to check a database".into(),
        ));
    };
    let target = pg.describe();
    let dir = DataDir::open(options, false)?;
    let unwrapped = snapshot::check_wrapped_keys(dir.store.as_ref(), ring)?;
    let counts = dir.store.counts()?;
    let report = dir.audit_log(options)?.verify()?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "the audit chains of {target} do not verify: record {}: {}",
            report.first_bad_seq, report.reason
        )));
    }
    let seconds = started.elapsed().as_secs_f64();
    print(
        args.json,
        &serde_json::json!({
            "ok": true,
            "store": target,
            "tenants": counts.tenants,
            "wrapped_keys_unwrapped": unwrapped,
            "audit_records": report.records_checked,
            "seconds": seconds,
        }),
        &format!(
            "OK: store {target} ({} tenants): check values and row MACs verified, {unwrapped}              wrapped keys unwrap with the keyring at hand, {} audit records verified in every              chain in {seconds:.2}s",
            counts.tenants, report.records_checked
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// Files a data directory may hold that do not make it "non-empty" for `restore`: the
/// keyring and the shred ledger when they live inside it, the operator's admin token, and the
/// lock file.
fn ignorable(options: &ServiceOptions, path: &Path) -> bool {
    let keyring = options.master_keys.keyring_file();
    let same = |other: &Path| match (path.canonicalize(), other.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    keyring.is_some_and(same)
        || same(&options.shred_ledger_path())
        || path
            .file_name()
            .is_some_and(|n| n == ADMIN_TOKEN_FILE || n == SERVE_LOCK_FILE)
}

/// Runs `restore`.
pub fn run_restore(args: RestoreArgs) -> Result<ExitCode> {
    let options = args.data.options();
    let data_dir = &options.data_dir;
    let ring = MasterKeyring::load(&options.master_keys, false)?;
    crate::service::data_dir_guard::check_dir_mode(data_dir)?;
    if !data_dir.exists() {
        crate::fsutil::create_private_dir(data_dir)?;
    }
    // Held for the whole restore: refused while a server serves the directory (it would keep
    // writing into the files moved aside), and no server starts halfway through.
    let _lock = DataDirLock::acquire(data_dir, "restore")?;
    let entries = std::fs::read_dir(data_dir).map_err(|e| {
        Error::FailedPrecondition(format!("cannot read {}: {e}", data_dir.display()))
    })?;
    let occupied: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| !ignorable(&options, p))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if !occupied.is_empty() && !args.force {
        return Err(Error::FailedPrecondition(format!(
            "the data directory {} is not empty (it holds {}): stop the server and pass \
             --force to replace its data; the replaced files are kept in \
             <data-dir>/replaced-<time>/",
            data_dir.display(),
            occupied.join(", ")
        )));
    }
    let started = std::time::Instant::now();
    let staged = snapshot::stage(&args.from, data_dir, &ring)?;
    let manifest = staged.manifest.clone();
    let report = staged.report.clone();
    let replaced = staged.install()?;
    // The backup's audit copy is taken after its key-store copy, so it may record a later
    // key-store anchor than the restored keys.db has: the restored pair is accepted as it is,
    // and the Restore record below names the restored store's anchor counter (the chain's
    // new baseline for the rollback check at start).
    let options = ServiceOptions {
        key_store_restored: true,
        ..options.clone()
    };
    let dir = DataDir::open(&options, false)?;
    let audit = dir.audit_writer(&options)?;
    let replaced_text = replaced.as_ref().map_or_else(
        || "nothing replaced".to_owned(),
        |p| format!("replaced files kept in {}", p.display()),
    );
    let detail = format!(
        "restored backup {} (taken at unix {}): {} tenants, {} wrapped keys; the audit chain \
         continues from the backup's head {}; {} shredded again from the shred ledger; {}{}",
        manifest.backup_id,
        manifest.created_at,
        report.tenants,
        report.wrapped_keys_unwrapped,
        manifest.audit_head.seq,
        dir.shred.reapplied.len(),
        replaced_text,
        dir.restored_key_store_note()
    );
    audit.append_blocking(cli_record(
        Task::Restore,
        "",
        Vec::new(),
        Outcome::Ok,
        detail,
    ))?;
    audit.shutdown();
    let seconds = started.elapsed().as_secs_f64();
    print(
        args.json,
        &serde_json::json!({
            "backup_id": manifest.backup_id,
            "tenants": report.tenants,
            "wrapped_keys": report.wrapped_keys_unwrapped,
            "audit_head_seq": manifest.audit_head.seq,
            "shredded_again": dir.shred.reapplied.len(),
            "replaced": replaced.as_ref().map(|p| p.display().to_string()),
            "seconds": seconds,
        }),
        &format!(
            "restored backup {} into {} in {seconds:.2}s: {} tenants, {} wrapped keys verified; \
             {} shredded again from the shred ledger; {replaced_text}",
            manifest.backup_id,
            data_dir.display(),
            report.tenants,
            report.wrapped_keys_unwrapped,
            dir.shred.reapplied.len()
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `tenant export`.
pub fn run_tenant_export(args: TenantExportArgs) -> Result<ExitCode> {
    let options = args.data.options();
    let id = TenantId::parse(&args.tenant_id)?;
    let dir = DataDir::open(&options, false)?;
    let ring = MasterKeyring::load(&options.master_keys, false)?;
    let audit = dir.audit_writer(&options)?;
    let result = tenant_export::export(dir.store.as_ref(), &ring, &id).and_then(|bytes| {
        if args.out.exists() {
            return Err(Error::FailedPrecondition(format!(
                "{} exists; an export never overwrites a file",
                args.out.display()
            )));
        }
        crate::fsutil::write_private_file(&args.out, &bytes)?;
        dir.store.key_versions(&id)
    });
    let result = audited(
        &audit,
        Task::TenantExport,
        id.as_str(),
        result,
        |versions| {
            (
                versions
                    .iter()
                    .filter(|v| v.wrapped.is_some())
                    .map(|v| v.version)
                    .collect(),
                format!("exported to {}", args.out.display()),
            )
        },
    );
    audit.shutdown();
    result?;
    eprintln!("exported tenant {id} to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Runs `tenant import`.
pub fn run_tenant_import(args: TenantImportArgs) -> Result<ExitCode> {
    let options = args.data.options();
    let expected = args.tenant.as_deref().map(TenantId::parse).transpose()?;
    let bytes = std::fs::read(&args.file).map_err(|e| {
        Error::FailedPrecondition(format!("cannot read {}: {e}", args.file.display()))
    })?;
    let dir = DataDir::open(&options, false)?;
    let ring = MasterKeyring::load(&options.master_keys, false)?;
    let audit = dir.audit_writer(&options)?;
    let parsed = tenant_export::parse_verified(&bytes, &ring, expected.as_ref());
    let tenant_label = match (&parsed, &expected) {
        (Ok(export), _) => export.tenant_id.clone(),
        (Err(_), Some(id)) => id.as_str().to_owned(),
        (Err(_), None) => String::new(),
    };
    let result = parsed.and_then(|export| {
        let ledger = ShredLedger::new(
            options.shred_ledger_path(),
            options.master_keys.clone(),
            Arc::clone(&dir.store),
        )
        .read()?;
        let plan = tenant_export::plan_import(&export, &ring, dir.store.as_ref(), &ledger)?;
        dir.store.replace_tenant(&plan.tenant, &plan.versions)?;
        Ok(plan)
    });
    let result = audited(&audit, Task::TenantImport, &tenant_label, result, |plan| {
        (
            plan.versions
                .iter()
                .filter(|v| v.wrapped.is_some())
                .map(|v| v.version)
                .collect(),
            format!(
                "{} from {}: primary v{}; newer versions disabled: {:?}; kept destroyed: {:?}",
                if plan.existed {
                    "rolled back"
                } else {
                    "imported"
                },
                args.file.display(),
                plan.tenant.primary_version,
                plan.disabled_newer,
                plan.kept_destroyed
            ),
        )
    });
    audit.shutdown();
    let plan = result?;
    if !plan.disabled_newer.is_empty() {
        eprintln!(
            "note: versions {:?} of tenant {} are newer than the export: kept but DISABLED, so \
             values encrypted under them are refused; enable them again (EnableKeyVersion) if \
             that was not intended, or destroy them",
            plan.disabled_newer, plan.tenant.tenant_id
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "tenant_id": plan.tenant.tenant_id.as_str(),
            "result": if plan.existed { "rolled_back" } else { "imported" },
            "primary_version": plan.tenant.primary_version,
            "versions": plan.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            "disabled_versions": plan.disabled_newer,
            "kept_destroyed": plan.kept_destroyed,
        })
    );
    Ok(ExitCode::SUCCESS)
}
