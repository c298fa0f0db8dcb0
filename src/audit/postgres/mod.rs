//! The PostgreSQL audit log (DESIGN §8): one keyed chain per node in one database, so that
//! several nodes append at once and no single head serializes them.
//!
//! Each node's chain is the SQLite chain's format exactly (same records, same canonical
//! encoding and MAC, sequence numbers from 1, `prev_mac` from the genesis MAC), kept in
//! `audit_records` under the node's id; its signed head and retention checkpoint are in
//! `audit_anchors`, signed with the chain's name ([`super::anchor::encode_chain`]) so that one
//! chain's anchors cannot stand in for another's. A registry of chains (`audit_chains`, a keyed
//! chain of registrations with a signed end, [`super::registry`]) makes the deletion of a
//! whole chain a break like the deletion of a record.
//!
//! A [`PostgresAuditLog`] is opened for one node: it appends to that node's chain (its own
//! group-commit writer drives it, as on SQLite), reports that chain's head and tail, and
//! recovers that chain; it lists, counts, verifies and prunes every chain. See docs/AUDIT.md,
//! "Many writers".
use crate::store::postgres::off_runtime;

mod sql;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::chain::ChainKeys;
use super::log::{
    AuditAppend, AuditMaintenance, AuditQuery, AuditSnapshot, ChainHead, ListFilter, MergeCursor,
    MergedRecord,
};
use super::record::AuditRecord;
use super::registry;
use super::verify::{Recovery, VerifyReport};
use crate::error::{Error, Result};
use crate::store::postgres::PgPool;

/// The audit log of one node in a PostgreSQL database shared by every node. Cheap to open
/// (it borrows connections from the key store's pool per call), safe to share between
/// threads; the writer, the query path and the commands each hold their own.
pub struct PostgresAuditLog {
    pool: PgPool,
    node: String,
    keys: Option<Arc<ChainKeys>>,
    /// Where this value's last append left the chain, for the one-statement append
    /// ([`sql::append_fast`]); taken at the start of every append and put back only after a
    /// commit whose answer arrived, so any error (a COMMIT whose answer was lost may or may
    /// not have happened) sends the next append down the full path.
    written: Mutex<Option<sql::Written>>,
    /// Appends committed by the one-statement path.
    fast_appends: AtomicU64,
    /// Appends committed by the full path (tail read and judged in a transaction).
    full_appends: AtomicU64,
}

impl PostgresAuditLog {
    /// Opens the log of node `node` over `pool`'s database with the chain keys: creates the
    /// audit tables if missing and registers the node's chain if it is new (its head signed
    /// at genesis). Refuses (INVALID_ARGUMENT) a node id that is not 1–128 characters of
    /// letters, digits, `-`, `_`, `.`, `:`.
    pub fn open(pool: PgPool, node: &str, keys: Arc<ChainKeys>) -> Result<Self> {
        let log = Self::unkeyed(pool, node)?;
        let mut client = log.client()?;
        sql::register(&mut *client, &keys, node)?;
        drop(client);
        Ok(Self {
            keys: Some(keys),
            ..log
        })
    }

    /// Opens the log without its chain keys, for commands that only read records (`audit
    /// export`): it lists, counts and reports heads; whatever needs the keys (appending,
    /// verifying, anchors, pruning, recovery) fails with FAILED_PRECONDITION. Registers
    /// nothing.
    pub fn open_unkeyed(pool: PgPool, node: &str) -> Result<Self> {
        Self::unkeyed(pool, node)
    }

    fn unkeyed(pool: PgPool, node: &str) -> Result<Self> {
        if !registry::valid_chain_name(node) {
            return Err(Error::InvalidArgument(format!(
                "node id {node:?} is not 1 to {} characters of letters, digits, '-', '_', '.' \
                 and ':'",
                registry::MAX_CHAIN_NAME
            )));
        }
        let log = Self {
            pool,
            node: node.to_owned(),
            keys: None,
            written: Mutex::new(None),
            fast_appends: AtomicU64::new(0),
            full_appends: AtomicU64::new(0),
        };
        sql::create_schema(&mut *log.client()?)?;
        Ok(log)
    }

    /// How many appends of this value committed in one statement (the chain ended where
    /// its previous append left it), and how many read and judged the tail in a transaction
    /// of several round trips (the first after opening or after an error, and any after the
    /// chain changed under it). See docs/SCALING.md, "The audit append in one round trip (measured)".
    pub fn append_paths(&self) -> (u64, u64) {
        (
            self.fast_appends.load(Ordering::Relaxed),
            self.full_appends.load(Ordering::Relaxed),
        )
    }

    /// The node whose chain this log appends to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The chains the registry names, in registration order.
    pub fn chains(&self) -> Result<Vec<String>> {
        sql::registered(&mut *self.client()?)
    }

    fn client(&self) -> Result<crate::store::postgres::PgConnection> {
        self.pool.get()
    }

