//! Copying a whole deployment from one store to another (`migrate-store`, issue 14 item 5):
//! the key store row by row through the [`KeyStore`] traits (so the target computes its own
//! row MACs and anchor, as every write to it does), and the audit log record by record into
//! one chain of the target log.
//!
//! Why the audit records are re-chained rather than copied with their original links: a
//! PostgreSQL log keeps one chain per node and checks each with the signed head of that node;
//! the records of the data directory become the migrating node's chain, appended in their
//! order with their times, callers and details unchanged, so `audit verify --store` checks
//! every one of them like any other record. The source chain is verified in full before the
//! copy (a broken source is refused, never laundered into a fresh chain), and the closing
//! record (see [`closing_detail`]) names the source's head (sequence number and MAC), which
//! ties the new chain to the old one for anyone holding an anchor of it.
//!
//! Nothing here decides what is allowed: the target's own methods apply their rules (a
//! destroyed version keeps no key, tokens keep their revocation and quarantine).

use crate::audit::{AuditLog, ChainHead, ListFilter};
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::store::KeyStore;

/// Records read and appended per transaction while copying an audit log.
const AUDIT_BATCH: usize = 500;

/// Tenants read per page while copying a key store.
const TENANT_PAGE: usize = 500;

/// What a copy moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Copied {
    /// Master-key versions (check values).
    pub master_versions: u64,
    /// Tenants (destroyed tombstones included).
    pub tenants: u64,
    /// Key versions (destroyed ones included, without a key).
    pub key_versions: u64,
    /// Wrapped tenant keys.
    pub wrapped_keys: u64,
    /// Tokens (as hashes).
    pub tokens: u64,
    /// Blind-index definitions.
    pub index_definitions: u64,
    /// Whether the shred-ledger head was copied (false when the source had none).
    pub shred_ledger_head: bool,
    /// Audit records.
    pub audit_records: u64,
}

/// Copies the master-key check values, the wrapped audit secret, every tenant with its key
/// versions, every token, every blind-index definition and the shred-ledger head from `source`
/// into `target`, which must be new and empty and already hold the row key (installed with
/// [`crate::store::MasterKeyStore::set_row_key`] from the same audit secret).
pub fn copy_key_store(source: &dyn KeyStore, target: &dyn KeyStore) -> Result<Copied> {
    let mut copied = Copied::default();
    for record in source.master_versions()? {
        target.insert_master_version(&record)?;
        copied.master_versions += 1;
    }
    let audit_key = source
        .audit_key()?
        .ok_or_else(|| Error::FailedPrecondition("the source holds no audit key".into()))?;
    if !target.put_audit_key(&audit_key, None)? {
        return Err(Error::FailedPrecondition(
            "the target already holds an audit key: it is not empty".into(),
        ));
    }
    let mut after: Option<TenantId> = None;
    loop {
        let page = source.list_tenants(after.as_ref(), TENANT_PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.tenant_id.clone());
        for listed in &page {
            // One snapshot per tenant: its row and versions as one committed state.
            let (tenant, versions) =
                source.tenant_snapshot(&listed.tenant_id)?.ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "tenant {} vanished from the source during the copy: is a server running \
                     on it?",
                        listed.tenant_id
                    ))
                })?;
            target.replace_tenant(&tenant, &versions)?;
            copied.tenants += 1;
            copied.key_versions += versions.len() as u64;
            copied.wrapped_keys += versions.iter().filter(|v| v.wrapped.is_some()).count() as u64;
        }
    }
    for token in source.list_tokens()? {
        target.insert_token(&token)?;
        copied.tokens += 1;
    }
    for definition in source.list_index_definitions(None)? {
        target.declare_index(&definition)?;
        copied.index_definitions += 1;
    }
    if let Some(head) = source.shred_ledger_head()? {
        target.set_shred_ledger_head(&head)?;
        copied.shred_ledger_head = true;
    }
    let (source_counts, target_counts) = (source.counts()?, target.counts()?);
    if source_counts != target_counts {
        return Err(Error::Internal(format!(
            "the copy holds {} tenants and {} wrapped keys, the source {} and {}: is a server \
             running on the source?",
            target_counts.tenants,
            target_counts.wrapped_keys,
            source_counts.tenants,
            source_counts.wrapped_keys
        )));
    }
    Ok(copied)
}

/// Verifies `source` in full, then appends every record it holds, in sequence order and
/// unchanged, to `target` (one chain: the migrating node's). Returns how many records were
/// copied and the source's head. A source that does not verify is refused before anything is
/// appended.
pub fn copy_audit_log(source: &dyn AuditLog, target: &dyn AuditLog) -> Result<(u64, ChainHead)> {
    let report = source.verify()?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "the source audit chain does not verify (record {}: {}); run `tenant-kms audit \
             verify` on it and resolve that first (docs/OPERATIONS.md); nothing was copied",
            report.first_bad_seq, report.reason
        )));
    }
    let head = source.head()?;
    let mut after_seq = 0u64;
    let mut copied = 0u64;
    loop {
        let page = source.list(&ListFilter {
            after_seq,
            limit: AUDIT_BATCH,
            ..ListFilter::default()
        })?;
        let Some((last, _)) = page.last() else { break };
        after_seq = *last;
        let records: Vec<_> = page.iter().map(|(_, record)| record).collect();
        target.append(&records)?;
        copied += records.len() as u64;
    }
    if after_seq != head.seq {
        return Err(Error::Internal(format!(
            "the source audit log grew during the copy (head {} at the start, {after_seq} \
             copied): is a server running on it?",
            head.seq
        )));
    }
    Ok((copied, head))
}

/// The detail of the `Restore` record that closes a migration in the target's chain: where
/// the records came from and the source chain's head, before the anchor note
/// ([`crate::service::state::restored_anchor_note`]) the caller appends.
pub fn closing_detail(from: &str, copied: u64, source_head: &ChainHead) -> String {
    format!(
        "migrate-store from {from}: {copied} audit records copied in order into this chain; \
         the source chain ended at record {} with MAC {}",
        source_head.seq,
        hex::encode(source_head.mac)
    )
}
