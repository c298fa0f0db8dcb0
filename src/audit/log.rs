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
//! A log may hold one chain (SQLite) or one chain per node (PostgreSQL,
//! `super::postgres::PostgresAuditLog`). Appending, the head, [`AuditQuery::list`], the tail
//! check, anchors and recovery are about the chain of the node that opened the log;
//! [`AuditQuery::list_merged`], [`AuditQuery::count`], verification and pruning are about
//! every chain.
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

/// A position in the merged order of every chain of a log ([`AuditQuery::list_merged`]):
/// time, then chain name, then sequence number, a total order that records appended later
/// never reorder, so paging by it neither repeats nor skips a record already committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeCursor {
    /// The record's time (µs).
    pub time_micros: i64,
    /// Its chain (empty for a log of one chain).
    pub chain: String,
    /// Its sequence number in that chain.
    pub seq: u64,
}

impl MergeCursor {
    /// The opaque page token of this position: the bare sequence number for a log of one
    /// chain (the token such logs always had), `time.seq.chain` otherwise.
    pub fn token(&self) -> String {
        if self.chain.is_empty() {
            self.seq.to_string()
        } else {
            format!("{}.{}.{}", self.time_micros, self.seq, self.chain)
        }
    }

    /// Parses a [`MergeCursor::token`]; `None` for anything else.
    pub fn parse(token: &str) -> Option<Self> {
        let mut parts = token.splitn(3, '.');
        let first = parts.next()?;
        match (parts.next(), parts.next()) {
            (None, _) => Some(Self {
                time_micros: 0,
                chain: String::new(),
                seq: first.parse().ok()?,
            }),
            (Some(seq), Some(chain)) if !chain.is_empty() => Some(Self {
                time_micros: first.parse().ok()?,
                chain: chain.to_owned(),
                seq: seq.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A record listed from every chain of a log, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedRecord {
    /// Its chain (empty for a log of one chain).
    pub chain: String,
    /// Its sequence number in that chain.
    pub seq: u64,
    /// The record.
    pub record: AuditRecord,
}

impl MergedRecord {
    /// Its position, to list from after it. A log of one chain lists by sequence number
    /// alone, so its cursor's time is 0 (what its page token, the bare number, parses to).
    pub fn cursor(&self) -> MergeCursor {
        MergeCursor {
            time_micros: if self.chain.is_empty() {
                0
            } else {
                self.record.time_micros
            },
            chain: self.chain.clone(),
            seq: self.seq,
        }
    }
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

    /// What an append costs the thread that runs it: the group-commit writer lets a lone
    /// caller commit its own record on its own thread (instead of handing it to the writer
    /// thread and back) only where that cost allows (see [`AppendCost`]). The default,
    /// [`AppendCost::RoundTrips`], never does.
    fn append_cost(&self) -> AppendCost {
        AppendCost::RoundTrips
    }

    /// [`AuditAppend::append`] for a caller that must not wait (an async worker thread):
    /// `Ok(None)`, at once and having written nothing, when the append would have to wait
    /// for another connection's write lock or for the disk; the caller then hands the records
    /// to a thread that may wait. Otherwise exactly [`AuditAppend::append_unsynced`]: when
    /// the log [`AuditAppend::syncs_apart`], the records are durable only once a later
    /// [`AuditAppend::sync_committed`] has succeeded, which the caller then makes. The
    /// default cannot tell and appends as [`AuditAppend::append`] does; only a log whose
    /// [`AuditAppend::append_cost`] is [`AppendCost::PageCache`], or that syncs apart, is
    /// called this way.
    fn append_without_waiting(&self, records: &[&AuditRecord]) -> Result<Option<u64>> {
        self.append(records).map(Some)
    }

    /// Whether the log has grown enough that [`AuditAppend::wal_checkpoint`] should run: an
    /// embedded store's write-ahead log past its bound. Reads memory only. False by default
    /// (a server database checkpoints by itself).
    fn wal_checkpoint_due(&self) -> bool {
        false
    }

    /// Copies the write-ahead log back into the database without waiting for readers or
    /// writers (SQLite's PASSIVE checkpoint), so the log stays bounded. The log does not do
    /// this inside its commits, where it would stall the committing caller: the writer thread
    /// calls it when [`AuditAppend::wal_checkpoint_due`] says so, with no commit running. A
    /// no-op by default.
    fn wal_checkpoint(&self) -> Result<()> {
        Ok(())
    }

    /// Whether a commit's durability can be waited for apart from the commit
    /// ([`AuditAppend::append_unsynced`], then [`AuditAppend::sync_committed`]): SQLite in
    /// `fsync` durability. The group-commit writer then commits the next batch while the
    /// previous one syncs. False (the default): `append` alone makes a commit durable.
    fn syncs_apart(&self) -> bool {
        false
    }

    /// [`AuditAppend::append`], except that when [`AuditAppend::syncs_apart`] the records are
    /// durable (across a power loss) only once a [`AuditAppend::sync_committed`] that began
    /// after this returned has succeeded. The same as `append` by default.
    fn append_unsynced(&self, records: &[&AuditRecord]) -> Result<u64> {
        self.append(records)
    }

    /// Makes every append that returned before this call durable as the log's
    /// [`Durability`] says. It may run on another thread while an append runs. Nothing to do
    /// by default.
    fn sync_committed(&self) -> Result<()> {
        Ok(())
    }
}

/// What one [`AuditAppend::append`] costs the thread that runs it, from the dearest: where
/// the group-commit writer may run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendCost {
    /// Network round trips (a server database): only the writer thread appends, whose
    /// blocking calls need a thread of their own.
    RoundTrips,
    /// A local file and an fsync per commit (SQLite in `fsync` durability): any blocking
    /// thread may append for itself, never an async worker (its other tasks would wait for
    /// the disk).
    Fsync,
    /// A local file and a few writes into the page cache, no fsync, no checkpoint (SQLite in
    /// `process` durability, checkpoints left to [`AuditAppend::wal_checkpoint`]): tens of
    /// microseconds, less than a hand-off to another thread and back, so an async worker may
    /// append for itself too, through [`AuditAppend::append_without_waiting`].
    PageCache,
}

/// Reading records.
pub trait AuditQuery: Send + Sync {
    /// The records matching `filter` in sequence order, at most `filter.limit`, all of one
    /// committed state of the log (never half a batch).
    fn list(&self, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>>;

    /// How many records the log holds (pruned ones not counted; every chain's).
    fn count(&self) -> Result<u64>;

    /// The records of every chain matching `filter` (its `after_seq` ignored) after `after`,
    /// at most `filter.limit`, all of one committed state, merged in [`MergeCursor`] order.
    /// A log of one chain lists in sequence order (its cursor's chain is empty and its time
    /// unused), which is the same as time order up to clock steps.
    fn list_merged(
        &self,
        filter: &ListFilter,
        after: Option<&MergeCursor>,
    ) -> Result<Vec<MergedRecord>> {
        let filter = ListFilter {
            after_seq: after.map_or(0, |c| c.seq),
            ..filter.clone()
        };
        Ok(self
            .list(&filter)?
            .into_iter()
            .map(|(seq, record)| MergedRecord {
                chain: String::new(),
                seq,
                record,
            })
            .collect())
    }
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