    fn keys(&self) -> Result<&ChainKeys> {
        self.keys.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(
                "the audit log was opened without its chain keys (no master key)".into(),
            )
        })
    }

    /// Runs `f` in one read-only REPEATABLE READ transaction: one snapshot of every chain.
    fn snapshot<T>(
        &self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut client = self.client()?;
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(sql::db_error)?;
        let out = f(&mut tx)?;
        tx.commit().map_err(sql::db_error)?;
        Ok(out)
    }
}

impl AuditAppend for PostgresAuditLog {
    /// One statement in the steady state ([`sql::append_fast`]), else the full path
    /// ([`sql::append`]), whose tail check and evidence record are the same either way.
    fn append(&self, records: &[&AuditRecord]) -> Result<u64> {
        off_runtime(|| {
            let keys = self.keys()?;
            // Held for the whole append: two appends through this value never race on it.
            let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
            // Taken, not read: every `?` below leaves it empty (fail closed).
            let last = written.take();
            let mut client = self.client()?;
            if let Some(last) = last
                && let Some((first, now)) =
                    sql::append_fast(&mut *client, keys, &self.node, &last, records)?
            {
                *written = Some(now);
                self.fast_appends.fetch_add(1, Ordering::Relaxed);
                return Ok(first);
            }
            let (first, now) = sql::append(&mut *client, keys, &self.node, records)?;
            *written = Some(now);
            self.full_appends.fetch_add(1, Ordering::Relaxed);
            Ok(first)
        })
    }

    fn head(&self) -> Result<ChainHead> {
        off_runtime(|| {
            let head = sql::head(&mut *self.client()?, &self.node)?;
            Ok(ChainHead::new(head.seq, head.mac))
        })
    }
}

impl AuditQuery for PostgresAuditLog {
    /// This node's chain, in sequence order.
    fn list(&self, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>> {
        off_runtime(|| sql::list(&mut *self.client()?, &self.node, filter))
    }

    fn count(&self) -> Result<u64> {
        off_runtime(|| sql::count(&mut *self.client()?))
    }

    fn list_merged(
        &self,
        filter: &ListFilter,
        after: Option<&MergeCursor>,
    ) -> Result<Vec<MergedRecord>> {
        off_runtime(|| sql::list_merged(&mut *self.client()?, filter, after))
    }
}

impl AuditMaintenance for PostgresAuditLog {
    /// Every chain and the registry, in one snapshot; the report's head is this node's.
    fn verify(&self) -> Result<VerifyReport> {
        off_runtime(|| {
            let keys = self.keys()?;
            self.snapshot(|tx| sql::verify_all(tx, keys, &self.node))
        })
    }

    /// This node's chain.
    fn check_tail(&self) -> Result<VerifyReport> {
        off_runtime(|| {
            let keys = self.keys()?;
            self.snapshot(|tx| sql::check_tail(tx, keys, &self.node))
        })
    }

    /// An anchor of this node's chain.
    fn check_anchor(&self, seq: u64, mac: &[u8]) -> Result<Option<String>> {
        off_runtime(|| {
            let keys = self.keys()?;
            self.snapshot(|tx| sql::check_anchor(tx, keys, &self.node, seq, mac))
        })
    }

    /// Verifies every chain (refusing a log that does not verify), then prunes each
    /// registered chain in a transaction of its own under its lock, leaving a checkpoint per
    /// chain: no node's appends wait for another chain's prune.
    fn prune(&self, before_micros: i64) -> Result<u64> {
        off_runtime(|| {
            let keys = self.keys()?;
            let report = self.verify()?;
            if !report.ok {
                return Err(Error::FailedPrecondition(format!(
                    "the audit chains do not verify (record {}: {}); not pruning",
                    report.first_bad_seq, report.reason
                )));
            }
            let mut removed = 0;
            for chain in self.chains()? {
                removed += sql::prune_chain(&mut *self.client()?, keys, &chain, before_micros)?;
            }
            Ok(removed)
        })
    }

    /// This node's chain (a break of the registry or of another node's chain is recovered
    /// by that node, or not at all: see docs/AUDIT.md).
    fn recover(&self, caller: &str) -> Result<Recovery> {
        off_runtime(|| {
            let keys = self.keys()?;
            sql::recover_chain(&mut *self.client()?, keys, &self.node, caller)
        })
    }
}

impl AuditSnapshot for PostgresAuditLog {
    /// Refused (FAILED_PRECONDITION): a PostgreSQL log is backed up with its database
    /// (`pg_dump`, `pg_basebackup`; docs/OPERATIONS.md), which copies every chain, the
    /// registry and the key store in one consistent state.
    fn snapshot_to(&self, _dest: &Path) -> Result<ChainHead> {
        off_runtime(|| {
            Err(Error::FailedPrecondition(
                "the audit log is in PostgreSQL: back it up with the database (pg_dump or \
                 pg_basebackup, see docs/OPERATIONS.md), not to a file"
                    .into(),
            ))
        })
    }
}
