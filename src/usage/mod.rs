//! Usage accounting per tenant and per caller (issue 16, item 1): calls by operation and
//! outcome, items, failed items, request and response bytes.
//!
//! Every finished call is counted in memory ([`UsageMeter::record`], one mutex and a few hash
//! lookups, no allocation once a key has been seen) in two forms:
//!
//! - per minute, per tenant, caller, operation and outcome: the figures the time-range query
//!   (`AuditService.GetUsage`, `tenant-kms usage`) reads. A flush task writes them to a
//!   [`UsageStore`] every `usage_flush_interval` (and when the server stops), adding to what
//!   is stored, so nothing is on the audit writer's path;
//! - cumulative since start, with bounded labels, for `/metrics` (see [`UsageMeter::families`]).
//!
//! What a crash can lose: the counts of the last flush interval (a `kill -9` or a power cut
//! loses what was not flushed yet). The audit log is not involved: every call's record is
//! committed before its answer as before, so an investigation can always recount from the
//! audit trail.

mod meter;
mod store;

pub use meter::{UsageMeter, UsagePolicy};
pub use store::{SqliteUsageStore, USAGE_DB, UsageStore};

/// Counters of one (minute, tenant, caller, operation, outcome) cell, or of a sum of cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    /// Calls.
    pub calls: u64,
    /// Items the calls carried (1 for a single call, the batch size for a batch).
    pub items: u64,
    /// Items of batches that failed while the batch answered (outcome `partial`).
    pub failed_items: u64,
    /// Encoded size of the requests, in bytes.
    pub request_bytes: u64,
    /// Encoded size of the answers that went out, in bytes (0 for a refused call).
    pub response_bytes: u64,
}

impl UsageCounts {
    /// Adds `other` to these counts (saturating: a counter stops at `u64::MAX`).
    pub fn add(&mut self, other: &UsageCounts) {
        self.calls = self.calls.saturating_add(other.calls);
        self.items = self.items.saturating_add(other.items);
        self.failed_items = self.failed_items.saturating_add(other.failed_items);
        self.request_bytes = self.request_bytes.saturating_add(other.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(other.response_bytes);
    }
}

/// One stored cell: a minute's counts of one tenant, caller, operation and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the minute, in Unix seconds (a multiple of 60).
    pub minute: i64,
    /// Tenant id.
    pub tenant: String,
    /// The caller as the audit names it (`token:ID`, `cert:NAME`).
    pub caller: String,
    /// Operation, as the audit names it (e.g. `Decrypt`).
    pub operation: String,
    /// Audit outcome (e.g. `ok`, `denied`).
    pub outcome: String,
    /// The counts.
    pub counts: UsageCounts,
}

/// A tenant's usage summed over a time range, per caller, operation and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSum {
    /// The caller.
    pub caller: String,
    /// Operation.
    pub operation: String,
    /// Audit outcome.
    pub outcome: String,
    /// The counts.
    pub counts: UsageCounts,
}

/// Whether a call of `operation` that ended in `outcome` counts as a decrypt failure: an
/// operation that opens ciphertext (or a wrapped data key) refused as `invalid` (a
/// ciphertext that does not open is INVALID_ARGUMENT, see `service::status`). A `partial`
/// batch counts its failed items on top (see [`UsageCounts::failed_items`]).
pub fn is_decrypt_failure(operation: &str, outcome: &str) -> bool {
    is_decrypt_operation(operation) && outcome == "invalid"
}

/// Whether the stored operation name `operation` is an RPC that opens ciphertext or a
/// wrapped data key ([`crate::audit::operation::Rpc::opens_ciphertext`]).
pub fn is_decrypt_operation(operation: &str) -> bool {
    matches!(
        crate::audit::Operation::parse(operation),
        Some(crate::audit::Operation::Rpc(rpc)) if rpc.opens_ciphertext()
    )
}

/// The minute a time (Unix microseconds) falls in, as the Unix second it starts at.
pub fn minute_of(micros: i64) -> i64 {
    micros.div_euclid(60_000_000) * 60
}
