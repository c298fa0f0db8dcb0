//! Audit reconciliation at start (docs/AUDIT.md, "Reconciliation at start"): a key change
//! is committed in the key store before its audit record is, so a crash between the two
//! commits leaves a tenant or key version with no audit trace. Before serving, the server
//! compares the key store's changes since a persisted watermark with the audit log and
//! appends a `Reconciled…` record for each change that has none, then moves the watermark.

use std::collections::{BTreeMap, HashMap};

use crate::audit::operation::{Rpc, Task};
use crate::audit::{AuditLog, AuditRecord, ListFilter, Operation, Outcome};
use crate::domain::TenantId;
use crate::error::Result;
use crate::store::{KeyChange, KeyStore};

/// The caller named in reconciliation records.
pub const RECONCILE_CALLER: &str = "system:reconcile";

/// Records read per page while looking for a tenant's audit trace.
const PAGE: usize = 1000;

/// Appends a record for every tenant creation and key version the store holds since its
/// watermark that the audit log does not show, then moves the watermark to `now` (Unix
/// seconds on the store's clock, read before the store was queried, so a change committed
/// meanwhile is checked next time) and the log's head as it was before this check. Returns
/// the records appended.
///
/// A change counts as traced when, after the watermark's sequence number, the log holds
/// for its tenant: for a
/// creation, an `ok` CreateTenant, TenantImport or ReconciledTenantCreate record; for new
/// versions, as many `ok` RotateTenantKey (a call, `rotate`, the nonce budget) or
/// ReconciledKeyVersion records as versions, or an `ok` TenantImport. An `ok` Restore since
/// the watermark stops the comparison: the restored store's changes were audited in their
/// time, in the log the backup came with.
pub fn reconcile(store: &dyn KeyStore, log: &dyn AuditLog, now: i64) -> Result<Vec<AuditRecord>> {
    let head = log.head()?.seq;
    let ((_, after_seq), changes) = store.unreconciled_key_changes()?;
    let mut missing = Vec::new();
    if !changes.is_empty() && !restored_since(log, after_seq)? {
        let mut by_tenant: BTreeMap<TenantId, Vec<KeyChange>> = BTreeMap::new();
        for change in &changes {
            by_tenant
                .entry(change.tenant_id.clone())
                .or_default()
                .push(change.clone());
        }
        let traces = traces(log, after_seq)?;
        for (tenant, changes) in &by_tenant {
            missing.extend(untraced(traces.get(tenant.as_str()), changes));
        }
    }
    if !missing.is_empty() {
        tracing::warn!(
            count = missing.len(),
            "key changes had no audit record (a crash between the two commits): recording them"
        );
        // Named one by one up to a bound: the records themselves name every one.
        for record in missing.iter().take(100) {
            tracing::warn!(
                tenant = %record.tenant_id,
                versions = ?record.key_versions,
                "a key change had no audit record (a crash between the two commits): recorded now"
            );
        }
        let refs: Vec<&AuditRecord> = missing.iter().collect();
        log.append(&refs)?;
    }
    store.set_audit_reconciled_through(now, head, &changes)?;
    Ok(missing)
}

/// Whether an `ok` Restore record follows sequence number `after_seq`.
fn restored_since(log: &dyn AuditLog, after_seq: u64) -> Result<bool> {
    let filter = ListFilter {
        after_seq,
        operation: Operation::Task(Task::Restore).as_str().to_owned(),
        limit: PAGE,
        ..ListFilter::default()
    };
    Ok(log
        .list(&filter)?
        .iter()
        .any(|(_, record)| record.outcome == Outcome::Ok))
}

/// What the audit log shows for one tenant after the watermark.
#[derive(Default)]
struct Trace {
    created: bool,
    rotations: usize,
    imported: bool,
}

/// How one record adds to its tenant's [`Trace`].
type Note = fn(&mut Trace);

/// The traces of every tenant, from the records after `after_seq` of the few operations
/// that create keys (control-plane records: a handful of range scans, however many tenants
/// changed).
fn traces(log: &dyn AuditLog, after_seq: u64) -> Result<HashMap<String, Trace>> {
    let mut traces: HashMap<String, Trace> = HashMap::new();
    let operations: [(Operation, Note); 5] = [
        (Operation::Rpc(Rpc::CreateTenant), |t| t.created = true),
        (Operation::Task(Task::ReconciledTenantCreate), |t| {
            t.created = true
        }),
        (Operation::Rpc(Rpc::RotateTenantKey), |t| t.rotations += 1),
        (Operation::Task(Task::ReconciledKeyVersion), |t| {
            t.rotations += 1
        }),
        (Operation::Task(Task::TenantImport), |t| t.imported = true),
    ];
    for (operation, note) in operations {
        let mut filter = ListFilter {
            operation: operation.as_str().to_owned(),
            after_seq,
            limit: PAGE,
            ..ListFilter::default()
        };
        loop {
            let page = log.list(&filter)?;
            for (_, record) in &page {
                if record.outcome == Outcome::Ok {
                    note(traces.entry(record.tenant_id.clone()).or_default());
                }
            }
            match page.last() {
                Some((seq, _)) if page.len() == PAGE => filter.after_seq = *seq,
                _ => break,
            }
        }
    }
    Ok(traces)
}

/// The records to append for `changes` (one tenant's, in time order) that `trace` does
/// not account for.
fn untraced(trace: Option<&Trace>, changes: &[KeyChange]) -> Vec<AuditRecord> {
    let empty = Trace::default();
    let trace = trace.unwrap_or(&empty);
    if trace.imported {
        return Vec::new();
    }
    let mut records = Vec::new();
    if !trace.created
        && let Some(first) = changes.iter().find(|c| c.version == 1)
    {
        records.push(record(Task::ReconciledTenantCreate, first));
    }
    // The rotation records carry no version number, so they are counted: the versions
    // beyond what they account for are the newest ones (a crash hits the last change).
    let versions: Vec<&KeyChange> = changes.iter().filter(|c| c.version > 1).collect();
    let untraced = versions.len().saturating_sub(trace.rotations);
    for change in versions.iter().skip(versions.len() - untraced) {
        records.push(record(Task::ReconciledKeyVersion, change));
    }
    records
}

fn record(task: Task, change: &KeyChange) -> AuditRecord {
    AuditRecord::local(task, RECONCILE_CALLER, Outcome::Ok)
        .tenant(change.tenant_id.as_str())
        .versions(vec![change.version])
        .detail(format!(
            "committed in the key store at {} (Unix seconds) with no audit record; recorded \
             at start",
            change.at_secs
        ))
}
