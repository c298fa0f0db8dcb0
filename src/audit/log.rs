//! The `AuditLog` seam: what the writer, the service, the commands and backup need from an
//! audit store, so that a PostgreSQL backend can serve several nodes (DESIGN §4, §8) beside
//! the SQLite one ([`super::sqlite::SqliteAuditLog`]).
//!
//! Small traits by concern, composed into [`AuditLog`] (as tikv's engine traits are):
//! [`AuditAppend`] (the group-commit writer's one transaction, the chain head),
//! [`AuditQuery`] (listing by tenant, time range and operation, with paging),
//! [`AuditMaintenance`] (verification, the start-up tail check, anchors, pruning with a
//! checkpoint, recovery) and [`AuditSnapshot`] (online backup). The chain rules themselves are
//! not here: a backend reads and writes rows and anchors and calls the pure functions of
//! [`super::verify`] and [`super::anchor`], so every backend judges a log the same way.
//!
//! Each log is one chain today. A backend with one chain per node (PostgreSQL) will name the
//! chain in [`ChainHead`] (`#[non_exhaustive]` for that reason) and in [`ListFilter`] (built
//! with `..Default::default()`), and walk each chain with the same verifier.
//!
//! `super::contract` (test builds and the `test-seams` feature) holds the suite every backend
//! must pass.

use std::path::Path;

use super::chain::MAC_LEN;
use super::record::AuditRecord;
use super::verify::{Recovery, VerifyReport};
use crate::error::Result;

/// How durable a committed record is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit (`synchronous=FULL`): survives power loss.
    Fsync,
    /// No fsync per commit (`synchronous=NORMAL` in WAL): survives a process crash, may lose
    /// the last commits on power loss.
    Process,
}

/// The end of a chain: the last record's sequence number and MAC (the retention
/// checkpoint's when every record was pruned; 0 and the genesis MAC for an empty log). A
/// backup manifest names it, so a restored log can be checked to be exactly the one backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainHead {
    /// The sequence number.
    pub seq: u64,
    /// The MAC there.
    pub mac: [u8; MAC_LEN],
}

impl ChainHead {
    /// The head at `seq` with `mac`.
    pub fn new(seq: u64, mac: [u8; MAC_LEN]) -> Self {
        Self { seq, mac }
    }
}

/// Which records [`AuditQuery::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this tenant (empty: all).
    pub tenant_id: String,
    /// From this time (µs), inclusive.
    pub since_micros: Option<i64>,
    /// Before this time (µs), exclusive.
    pub until_micros: Option<i64>,
    /// Only this operation, by its stored name (empty: all).
    pub operation: String,
    /// Records after this sequence number (paging).
    pub after_seq: u64,
    /// At most this many.
    pub limit: usize,
}

/// Appending records and reading where the chain ends.
pub trait AuditAppend: Send + Sync {
    /// Appends `records` in one transaction (all or nothing, durable as the log's
    /// [`Durability`] says when it returns), chained after the current tail in the order
    /// given, and moves the signed head to the last of them in the same transaction. Returns
    /// the sequence number of the first; the rest follow it without gaps. An empty batch
    /// writes only what the tail check below needs.
    ///
    /// If the tail is not the one the signed head names ([`super::verify::writable_tail`]),
    /// the transaction first appends the [`super::verify::tail_evidence`] record, chained
    /// after what is actually there, and the batch after it: appending after a cut without it
    /// would hide the cut; refusing to append would let anyone who can write the store stop
    /// the service. A failure leaves the log as it was and the next call tries afresh (a
    /// backend reconnects as needed).
    fn append(&self, records: &[&AuditRecord]) -> Result<u64>;

    /// Where the chain ends now (see [`ChainHead`]); its signature is the verifier's job.
    fn head(&self) -> Result<ChainHead>;
}

/// Reading records.
pub trait AuditQuery: Send + Sync {
    /// The records matching `filter` in sequence order, at most `filter.limit`, all of one
    /// committed state of the log (never half a batch).
    fn list(&self, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>>;

    /// How many records the log holds (pruned ones not counted).
    fn count(&self) -> Result<u64>;
}

/// Checking and maintaining the chain. Every method judges one consistent state of the log,
/// whatever other writers do meanwhile.
pub trait AuditMaintenance: Send + Sync {
    /// Verifies the whole log ([`super::verify::walk`] from the checkpoint or genesis, then
    /// the signed head).
    fn verify(&self) -> Result<VerifyReport>;

    /// The start-up check: whether the tail matches the signed head and the last
    /// [`super::verify::TAIL_CHECK_RECORDS`] records chain to it (cheap, unlike a full verify).
    fn check_tail(&self) -> Result<VerifyReport>;

    /// Checks an anchor kept from an earlier verify ([`super::verify::judge_anchor`]);
    /// returns the problem, if any.
    fn check_anchor(&self, seq: u64, mac: &[u8]) -> Result<Option<String>>;

    /// Removes the oldest records, all older than `before_micros`, after verifying the whole
    /// log, and stores a signed checkpoint of the last removed record so the rest still
    /// verifies, in one transaction. Only a prefix can go, ending before the first record at
    /// or after `before_micros`, so no newer record is ever removed even if clocks made times
    /// non-monotonic. Refuses (FAILED_PRECONDITION) to prune a log that does not verify.
    /// Returns how many records were removed.
    fn prune(&self, before_micros: i64) -> Result<u64>;

    /// The audited recovery step: in one transaction, verifies the whole log and, if it has
    /// unacknowledged breaks, appends the [`super::verify::recovery_record`] by `caller` after
    /// the actual tail and re-signs the head on it. Deletes and rewrites nothing.
    fn recover(&self, caller: &str) -> Result<Recovery>;
}

/// Online backup.
pub trait AuditSnapshot: Send + Sync {
    /// Writes a consistent copy of the log, as of one commit, to the new file `dest` (mode
    /// 0600) while others keep appending; returns the copy's head. The copy is what
    /// `tenant-kms backup` ships and `restore` puts back as `audit.db`.
    fn snapshot_to(&self, dest: &Path) -> Result<ChainHead>;
}

/// An audit store: every part of the seam. Implemented for every type that implements the
/// parts.
pub trait AuditLog: AuditAppend + AuditQuery + AuditMaintenance + AuditSnapshot {}

impl<T: AuditAppend + AuditQuery + AuditMaintenance + AuditSnapshot> AuditLog for T {}
