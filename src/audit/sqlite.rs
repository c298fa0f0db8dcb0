//! `audit.db`, the SQLite audit log: the records in sequence order, each with its chain MAC,
//! and the signed anchors (head, retention checkpoint) in `audit_meta`. [`SqliteAuditLog`]
//! implements the [`super::log`] traits; the functions over a [`Connection`] below are its
//! SQL, public for tests and tools that write a log directly.
//!
//! Appends read the chain tail inside the same write transaction (BEGIN IMMEDIATE) and move
//! the signed head in it, so several processes (the server and the `rotate` command) can
//! append to one log and the chain stays whole. Reads, verification included, run in one read
//! transaction each, so appends meanwhile cannot make a consistent log look cut. What the
//! chain means is decided by the pure [`super::verify`] and [`super::anchor`]: this module
//! only reads and writes rows.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::anchor::{self, Anchor, Kind, Stored};
use super::chain::{ChainKeys, MAC_LEN};
use super::log::{
    AppendCost, AuditAppend, AuditMaintenance, AuditQuery, AuditSnapshot, ChainHead, Durability,
};
use super::record::{AuditRecord, outcome_from_str};
use super::verify::{self, Recovery, StoredRow, TAIL_CHECK_RECORDS, VerifyReport, WalkStart};
use crate::error::{Error, Result};

pub use super::log::ListFilter;

mod wal_rewrite;

// `audit_meta` is WITHOUT ROWID so that moving the head in every commit rewrites one b-tree
// page, not a table page and its primary-key index page. `audit_events` has no secondary
// index: see [`DROP_UNUSED_INDEX`].
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_events (
    seq             INTEGER PRIMARY KEY,
    time_us         INTEGER NOT NULL,
    request_id      TEXT NOT NULL,
    caller          TEXT NOT NULL,
    peer            TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    operation       TEXT NOT NULL,
    contexts        TEXT NOT NULL,
    key_versions    TEXT NOT NULL,
    item_count      INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    aad_fingerprint TEXT NOT NULL,
    detail          TEXT NOT NULL,
    mac             BLOB NOT NULL,
    trace_parent    TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS audit_meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
";

/// Drops the tenant index that files made before this build have. No query used it: the one
/// query that filters by tenant ([`list`]) also pages by `seq` and takes its filters as `(?2 =
/// '' OR tenant_id = ?2)`, which SQLite answers by walking the table in `seq` order, with or
/// without the index (its plan: `SEARCH audit_events USING INTEGER PRIMARY KEY (rowid>?)`).
/// Yet every append paid for it: an entry in the leaf of the record's tenant, a page apart from
/// the table's last leaf, so one more WAL frame per record (two `pwrite`s), and a split of that
/// leaf with its siblings every few dozen records (docs/PERFORMANCE.md, "What one audit record
/// costs"). Nothing verifies through it; the chain is in the table.
const DROP_UNUSED_INDEX: &str = "DROP INDEX IF EXISTS audit_events_by_tenant";

/// The page size of a new audit.db.
const AUDIT_PAGE_SIZE: i64 = 1024;

/// WAL pages between checkpoints of audit.db (1 MiB at 1 KiB pages): SQLite's automatic
/// checkpoint for a connection opened with [`open`]; [`SqliteAuditLog`]'s writing connection
/// checkpoints off its commit path instead (see [`WalBound`]).
///
/// Why not more: every commit rewrites the signed head's page, and the WAL index (the `-shm`
/// hash table SQLite appends each frame to, one table per 4,096 frames) keeps every frame of
/// a page in one run of slots, so appending a frame walks all the earlier frames of its page
/// since the WAL began or its table did. With a commit per record that walk is most of the
/// cost of appending the frame: at 4,096 pages between checkpoints it cost a lone append
/// 11.7 k instructions, at 1,024 2.7 k; copying the pages back costs about the same per
/// record at either interval (the hot pages are few), while the WAL header sync after each
/// checkpoint comes four times as often (docs/PERFORMANCE.md, "What one audit record costs").
const AUDIT_CHECKPOINT_PAGES: u32 = 1024;

/// WAL pages past which an append of [`SqliteAuditLog`] checkpoints by itself, inside its
/// commit, because nobody called [`AuditAppend::wal_checkpoint`] in time: the bound of the
/// WAL whatever the writer thread does (16 MiB at 1 KiB pages).
const AUDIT_WAL_HARD_PAGES: u32 = 16 * AUDIT_CHECKPOINT_PAGES;

/// How long a write waits for another process's write lock (e.g. `rotate` appending) before
/// it fails, when the caller names no other bound.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn sql_error(e: rusqlite::Error) -> Error {
    Error::Unavailable(format!("audit store: {e}"))
}

/// Opens `audit.db` (mode 0600), in WAL mode, creating the schema. `full_sync` selects
/// `synchronous=FULL` (an fsync per commit) over `NORMAL` (durable across a process crash,
/// not a power loss). A write waits at most `busy_timeout` for another connection's lock. The
/// connection does not checkpoint when it closes (the WAL stays for the next connection to
/// read): only a [`SqliteAuditLog`] that synced its WAL lets it (see `WalTrust`).
pub fn open(path: &Path, full_sync: bool, busy_timeout: Duration) -> Result<Connection> {
    crate::fsutil::create_private_file(path)?;
    let conn = Connection::open(path).map_err(sql_error)?;
    // Closing checkpoints only where a [`SqliteAuditLog`] found its WAL synced: set first, so
    // that a failure below, which drops the connection, does not checkpoint either.
    checkpoint_on_close(&conn, false);
    conn.busy_timeout(busy_timeout).map_err(sql_error)?;
    // Small pages for a new file (an existing file keeps its size): a commit writes every
    // page it touched to the WAL, and an audit commit touches a few pages per record (the
    // table's last leaf, the signed head),
    // each with a few hundred bytes of change. 1 KiB frames instead of 4 KiB cut the bytes
    // written, checksummed and checkpointed per record (docs/PERFORMANCE.md).
    conn.pragma_update(None, "page_size", AUDIT_PAGE_SIZE)
        .map_err(sql_error)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_error)?;
    conn.pragma_update(
        None,
        "synchronous",
        if full_sync { "FULL" } else { "NORMAL" },
    )
    .map_err(sql_error)?;
    // Checkpoint every [`AUDIT_CHECKPOINT_PAGES`] (why that many: there). A
    // [`SqliteAuditLog`] that writes replaces this automatic checkpoint, which runs inside
    // COMMIT, with its own off the commit path ([`WalBound`]).
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        i64::from(AUDIT_CHECKPOINT_PAGES),
    )
    .map_err(sql_error)?;
    conn.execute_batch(SCHEMA).map_err(sql_error)?;
    add_trace_parent_column(&conn)?;
    conn.execute_batch(DROP_UNUSED_INDEX).map_err(sql_error)?;
    Ok(conn)
}

/// Adds `trace_parent` to an `audit_events` table made before it existed. Old rows get ''
/// (no trace), which is how their MACs were computed, so they verify as before.
fn add_trace_parent_column(conn: &Connection) -> Result<()> {
    let present: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('audit_events') WHERE name = 'trace_parent'",
            [],
            |row| row.get(0),
        )
        .map_err(sql_error)?;
    if !present {
        conn.execute_batch(
            "ALTER TABLE audit_events ADD COLUMN trace_parent TEXT NOT NULL DEFAULT ''",
        )
        .map_err(sql_error)?;
    }
    Ok(())
}

/// The statement that inserts one record row.
const INSERT_RECORD: &str = "INSERT INTO audit_events (seq, time_us, request_id, caller, peer, \
     tenant_id, operation, contexts, key_versions, item_count, outcome, aad_fingerprint, \
     detail, mac, trace_parent) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)";

/// Inserts one record row (the caller computed its MAC).
fn insert(conn: &Connection, seq: u64, record: &AuditRecord, mac: &[u8]) -> Result<()> {
    let mut stmt = conn.prepare_cached(INSERT_RECORD).map_err(sql_error)?;
    insert_with(&mut stmt, &mut RowBuffers::default(), seq, record, mac)
}

/// Buffers a batch reuses for all its records (the canonical encoding for the MAC, the JSON
/// of the two list columns), so a record costs no allocation of its own once they have grown.
#[derive(Default)]
struct RowBuffers {
    canonical: Vec<u8>,
    contexts: Vec<u8>,
    versions: Vec<u8>,
}

/// `value` as JSON in `buffer` (its content replaced), as text: what
/// `serde_json::to_string` gives, without a new String.
fn json_in<'b>(buffer: &'b mut Vec<u8>, value: &impl serde::Serialize) -> &'b str {
    buffer.clear();
    // A list of strings or numbers always encodes, and serde_json writes UTF-8: an empty
    // column (as `to_string(..).unwrap_or_default()` gave) only in theory.
    if serde_json::to_writer(&mut *buffer, value).is_err() {
        buffer.clear();
    }
    std::str::from_utf8(buffer).unwrap_or_default()
}

/// Inserts one record row with the [`INSERT_RECORD`] statement: a batch prepares (looks up)
/// it once, not once per record, and encodes in `buffers`.
fn insert_with(
    stmt: &mut rusqlite::Statement<'_>,
    buffers: &mut RowBuffers,
    seq: u64,
    record: &AuditRecord,
    mac: &[u8],
) -> Result<()> {
    let contexts = json_in(&mut buffers.contexts, &record.contexts);
    let versions = json_in(&mut buffers.versions, &record.key_versions);
    stmt.execute(params![
        seq as i64,
        record.time_micros,
        record.request_id,
        record.caller,
        record.peer,
        record.tenant_id,
        record.operation,
        contexts,
        versions,
        record.item_count,
        record.outcome.as_str(),
        record.aad_fingerprint,
        record.detail,
        mac,
        record.trace_parent,
    ])
    .map_err(sql_error)?;
    Ok(())
}

/// Appends one record after `tail` and returns the new tail.
fn chain_one(
    conn: &Connection,
    keys: &ChainKeys,
    tail: (u64, &[u8]),
    record: &AuditRecord,
) -> Result<Anchor> {
    let seq = tail.0 + 1;
    let mac = keys.record_mac(record, seq, tail.1);
    insert(conn, seq, record, &mac)?;
    Ok(Anchor { seq, mac })
}

/// Appends records as one transaction, as [`AuditAppend::append`] says: chained after the
/// current tail (after an `AuditTailMismatch` evidence record if the tail is not the signed
/// head's), the signed head moved in the same transaction. Returns the sequence number of the
/// first. Nothing is written if anything fails.
pub fn append<'a>(
    conn: &mut Connection,
    keys: &ChainKeys,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64> {
    append_after(conn, keys, records, &mut None, LockWait::Wait)?
        .ok_or_else(|| Error::internal("an append that waits gave up"))
}

/// How an append waits for another connection's write lock.
#[derive(Debug, Clone, Copy)]
enum LockWait {
    /// Up to the connection's busy timeout.
    Wait,
    /// Not at all: the append gives up at once, having written nothing, and the connection's
    /// busy timeout is set back to `restore` after the attempt.
    GiveUp {
        /// The connection's busy timeout.
        restore: Duration,
    },
}

/// The tail a connection left with its last append, and the connection's `PRAGMA
/// data_version` then. SQLite changes that number for a connection exactly when another
/// connection (another process, an intruder's editor, a prune through another handle) has
/// committed to the file since; the connection's own commits leave it as it was
/// (sqlite.org/pragma.html#pragma_data_version). While it is unchanged, the tail, the
/// checkpoint and the signed head are exactly what this connection wrote and judged, so the
/// next append need not read and check them again.
#[derive(Debug, Clone, Copy)]
struct KnownTail {
    data_version: i64,
    head: Anchor,
}

/// [`append`], skipping the reading and judging of the tail when `known` says this
/// connection wrote it and nobody has written since; `known` is updated after a commit that
/// succeeds and cleared by any failure. `None` when `wait` is [`LockWait::GiveUp`] and another
/// connection holds the write lock: nothing was written, `known` is kept.
fn append_after<'a>(
    conn: &mut Connection,
    keys: &ChainKeys,
    records: impl IntoIterator<Item = &'a AuditRecord>,
    known: &mut Option<KnownTail>,
    wait: LockWait,
) -> Result<Option<u64>> {
    let remembered = known.take();
    let Some(tx) = WriteTx::begin(conn, wait)? else {
        *known = remembered;
        return Ok(None);
    };
    // Read inside the write transaction: it is the state this append extends.
    let data_version: i64 = tx
        .prepare_cached("PRAGMA data_version")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(sql_error)?;
    let mut head = match remembered {
        Some(tail) if tail.data_version == data_version => tail.head,
        _ => judged_tail(&tx, keys)?,
    };
    let first = head.seq + 1;
    {
        let mut stmt = tx.prepare_cached(INSERT_RECORD).map_err(sql_error)?;
        let mut buffers = RowBuffers::default();
        for record in records {
            let seq = head.seq + 1;
            let mac = keys.record_mac_in(record, seq, &head.mac, &mut buffers.canonical);
            insert_with(&mut stmt, &mut buffers, seq, record, &mac)?;
            head = Anchor { seq, mac };
        }
    }
    write_anchor(&tx, keys, Kind::Head, &head)?;
    tx.commit()?;
    *known = Some(KnownTail { data_version, head });
    Ok(Some(first))
}

/// A write transaction (`BEGIN IMMEDIATE`) begun and committed with cached statements:
/// rusqlite's `Transaction` prepares both from their text every time, a few thousand
/// instructions each, a tenth of what a lone append costs in all (docs/PERFORMANCE.md).
/// Rolled back when dropped uncommitted, as rusqlite's is.
struct WriteTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> WriteTx<'c> {
    /// Begins, or `None` when `wait` gives up and another connection holds the write lock.
    /// `BEGIN IMMEDIATE` takes the write lock, so it is the one step of an append that waits
    /// for another writer (WAL readers never block it).
    fn begin(conn: &'c Connection, wait: LockWait) -> Result<Option<Self>> {
        if let LockWait::GiveUp { .. } = wait {
            conn.busy_timeout(Duration::ZERO).map_err(sql_error)?;
        }
        let begun = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut stmt| stmt.execute([]));
        match wait {
            LockWait::Wait => {
                begun.map_err(sql_error)?;
            }
            LockWait::GiveUp { restore } => {
                conn.busy_timeout(restore).map_err(sql_error)?;
                match begun {
                    Ok(_) => {}
                    // A failed BEGIN IMMEDIATE leaves no transaction open.
                    Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(sql_error(e)),
                }
            }
        }
        Ok(Some(Self { conn, open: true }))
    }

    fn commit(mut self) -> Result<()> {
        self.conn
            .prepare_cached("COMMIT")
            .and_then(|mut stmt| stmt.execute([]))
            .map_err(sql_error)?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for WriteTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // Nothing of a failed append may stay; a failed rollback leaves SQLite to roll
            // back when the connection, dropped after a failed append, closes.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// The tail an append chains after, read and judged inside its write transaction: the signed
/// head's, or, when the end is not the one the signed head names, the `AuditTailMismatch`
/// evidence record appended after what is actually there.
fn judged_tail(tx: &Connection, keys: &ChainKeys) -> Result<Anchor> {
    let last = last_row(tx)?;
    let judged = verify::writable_tail(
        last.as_ref().map(|(seq, mac)| (*seq, mac.as_slice())),
        read_anchor(tx, keys, Kind::Checkpoint)?,
        read_anchor(tx, keys, Kind::Head)?,
    );
    match judged {
        Ok(tail) => Ok(tail),
        Err(problem) => {
            tracing::error!(
                problem = %problem.0,
                "audit.db's end is not the one this service signed: recording the evidence; \
                 run `tenant-kms audit verify`"
            );
            let (seq, prev) = verify::actual_tail(last, read_anchor(tx, keys, Kind::Checkpoint)?);
            chain_one(tx, keys, (seq, &prev), &verify::tail_evidence(&problem))
        }
    }
}

/// Reads and checks an anchor.
fn read_anchor(conn: &Connection, keys: &ChainKeys, kind: Kind) -> Result<Stored> {
    Ok(anchor::decode(
        keys,
        kind,
        anchor_value(conn, kind)?.as_deref(),
    ))
}

/// The stored value of an anchor, unchecked.
fn anchor_value(conn: &Connection, kind: Kind) -> Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM audit_meta WHERE name = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([kind.name()], |row| Ok(bytes_at(row, 0)))
                .optional()
        })
        .map_err(sql_error)
}

/// Writes (or replaces) an anchor. Call it inside the transaction that makes it true.
fn write_anchor(conn: &Connection, keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO audit_meta (name, value) VALUES (?1, ?2)")
        .and_then(|mut stmt| stmt.execute(params![kind.name(), anchor::encode(keys, kind, anchor)]))
        .map_err(sql_error)?;
    Ok(())
}

/// The last record's sequence number and stored MAC, if there is a record.
fn last_row(conn: &Connection) -> Result<Option<(u64, Vec<u8>)>> {
    conn.prepare_cached("SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1")
        .and_then(|mut stmt| {
            stmt.query_row([], |row| {
                Ok((row.get::<_, i64>(0)? as u64, bytes_at(row, 1)))
            })
            .optional()
        })
        .map_err(sql_error)
}

/// The bytes of a column that should hold a blob. Anything else (text, NULL, a number), as an
/// intruder might leave it, reads as no bytes, which never verifies: a malformed row is
/// reported as a break instead of stopping the verifier or the writer.
fn bytes_at(row: &Row<'_>, index: usize) -> Vec<u8> {
    match row.get_ref(index) {
        Ok(rusqlite::types::ValueRef::Blob(bytes)) => bytes.to_vec(),
        _ => Vec::new(),
    }
}

/// Checks, when a data directory opens, that `path` is the audit log of the key store whose
/// audit key gave `keys`, so that a missing, re-created or swapped `audit.db` is refused
/// instead of silently started afresh (issue 13).
///
/// - `fresh` (the audit key was created by this open, a first start; or the operator asked
///   for a new log, `audit recover --new-log`): the file is created if missing and its
///   identity anchor written (signed under `keys`).
/// - Otherwise the file must exist (the key store has an audit key, so a log was created with
///   it) and hold an identity anchor that verifies under `keys`. A log from before identity
///   anchors is adopted when its signed head verifies under `keys` (or it has no head to
///   judge by; the writer then records that break as usual); an empty log without identity
///   is refused: it was re-created.
///
/// Another directory's `audit.db` has its anchors signed under another audit key: refused.
/// An older copy of the same log (a rollback) is not caught here; kept anchors catch it
/// (`audit verify --anchor`).
pub fn check_identity(
    path: &Path,
    keys: &ChainKeys,
    fresh: bool,
    full_sync: bool,
    busy_timeout: Duration,
) -> Result<()> {
    let restore = "restore audit.db (with keys.db) from a backup: `tenant-kms restore --from \
                   BACKUP --force`, see docs/OPERATIONS.md, \"A data file is missing\"; or, \
                   to begin a new audit log deliberately (any old one kept as evidence), run \
                   `tenant-kms audit recover --new-log`";
    if !fresh && !path.exists() {
        return Err(Error::FailedPrecondition(format!(
            "{} is missing, but keys.db holds the audit key of an existing audit log: it was \
             deleted or moved; {restore}",
            path.display()
        )));
    }
    let mut conn = open(path, full_sync, busy_timeout)?;
    match read_anchor(&conn, keys, Kind::Identity)? {
        Stored::Valid(_) => return Ok(()),
        Stored::Invalid => {
            return Err(Error::FailedPrecondition(format!(
                "{} is not this data directory's audit log (its identity is not signed under \
                 this key store's audit key): it was replaced, e.g. by another directory's \
                 audit.db; {restore}",
                path.display()
            )));
        }
        Stored::Missing => {}
    }
    let head = read_anchor(&conn, keys, Kind::Head)?;
    if head == Stored::Invalid {
        return Err(Error::FailedPrecondition(format!(
            "{} is not this data directory's audit log (its signed head does not verify under \
             this key store's audit key): it was replaced, e.g. by another directory's \
             audit.db; {restore}",
            path.display()
        )));
    }
    let empty = head == Stored::Missing
        && last_row(&conn)?.is_none()
        && read_anchor(&conn, keys, Kind::Checkpoint)? == Stored::Missing;
    if empty && !fresh {
        return Err(Error::FailedPrecondition(format!(
            "{} holds no audit log of this data directory (it is empty and unsigned): it was \
             deleted and re-created, or replaced by an empty file; {restore}",
            path.display()
        )));
    }
    let tx = conn.transaction().map_err(sql_error)?;
    write_anchor(&tx, keys, Kind::Identity, &Anchor::GENESIS)?;
    tx.commit().map_err(sql_error)?;
    Ok(())
}

/// The record of a row in [`SELECT_RECORD`]'s column order (seq and MAC aside).
fn record_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let contexts: String = row.get(7)?;
    let versions: String = row.get(8)?;
    let outcome: String = row.get(10)?;
    let bad = |i: usize| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            "malformed audit column".into(),
        )
    };
    Ok(AuditRecord {
        time_micros: row.get(1)?,
        request_id: row.get(2)?,
        caller: row.get(3)?,
        peer: row.get(4)?,
        tenant_id: row.get(5)?,
        operation: row.get(6)?,
        contexts: serde_json::from_str(&contexts).map_err(|_| bad(7))?,
        key_versions: serde_json::from_str(&versions).map_err(|_| bad(8))?,
        item_count: row.get(9)?,
        outcome: outcome_from_str(&outcome).ok_or_else(|| bad(10))?,
        aad_fingerprint: row.get(11)?,
        detail: row.get(12)?,
        trace_parent: row.get(14)?,
    })
}

/// A row as stored, for the verifier: nothing in it is trusted. Only a sequence number that
/// is not an integer fails (SQLite's INTEGER PRIMARY KEY cannot hold anything else).
fn stored_row(row: &Row<'_>) -> rusqlite::Result<StoredRow> {
    Ok(StoredRow {
        seq: row.get(0)?,
        record: record_from_row(row).ok(),
        // A MAC that is NULL or not a blob is as good as a wrong one.
        mac: bytes_at(row, 13),
    })
}

/// The columns of a record row, in [`record_from_row`]'s order.
const SELECT_RECORD: &str = "SELECT seq, time_us, request_id, caller, peer, tenant_id, \
     operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, mac, \
     trace_parent FROM audit_events";

/// Records matching `filter`, in sequence order.
pub fn list(conn: &Connection, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "{SELECT_RECORD} WHERE seq > ?1 AND (?2 = '' OR tenant_id = ?2) \
             AND (?3 IS NULL OR time_us >= ?3) AND (?4 IS NULL OR time_us < ?4) \
             AND (?5 = '' OR operation = ?5) ORDER BY seq LIMIT ?6"
        ))
        .map_err(sql_error)?;
    let rows = stmt
        .query_map(
            params![
                filter.after_seq as i64,
                filter.tenant_id,
                filter.since_micros,
                filter.until_micros,
                filter.operation,
                filter.limit as i64
            ],
            |row| Ok((row.get::<_, i64>(0)? as u64, record_from_row(row)?)),
        )
        .map_err(sql_error)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_error)
}

/// Number of records.
pub fn count(conn: &Connection) -> Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM audit_events", [], |row| {
        row.get::<_, i64>(0)
    })
    .map(|n| n as u64)
    .map_err(sql_error)
}

/// Walks the rows from `from` on with the pure verifier; the caller holds a transaction.
fn walk_from(
    conn: &Connection,
    keys: &ChainKeys,
    start: WalkStart,
    from: i64,
) -> Result<VerifyReport> {
    let head = read_anchor(conn, keys, Kind::Head)?;
    let mut stmt = conn
        .prepare(&format!("{SELECT_RECORD} WHERE seq >= ?1 ORDER BY seq"))
        .map_err(sql_error)?;
    let rows = stmt
        .query_map([from], stored_row)
        .map_err(sql_error)?
        .map(|row| row.map_err(sql_error));
    verify::walk(keys, start, rows, head)
}

/// Verifies the whole log; the caller holds a transaction for a consistent snapshot.
fn verify_in(conn: &Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    let start = WalkStart::Beginning(read_anchor(conn, keys, Kind::Checkpoint)?);
    walk_from(conn, keys, start, i64::MIN)
}

/// The start-up tail check; the caller holds a transaction.
fn check_tail_in(conn: &Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    let after = match last_row(conn)? {
        Some((last, _)) if last > TAIL_CHECK_RECORDS => last - TAIL_CHECK_RECORDS,
        _ => return verify_in(conn, keys),
    };
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, mac FROM audit_events WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
            [after as i64],
            |row| Ok((row.get(0)?, bytes_at(row, 1))),
        )
        .optional()
        .map_err(sql_error)?;
    let (start, from) = match row {
        Some((at, mac)) => (
            WalkStart::After {
                next_seq: at as u64 + 1,
                prev_mac: Some(mac),
            },
            at.saturating_add(1),
        ),
        None => (
            WalkStart::After {
                next_seq: after + 1,
                prev_mac: None,
            },
            after as i64 + 1,
        ),
    };
    walk_from(conn, keys, start, from)
}

/// Prunes as [`AuditMaintenance::prune`] says.
fn prune(conn: &mut Connection, keys: &ChainKeys, before_micros: i64) -> Result<u64> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let report = verify_in(&tx, keys)?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "the audit chain does not verify (record {}: {}); not pruning",
            report.first_bad_seq, report.reason
        )));
    }
    let keep_from: Option<i64> = tx
        .query_row(
            "SELECT MIN(seq) FROM audit_events WHERE time_us >= ?1",
            [before_micros],
            |row| row.get(0),
        )
        .map_err(sql_error)?;
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, mac FROM audit_events WHERE seq < ?1 ORDER BY seq DESC LIMIT 1",
            [keep_from.unwrap_or(i64::MAX)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(sql_error)?;
    let Some((seq, mac)) = last else {
        return Ok(0);
    };
    let mac = <[u8; MAC_LEN]>::try_from(mac.as_slice())
        .map_err(|_| Error::internal("a verified record has a malformed MAC"))?;
    let removed = tx
        .execute("DELETE FROM audit_events WHERE seq <= ?1", [seq])
        .map_err(sql_error)? as u64;
    write_anchor(
        &tx,
        keys,
        Kind::Checkpoint,
        &Anchor {
            seq: seq as u64,
            mac,
        },
    )?;
    tx.commit().map_err(sql_error)?;
    Ok(removed)
}

/// Recovers as [`AuditMaintenance::recover`] says.
fn recover(conn: &mut Connection, keys: &ChainKeys, caller: &str) -> Result<Recovery> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let report = verify_in(&tx, keys)?;
    let Some(record) = verify::recovery_record(&report, caller)? else {
        return Ok(Recovery {
            report,
            recovery_seq: 0,
        });
    };
    let (seq, prev) =
        verify::actual_tail(last_row(&tx)?, read_anchor(&tx, keys, Kind::Checkpoint)?);
    let head = chain_one(&tx, keys, (seq, &prev), &record)?;
    write_anchor(&tx, keys, Kind::Head, &head)?;
    tx.commit().map_err(sql_error)?;
    Ok(Recovery {
        report,
        recovery_seq: head.seq,
    })
}

/// The chain head (see [`ChainHead`]): the last record, else the checkpoint's position as
/// stored (its signature is the verifier's job), else genesis.
fn chain_head(conn: &Connection) -> Result<ChainHead> {
    if let Some((seq, mac)) = last_row(conn)? {
        let mac = <[u8; MAC_LEN]>::try_from(mac.as_slice())
            .map_err(|_| Error::internal(format!("record {seq} has a malformed MAC")))?;
        return Ok(ChainHead::new(seq, mac));
    }
    let checkpoint = anchor_value(conn, Kind::Checkpoint)?
        .as_deref()
        .and_then(anchor::position)
        .unwrap_or(Anchor::GENESIS);
    Ok(ChainHead::new(checkpoint.seq, checkpoint.mac))
}

thread_local! {
    /// WAL frames after the last commit on this thread, as the WAL hook ([`note_wal_frames`])
    /// reported them; taken right after each COMMIT by [`WalBound::committed`].
    static WAL_FRAMES: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The WAL hook of a [`SqliteAuditLog`]'s writing connection. SQLite calls it inside COMMIT,
/// on the committing thread, with the frames now in the WAL; the thread reads them as soon as
/// its COMMIT returns. A plain function (rusqlite takes no closure here), hence the
/// thread-local. Installing it replaces SQLite's automatic checkpoint (both are the one WAL
/// hook of a connection), which would otherwise run inside COMMIT every
/// [`AUDIT_CHECKPOINT_PAGES`] and take milliseconds there.
fn note_wal_frames(_wal: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u32::try_from(frames).ok());
    Ok(())
}

/// Keeps audit.db's WAL bounded with no checkpoint on the commit path: a connection's commits
/// note the WAL's size (through [`note_wal_frames`]), the writer thread checkpoints when
/// [`AUDIT_CHECKPOINT_PAGES`] frames have been added since the last checkpoint
/// ([`AuditAppend::wal_checkpoint_due`], [`AuditAppend::wal_checkpoint`]), and an append
/// checkpoints by itself only past [`AUDIT_WAL_HARD_PAGES`] (nobody did in time).
///
/// A PASSIVE checkpoint copies what no reader still needs; when it copied everything, the next
/// commit starts the WAL from its beginning and SQLite syncs the WAL header then, even with
/// `synchronous=NORMAL` (sqlite.org/pragma.html#pragma_synchronous), so that commit is left
/// to a thread that may wait ([`WalBound::restart_pending`]). When a reader kept part of the
/// WAL, the next checkpoint waits for another [`AUDIT_CHECKPOINT_PAGES`] frames instead of
/// running after every commit.
#[derive(Debug, Default)]
struct WalBound {
    /// Frames in the WAL after this connection's last commit.
    frames: AtomicU32,
    /// Frames in the WAL at the last checkpoint; 0 once the WAL started afresh.
    checkpointed_at: AtomicU32,
    /// The last checkpoint copied the whole WAL and no commit has run since: the next one
    /// restarts the WAL and syncs its header.
    restart_pending: AtomicBool,
}

impl WalBound {
    /// After a commit on this thread: notes the WAL's size.
    fn committed(&self) {
        let Some(frames) = WAL_FRAMES.take() else {
            return;
        };
        self.frames.store(frames, Ordering::Relaxed);
        if frames < self.checkpointed_at.load(Ordering::Relaxed) {
            // The WAL started afresh after the last checkpoint.
            self.checkpointed_at.store(0, Ordering::Relaxed);
        }
        self.restart_pending.store(false, Ordering::Relaxed);
    }

    /// Whether `pages` frames were added since the last checkpoint.
    fn grown_by(&self, pages: u32) -> bool {
        let since = self.checkpointed_at.load(Ordering::Relaxed);
        self.frames.load(Ordering::Relaxed) >= since.saturating_add(pages)
    }

    /// Whether the next commit restarts the WAL (and syncs its header).
    fn restart_pending(&self) -> bool {
        self.restart_pending.load(Ordering::Relaxed)
    }

    /// Runs a PASSIVE checkpoint on `conn`, which must not be in a transaction: copies what no
    /// reader needs any more, waiting for nobody.
    fn checkpoint(&self, conn: &Connection) -> Result<()> {
        let (wal, copied): (i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(1)?, row.get(2)?))
            })
            .map_err(sql_error)?;
        let wal = u32::try_from(wal).unwrap_or(0);
        self.checkpointed_at.store(wal, Ordering::Relaxed);
        self.restart_pending
            .store(wal > 0 && i64::from(wal) == copied, Ordering::Relaxed);
        Ok(())
    }
}

/// How a [`SqliteAuditLog`] opens its connection.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Read and write (created if missing), with this durability and lock wait.
    Write {
        full_sync: bool,
        busy_timeout: Duration,
    },
    /// An existing file, read only (a backup's copy): nothing is written to disk.
    ReadOnly,
}

/// The SQLite audit log (`audit.db`): the [`super::log::AuditLog`] of a single node. Each
/// value owns one connection, used by one call at a time (a mutex: SQLite connections are not
/// for concurrent use); the writer, the query path and the commands each open their own, and
/// SQLite's WAL lets readers and the one writer go on together. After a failed append the
/// connection is dropped and the next call reopens it: the fault may have been a replaced or
/// re-permissioned file.
///
/// In `fsync` durability the connection commits with `synchronous=NORMAL` and the log makes
/// commits durable itself, with an `fdatasync` of the `-wal` file ([`WalSync`]): after every
/// write in [`AuditAppend::append`] (the same promise as `FULL`), or, for the group-commit
/// writer, apart from the commit ([`AuditAppend::append_unsynced`] then
/// [`AuditAppend::sync_committed`]), so the next batch commits while the disk syncs.
pub struct SqliteAuditLog {
    path: PathBuf,
    access: Access,
    keys: Option<Arc<ChainKeys>>,
    conn: Mutex<Option<Connection>>,
    /// What this value's connection left at its last append (see [`KnownTail`]); read and
    /// written only while `conn` is locked, and cleared with the connection.
    known_tail: Mutex<Option<KnownTail>>,
    /// The `-wal` file to sync, in `fsync` durability only.
    wal: Option<Mutex<WalSync>>,
    /// Whether the WAL's committed frames are known on disk ([`WalTrust::Trusted`]; always
    /// in `process` durability): checkpoints run only then ([`SqliteAuditLog::settle`]).
    wal_trusted: AtomicBool,
    /// Set once a sync found the WAL lost committed frames ([`WalTrust::Lost`]), and why:
    /// appends refuse from then on, since nothing after the lost frame can become durable
    /// (read without `wal`'s lock, which a sync holds for as long as the disk takes).
    wal_lost: std::sync::OnceLock<String>,
    #[cfg(test)]
    sync_fault: Arc<SyncFault>,
    /// The WAL's size as this value's commits left it, and its checkpoints (see [`WalBound`]).
    wal_bound: WalBound,
}

/// Makes the commits of an audit.db in WAL mode with `synchronous=NORMAL` durable: an
/// `fdatasync` of its `-wal` file, where such a COMMIT leaves its frames (written, not
/// synced). SQLite itself syncs the WAL before each checkpoint copies it into the database,
/// and the database after (sqlite.org/pragma.html#pragma_synchronous), so frames a checkpoint
/// took are durable in audit.db even when the WAL restarts over them (same file) or is
/// deleted when the last connection closes (after that checkpoint). The fd is re-opened when
/// the path names another file than the one it holds (the connection was reopened after a
/// failure and the WAL re-created), so it always names the live WAL: an fsync on any fd of
/// that inode flushes it.
///
/// A failed sync leaves the WAL [`WalTrust::Suspect`]: the next sync first writes the committed
/// frames back ([`wal_rewrite`]), since Linux may have marked the pages the disk did not take
/// clean, and a plain sync would then succeed over them.
struct WalSync {
    path: PathBuf,
    /// The open WAL and its (device, inode).
    file: Option<(std::fs::File, (u64, u64))>,
    trust: WalTrust,
    #[cfg(test)]
    fault: Arc<SyncFault>,
}

/// Whether a sync of the WAL can be believed to cover every committed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WalTrust {
    /// Every committed frame was on disk at the last sync, which succeeded.
    Trusted,
    /// A sync failed since, or this process has not synced yet: the page cache may hold
    /// committed frames marked clean that the disk does not have.
    Suspect,
    /// A committed frame no longer reads as SQLite wrote it (the message says which): the disk
    /// lost it, and every record after it in the WAL goes with it on a power loss. Nothing is
    /// counted durable again in this process.
    Lost(String),
}

impl WalSync {
    fn new(db: &Path) -> Self {
        let mut path = db.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: PathBuf::from(path),
            file: None,
            // A process does not know what the page cache holds that the disk does not
            // (an earlier process's failed sync): its first sync writes the frames back.
            trust: WalTrust::Suspect,
            #[cfg(test)]
            fault: Arc::default(),
        }
    }

    fn io_failed(&self, what: &str, e: std::io::Error) -> Error {
        Error::Unavailable(format!(
            "audit store: cannot {what} {}: {e}",
            self.path.display()
        ))
    }

    /// The live WAL's descriptor, kept across syncs: opened (and its directory entry synced)
    /// when the path names another file than the one held; `None` when there is no WAL (the
    /// last connection closed, and closing checkpointed every frame into audit.db and synced
    /// it before deleting the WAL). Open for writing too, for [`wal_rewrite`].
    fn live_file(&mut self) -> Result<Option<&std::fs::File>> {
        use std::os::unix::fs::MetadataExt;
        let live = match std::fs::metadata(&self.path) {
            Ok(meta) => (meta.dev(), meta.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.file = None;
                return Ok(None);
            }
            Err(e) => return Err(self.io_failed("read", e)),
        };
        if self.file.as_ref().is_none_or(|(_, id)| *id != live) {
            self.file = None;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| self.io_failed("open", e))?;
            let meta = file.metadata().map_err(|e| self.io_failed("open", e))?;
            // A new WAL's directory entry must survive a power loss too (SQLite syncs the
            // directory on a new WAL's first sync in FULL mode for the same reason).
            crate::fsutil::sync_parent(&self.path)?;
            self.file = Some((file, (meta.dev(), meta.ino())));
        }
        Ok(self.file.as_ref().map(|(file, _)| file))
    }

    /// `fdatasync` of the live WAL: every frame written to it before this call reaches stable
    /// storage, or the call fails (and the descriptor is opened afresh next time, in case the
    /// failure was its own). Whether a success covers frames an earlier failure left clean
    /// in the page cache is the caller's part ([`WalTrust`]).
    fn fdatasync(&mut self) -> Result<()> {
        #[cfg(test)]
        let injected = self
            .fault
            .fail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        let Some(file) = self.live_file()? else {
            return Ok(());
        };
        #[cfg(test)]
        let synced = if injected {
            Err(std::io::Error::other("injected fault"))
        } else {
            file.sync_data()
        };
        #[cfg(not(test))]
        let synced = file.sync_data();
        synced.map_err(|e| {
            self.file = None;
            self.io_failed("sync", e)
        })
    }
}

/// Lets the connection checkpoint when it closes (SQLite's default) or not.
fn checkpoint_on_close(conn: &Connection, allowed: bool) {
    if let Err(e) = conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        !allowed,
    ) {
        tracing::warn!(error = %e, "cannot set audit.db's checkpoint on close");
    }
}

/// The error of every sync once the WAL lost a committed frame.
fn lost_wal(why: &str) -> Error {
    Error::Unavailable(format!(
        "audit store: audit.db's WAL lost committed records on disk ({why}); the server refuses \
         audited calls until it is restarted on a disk that keeps its writes"
    ))
}

/// Test builds: makes the next syncs fail, or wait, as a failing or slow disk would.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct SyncFault {
    /// How many of the next syncs fail.
    pub(crate) fail: std::sync::atomic::AtomicU32,
    /// Held by a test: syncs wait for it.
    pub(crate) gate: Mutex<()>,
    /// Syncs that succeeded.
    pub(crate) synced: std::sync::atomic::AtomicU64,
    /// Rewrites of the WAL's committed frames begun ([`SqliteAuditLog::rewrite_wal`]).
    pub(crate) rewrites: std::sync::atomic::AtomicU64,
}

impl SqliteAuditLog {
    /// Opens `audit.db` at `path` (created 0600 with its schema if missing, WAL mode) with the
    /// chain keys it is chained under. `durability` selects `synchronous=FULL` (an fsync per
    /// commit) or `NORMAL` (durable across a process crash, not a power loss); a write waits
    /// at most `busy_timeout` for another process's lock.
    pub fn open(
        path: &Path,
        durability: Durability,
        busy_timeout: Duration,
        keys: Arc<ChainKeys>,
    ) -> Result<Self> {
        Self::with_access(
            path,
            Self::write_access(durability, busy_timeout),
            Some(keys),
        )
    }

    /// Opens `audit.db` as [`SqliteAuditLog::open`] does but without the chain keys (a
    /// command that only reads records, such as `audit export`, needs no master key): it
    /// lists, counts, reports its head and snapshots; whatever needs the keys (appending,
    /// verifying, anchors, pruning, recovery) fails with FAILED_PRECONDITION.
    pub fn open_unkeyed(
        path: &Path,
        durability: Durability,
        busy_timeout: Duration,
    ) -> Result<Self> {
        Self::with_access(path, Self::write_access(durability, busy_timeout), None)
    }

    /// Opens an existing `audit.db` read only (a backup's copy), writing nothing to disk;
    /// appends, pruning and recovery fail.
    pub fn open_read_only(path: &Path, keys: Arc<ChainKeys>) -> Result<Self> {
        Self::with_access(path, Access::ReadOnly, Some(keys))
    }

    fn write_access(durability: Durability, busy_timeout: Duration) -> Access {
        Access::Write {
            full_sync: durability == Durability::Fsync,
            busy_timeout,
        }
    }

    fn with_access(path: &Path, access: Access, keys: Option<Arc<ChainKeys>>) -> Result<Self> {
        let conn = connect(path, access)?;
        let wal = matches!(
            access,
            Access::Write {
                full_sync: true,
                ..
            }
        )
        .then(|| WalSync::new(path));
        #[cfg(test)]
        let sync_fault: Arc<SyncFault> = Arc::default();
        #[cfg(test)]
        let wal = wal.map(|wal| WalSync {
            fault: Arc::clone(&sync_fault),
            ..wal
        });
        // A WAL of `fsync` durability is not trusted until its first sync.
        checkpoint_on_close(&conn, wal.is_none());
        Ok(Self {
            path: path.to_owned(),
            access,
            keys,
            conn: Mutex::new(Some(conn)),
            known_tail: Mutex::new(None),
            wal_trusted: AtomicBool::new(wal.is_none()),
            wal: wal.map(Mutex::new),
            wal_lost: std::sync::OnceLock::new(),
            #[cfg(test)]
            sync_fault,
            wal_bound: WalBound::default(),
        })
    }

    /// Test builds: the fault injector of this log's syncs.
    #[cfg(test)]
    pub(crate) fn sync_fault(&self) -> Arc<SyncFault> {
        Arc::clone(&self.sync_fault)
    }

    /// In `fsync` durability, makes every commit that returned before this call durable (see
    /// [`WalSync`]); nothing to do otherwise.
    fn sync_wal(&self) -> Result<()> {
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        #[cfg(test)]
        let _gate = self.sync_fault.gate.lock();
        let mut wal = wal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let synced = match &wal.trust {
            WalTrust::Lost(why) => Err(lost_wal(why)),
            WalTrust::Trusted => wal.fdatasync().inspect_err(|_| self.distrust(&mut wal)),
            WalTrust::Suspect => self.rewrite_wal(&mut wal),
        };
        #[cfg(test)]
        if synced.is_ok() {
            self.sync_fault.synced.fetch_add(1, Ordering::AcqRel);
        }
        synced
    }

    /// Writes the WAL's committed frames back and syncs them ([`wal_rewrite`]), holding the
    /// WAL write lock (an empty `BEGIN IMMEDIATE`, rolled back) so that no connection of any
    /// process writes a frame meanwhile, and trusts the WAL again if that succeeds. The
    /// descriptor that syncs is the one kept for later syncs, opened before the frames are
    /// written back, so a failure to write them back later is reported to it.
    fn rewrite_wal(&self, wal: &mut WalSync) -> Result<()> {
        #[cfg(test)]
        self.sync_fault.rewrites.fetch_add(1, Ordering::AcqRel);
        self.with_conn(false, |conn| {
            let _locked = WriteTx::begin(conn, LockWait::Wait)?;
            let written = match wal.live_file()? {
                None => wal_rewrite::Rewrite::WrittenBack { frames: 0 },
                Some(file) => wal_rewrite::write_back_committed(&self.path, file)?,
            };
            match written {
                wal_rewrite::Rewrite::WrittenBack { .. } => {
                    wal.fdatasync()?;
                    self.settle(conn, wal, WalTrust::Trusted);
                    Ok(())
                }
                wal_rewrite::Rewrite::Lost(why) => {
                    tracing::error!(
                        problem = %why,
                        "audit.db's WAL lost committed frames on disk after a failed sync: \
                         refusing every audited call; stop the server, check the disk, run \
                         `tenant-kms audit verify`"
                    );
                    let error = lost_wal(&why);
                    self.settle(conn, wal, WalTrust::Lost(why));
                    Err(error)
                }
            }
        })
    }

    /// After a failed sync: Linux may have marked the pages it could not write clean, so the
    /// next sync writes the frames back first, and until one does nothing copies the WAL's
    /// frames into audit.db (see [`SqliteAuditLog::settle`]). Marked before anything else, and
    /// whether or not the connection can be reached: a connection opened later starts without
    /// checkpoint on close ([`SqliteAuditLog::with_conn`]).
    fn distrust(&self, wal: &mut WalSync) {
        wal.trust = WalTrust::Suspect;
        self.wal_trusted.store(false, Ordering::Release);
        let _ = self.with_conn(false, |conn| {
            checkpoint_on_close(conn, false);
            Ok(())
        });
    }

    /// Records what a write-back found (`Trusted` or `Lost`). While the WAL is not trusted
    /// nothing of this log copies its frames into audit.db: SQLite copies them without checking
    /// their checksums, so a frame the disk lost (read back as the disk has it) would become a
    /// page of audit.db instead of the end of the WAL. So [`AuditAppend::wal_checkpoint`]
    /// refuses, an append does not checkpoint at the WAL's bound, and the connection does not
    /// checkpoint when it closes.
    fn settle(&self, conn: &Connection, wal: &mut WalSync, trust: WalTrust) {
        let trusted = trust == WalTrust::Trusted;
        if let WalTrust::Lost(why) = &trust {
            let _ = self.wal_lost.set(why.clone());
        }
        wal.trust = trust;
        self.wal_trusted.store(trusted, Ordering::Release);
        checkpoint_on_close(conn, trusted);
    }

    /// Refuses a write once the WAL lost a committed frame: nothing after it can become
    /// durable.
    fn refuse_if_lost(&self) -> Result<()> {
        match self.wal_lost.get() {
            Some(why) => Err(lost_wal(why)),
            None => Ok(()),
        }
    }

    /// The chain keys, if the log was opened with them.
    fn keys(&self) -> Result<&ChainKeys> {
        self.keys.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(
                "the audit log was opened without its chain keys (no master key)".into(),
            )
        })
    }

    /// Runs `f` on the connection, reopening it first if a failure dropped it, and dropping it
    /// when `f` fails and `drop_on_error` says a fresh one may fare better.
    fn with_conn<T>(
        &self,
        drop_on_error: bool,
        f: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<T> {
        let mut guard: MutexGuard<'_, Option<Connection>> =
            self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match guard.as_mut() {
            Some(conn) => conn,
            None => {
                let conn = connect(&self.path, self.access)?;
                checkpoint_on_close(&conn, self.wal_trusted.load(Ordering::Acquire));
                guard.insert(conn)
            }
        };
        let result = f(conn);
        if result.is_err() && drop_on_error {
            *guard = None;
        }
        result
    }

    /// Forgets the tail the last append left: a write through this connection other than an
    /// append (pruning, recovery) moves what the next append must chain after, and SQLite's
    /// `data_version` does not show a connection its own writes.
    fn forget_tail(&self) {
        *self
            .known_tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Runs `f` in one read transaction: one consistent state of the log.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.with_conn(false, |conn| {
            let tx = conn.transaction().map_err(sql_error)?;
            f(&tx)
        })
    }
}

fn connect(path: &Path, access: Access) -> Result<Connection> {
    match access {
        // `fsync` durability syncs the WAL itself ([`WalSync`]), so the connection commits
        // with `synchronous=NORMAL` either way.
        Access::Write { busy_timeout, .. } => {
            let conn = open(path, false, busy_timeout)?;
            // Checkpoints off the commit path (see `WalBound`).
            conn.wal_hook(Some(note_wal_frames));
            Ok(conn)
        }
        Access::ReadOnly => {
            let conn = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(sql_error)?;
            conn.busy_timeout(Duration::from_secs(10))
                .map_err(sql_error)?;
            read_old_rows_without_trace(&conn)?;
            Ok(conn)
        }
    }
}

/// A read-only connection cannot add `trace_parent` to a log written before it existed (a
/// backup, a copy): a temporary view of the same name, which SQLite resolves before the
/// table, reads those rows with an empty trace, as their MACs were computed.
fn read_old_rows_without_trace(conn: &Connection) -> Result<()> {
    let (table, trace): (bool, bool) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = \
             'audit_events'), (SELECT COUNT(*) > 0 FROM pragma_table_info('audit_events') \
             WHERE name = 'trace_parent')",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(sql_error)?;
    if table && !trace {
        conn.execute_batch(
            "CREATE TEMP VIEW audit_events AS SELECT *, '' AS trace_parent FROM main.audit_events",
        )
        .map_err(sql_error)?;
    }
    Ok(())
}

impl SqliteAuditLog {
    /// [`AuditAppend::append`] waiting for another writer's lock as `wait` says; then, past
    /// [`AUDIT_WAL_HARD_PAGES`], the checkpoint nobody ran in time.
    fn append_waiting(&self, records: &[&AuditRecord], wait: LockWait) -> Result<Option<u64>> {
        let keys = self.keys()?;
        self.refuse_if_lost()?;
        if !self.wal_trusted.load(Ordering::Acquire)
            && self.wal_bound.grown_by(AUDIT_WAL_HARD_PAGES)
        {
            // At its bound the WAL must be checkpointed before it grows further, and a suspect
            // WAL only after a sync that trusts it again: try that sync now (nothing else may,
            // since no commit gets through to ask for one), and refuse if it fails.
            self.sync_wal()?;
        }
        self.with_conn(true, |conn| {
            let mut known = self
                .known_tail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let first = append_after(conn, keys, records.iter().copied(), &mut known, wait)?;
            if first.is_some() {
                self.wal_bound.committed();
                // Read under the connection's lock, which a sync that distrusts the WAL takes.
                if self.wal_trusted.load(Ordering::Acquire)
                    && self.wal_bound.grown_by(AUDIT_WAL_HARD_PAGES)
                {
                    // Committed already: a failed checkpoint fails nobody's record.
                    if let Err(e) = self.wal_bound.checkpoint(conn) {
                        tracing::warn!(error = %e, "audit.db WAL checkpoint failed");
                    }
                }
            }
            Ok(first)
        })
    }
}

impl AuditAppend for SqliteAuditLog {
    fn append(&self, records: &[&AuditRecord]) -> Result<u64> {
        let first = self.append_unsynced(records)?;
        self.sync_wal()?;
        Ok(first)
    }

    fn syncs_apart(&self) -> bool {
        self.wal.is_some()
    }

    fn sync_committed(&self) -> Result<()> {
        self.sync_wal()
    }

    fn append_unsynced(&self, records: &[&AuditRecord]) -> Result<u64> {
        self.append_waiting(records, LockWait::Wait)?
            .ok_or_else(|| Error::internal("an append that waits gave up"))
    }

    fn head(&self) -> Result<ChainHead> {
        self.read(chain_head)
    }

    fn append_cost(&self) -> AppendCost {
        match self.access {
            Access::Write {
                full_sync: false, ..
            } => AppendCost::PageCache,
            Access::Write {
                full_sync: true, ..
            }
            | Access::ReadOnly => AppendCost::Fsync,
        }
    }

    fn append_without_waiting(&self, records: &[&AuditRecord]) -> Result<Option<u64>> {
        let Access::Write { busy_timeout, .. } = self.access else {
            return self.append(records).map(Some);
        };
        // Either would make this commit wait for the disk: a WAL header sync, a checkpoint.
        if self.wal_bound.restart_pending() || self.wal_bound.grown_by(AUDIT_WAL_HARD_PAGES) {
            return Ok(None);
        }
        let first = self.append_waiting(
            records,
            LockWait::GiveUp {
                restore: busy_timeout,
            },
        )?;
        // Not synced: in `process` durability there is nothing to sync, in `fsync` durability
        // the caller syncs apart ([`AuditAppend::sync_committed`]).
        Ok(first)
    }

    fn wal_checkpoint_due(&self) -> bool {
        self.wal_trusted.load(Ordering::Acquire) && self.wal_bound.grown_by(AUDIT_CHECKPOINT_PAGES)
    }

    fn wal_checkpoint(&self) -> Result<()> {
        self.with_conn(false, |conn| {
            // Read under the connection's lock, which a sync that distrusts the WAL takes.
            if !self.wal_trusted.load(Ordering::Acquire) {
                return Err(Error::Unavailable(
                    "audit store: not checkpointing audit.db's WAL until a sync of it succeeds"
                        .into(),
                ));
            }
            self.wal_bound.checkpoint(conn)
        })
    }
}

impl AuditQuery for SqliteAuditLog {
    fn list(&self, filter: &ListFilter) -> Result<Vec<(u64, AuditRecord)>> {
        self.with_conn(false, |conn| list(conn, filter))
    }

    fn count(&self) -> Result<u64> {
        self.with_conn(false, |conn| count(conn))
    }
}

impl AuditMaintenance for SqliteAuditLog {
    fn verify(&self) -> Result<VerifyReport> {
        let keys = self.keys()?;
        self.read(|conn| verify_in(conn, keys))
    }

    fn check_tail(&self) -> Result<VerifyReport> {
        let keys = self.keys()?;
        self.read(|conn| check_tail_in(conn, keys))
    }

    fn check_anchor(&self, seq: u64, mac: &[u8]) -> Result<Option<String>> {
        let keys = self.keys()?;
        self.read(|conn| {
            let checkpoint = read_anchor(conn, keys, Kind::Checkpoint)?.valid();
            let stored: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT mac FROM audit_events WHERE seq = ?1",
                    [i64::try_from(seq).unwrap_or(i64::MAX)],
                    |row| Ok(bytes_at(row, 0)),
                )
                .optional()
                .map_err(sql_error)?;
            Ok(verify::judge_anchor(
                checkpoint,
                stored.as_deref(),
                seq,
                mac,
            ))
        })
    }

    fn prune(&self, before_micros: i64) -> Result<u64> {
        let keys = self.keys()?;
        self.refuse_if_lost()?;
        self.with_conn(false, |conn| {
            // Inside the connection's lock, so no append runs between the two.
            self.forget_tail();
            prune(conn, keys, before_micros)
        })
        .and_then(|removed| self.sync_wal().map(|()| removed))
    }

    fn recover(&self, caller: &str) -> Result<Recovery> {
        let keys = self.keys()?;
        self.refuse_if_lost()?;
        self.with_conn(false, |conn| {
            // Inside the connection's lock, so no append runs between the two.
            self.forget_tail();
            recover(conn, keys, caller)
        })
        .and_then(|recovery| self.sync_wal().map(|()| recovery))
    }
}

impl AuditSnapshot for SqliteAuditLog {
    fn snapshot_to(&self, dest: &Path) -> Result<ChainHead> {
        self.with_conn(false, |conn| {
            crate::store::sqlite_backup::copy_database(conn, dest, sql_error)
        })?;
        // The copy's own head, read back from it: exactly what a restore will find.
        let copy = connect(dest, Access::ReadOnly)?;
        chain_head(&copy)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::log::AuditLog;
    use crate::audit::operation::{Operation, Task};
    use crate::audit::verify::tests::record;
    use crate::crypto::secret::SecretKey;

    /// A log of `n` records in a temporary directory, and a second connection to tamper
    /// with it as an intruder would.
    fn log(n: u32) -> (tempfile::TempDir, SqliteAuditLog, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
        let log =
            SqliteAuditLog::open(&path, Durability::Process, DEFAULT_BUSY_TIMEOUT, keys).unwrap();
        let records: Vec<AuditRecord> = (1..=n).map(record).collect();
        let refs: Vec<&AuditRecord> = records.iter().collect();
        // Two batches, so the head moves more than once.
        let (a, b) = refs.split_at(refs.len() / 2);
        log.append(a).unwrap();
        log.append(b).unwrap();
        let intruder = Connection::open(&path).unwrap();
        (dir, log, intruder)
    }

    fn first_bad(log: &dyn AuditLog) -> u64 {
        let report = log.verify().unwrap();
        assert_eq!(report.ok, report.first_bad_seq == 0, "{report:?}");
        report.first_bad_seq
    }

    #[test]
    fn each_kind_of_tampering_in_the_file_names_its_first_record() {
        let cases: [(&str, u64); 9] = [
            ("UPDATE audit_events SET tenant_id = 'x' WHERE seq = 4", 4),
            ("UPDATE audit_events SET mac = 'text' WHERE seq = 4", 4),
            (
                "UPDATE audit_events SET contexts = 'not json' WHERE seq = 4",
                4,
            ),
            ("DELETE FROM audit_events WHERE seq = 4", 4),
            ("DELETE FROM audit_events WHERE seq = 1", 1),
            (
                "UPDATE audit_events SET seq = -4 WHERE seq = 4; \
                 UPDATE audit_events SET seq = 4 WHERE seq = 5; \
                 UPDATE audit_events SET seq = 5 WHERE seq = -4",
                4,
            ),
            ("DELETE FROM audit_events WHERE seq >= 9", 9),
            ("DELETE FROM audit_meta WHERE name = 'head'", 11),
            (
                "UPDATE audit_meta SET value = x'00' WHERE name = 'head'",
                11,
            ),
        ];
        for (sql, bad) in cases {
            let (_dir, log, intruder) = log(10);
            assert_eq!(first_bad(&log), 0);
            intruder.execute_batch(sql).unwrap();
            assert_eq!(first_bad(&log), bad, "{sql}");
        }
    }

    #[test]
    fn a_cut_tail_gets_evidence_and_recovery_acknowledges_it_without_deleting() {
        let (_dir, log, intruder) = log(10);
        intruder
            .execute("DELETE FROM audit_events WHERE seq = 10", [])
            .unwrap();
        assert!(!log.check_tail().unwrap().ok);
        // The next append records the cut before its own record.
        assert_eq!(log.append(&[&record(11)]).unwrap(), 11);
        let report = log.verify().unwrap();
        assert_eq!(report.first_bad_seq, 10, "{report:?}");
        assert!(
            report.reason.contains("signed head is at record 10"),
            "{report:?}"
        );
        let recovery = log.recover("cli:test").unwrap();
        assert_eq!(recovery.recovery_seq, 12);
        let report = log.verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.breaks[0].acknowledged_by, Some(12));
        // 9 kept, the evidence, record 11, the recovery: nothing was deleted.
        assert_eq!(log.count().unwrap(), 12);
        let evidence = &log
            .list(&ListFilter {
                after_seq: 9,
                limit: 1,
                ..ListFilter::default()
            })
            .unwrap()[0]
            .1;
        assert_eq!(
            evidence.operation,
            Operation::Task(Task::AuditTailMismatch).as_str()
        );
        // A later edit of a record the recovery did not accept is a new break.
        intruder
            .execute("UPDATE audit_events SET detail = 'x' WHERE seq = 3", [])
            .unwrap();
        assert_eq!(first_bad(&log), 3);
    }

    #[test]
    fn an_append_chains_after_what_another_connection_or_a_recovery_wrote() {
        let (dir, log, intruder) = log(4);
        let keys = log.keys.clone().unwrap();
        assert_eq!(log.append(&[&record(5)]).unwrap(), 5);
        // Another process appends (as `rotate` does): this connection's remembered tail is
        // stale, and SQLite's data_version tells it so.
        let other = SqliteAuditLog::open(
            &dir.path().join("audit.db"),
            Durability::Process,
            DEFAULT_BUSY_TIMEOUT,
            keys,
        )
        .unwrap();
        assert_eq!(other.append(&[&record(6), &record(7)]).unwrap(), 6);
        assert_eq!(log.append(&[&record(8)]).unwrap(), 8);
        assert_eq!(first_bad(&log), 0);
        // A cut, its evidence, then a recovery through this same connection (whose own
        // writes data_version does not show it): the next append follows the recovery.
        intruder
            .execute("DELETE FROM audit_events WHERE seq = 8", [])
            .unwrap();
        assert_eq!(log.append(&[&record(9)]).unwrap(), 9);
        assert_eq!(log.recover("cli:test").unwrap().recovery_seq, 10);
        assert_eq!(log.append(&[&record(11)]).unwrap(), 11);
        assert_eq!(log.head().unwrap().seq, 11);
        let report = log.verify().unwrap();
        assert!(report.ok, "{report:?}");
        // Pruning through this connection, then appending, verifies too.
        assert_eq!(log.prune(i64::MAX).unwrap(), 11, "every record was older");
        assert_eq!(log.append(&[&record(12)]).unwrap(), 12);
        assert_eq!(first_bad(&log), 0);
    }

    /// The bytes of the WAL of the log in `dir`.
    fn wal_bytes(dir: &tempfile::TempDir) -> u64 {
        std::fs::metadata(dir.path().join("audit.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// One WAL frame of audit.db: a 1 KiB page and its 24-byte header.
    const FRAME: u64 = AUDIT_PAGE_SIZE as u64 + 24;

    #[test]
    fn checkpoints_wait_for_the_writer_and_a_commit_that_would_sync_is_not_done_without_waiting() {
        let (dir, log, _intruder) = log(0);
        let records: Vec<AuditRecord> = (1..=20).map(record).collect();
        let batch: Vec<&AuditRecord> = records.iter().collect();
        // No commit checkpoints: the WAL holds every frame until a checkpoint is due.
        let mut commits = 0;
        while !log.wal_checkpoint_due() {
            log.append(&batch).unwrap();
            commits += 1;
            assert!(commits < 10_000, "a checkpoint never came due");
        }
        assert!(wal_bytes(&dir) >= u64::from(AUDIT_CHECKPOINT_PAGES) * FRAME);
        log.wal_checkpoint().unwrap();
        assert!(!log.wal_checkpoint_due());
        // It copied the whole WAL: the next commit starts it afresh and syncs its header, so a
        // caller that must not wait is turned away, having written nothing.
        let count = log.count().unwrap();
        assert_eq!(log.append_without_waiting(&batch).unwrap(), None);
        assert_eq!(log.count().unwrap(), count);
        log.append(&batch).unwrap();
        assert!(log.append_without_waiting(&batch).unwrap().is_some());
        assert!(!log.wal_checkpoint_due());

        // A reader on an old snapshot keeps part of the WAL from being copied: the next
        // checkpoint waits for another bound's worth of frames, not for the next commit.
        let reader = Connection::open(dir.path().join("audit.db")).unwrap();
        reader
            .execute_batch("BEGIN; SELECT COUNT(*) FROM audit_events;")
            .unwrap();
        while !log.wal_checkpoint_due() {
            log.append(&batch).unwrap();
        }
        log.wal_checkpoint().unwrap();
        log.append(&batch).unwrap();
        assert!(!log.wal_checkpoint_due(), "due again after one commit");
        assert!(log.append_without_waiting(&batch).unwrap().is_some());
        reader.execute_batch("COMMIT").unwrap();
        let report = log.verify().unwrap();
        assert!(report.ok, "{report:?}");
    }

    #[test]
    fn a_checkpoint_comes_due_within_a_mebibyte_of_wal() {
        // Each frame appended to the WAL index walks the earlier frames of its page since the
        // WAL began: a long interval makes every lone commit dearer (AUDIT_CHECKPOINT_PAGES).
        let (_dir, log, _intruder) = log(0);
        let mut frames = 0;
        let mut n = 0;
        while !log.wal_checkpoint_due() {
            n += 1;
            log.append(&[&record(n)]).unwrap();
            frames = log.wal_bound.frames.load(Ordering::Relaxed);
        }
        assert!(
            u64::from(frames) * AUDIT_PAGE_SIZE as u64 <= 1 << 20,
            "{frames} frames"
        );
        assert!(log.verify().unwrap().ok);
    }

    #[test]
    fn the_wal_stays_bounded_when_nobody_checkpoints() {
        let (dir, log, _intruder) = log(0);
        let records: Vec<AuditRecord> = (1..=20).map(record).collect();
        let batch: Vec<&AuditRecord> = records.iter().collect();
        let bound = u64::from(AUDIT_WAL_HARD_PAGES + 256) * FRAME;
        let mut largest = 0;
        let mut written = 0;
        // Three hard bounds' worth of frames, never calling `wal_checkpoint`.
        while written < 3 * u64::from(AUDIT_WAL_HARD_PAGES) {
            let before = log.wal_bound.frames.load(Ordering::Relaxed);
            log.append(&batch).unwrap();
            let after = log.wal_bound.frames.load(Ordering::Relaxed);
            // After a checkpoint the WAL starts afresh: then all of it is this commit's.
            written += u64::from(if after > before {
                after - before
            } else {
                after
            });
            largest = largest.max(wal_bytes(&dir));
        }
        assert!(
            largest <= bound,
            "WAL grew to {largest} bytes (bound {bound})"
        );
        assert!(log.verify().unwrap().ok);
    }

    /// Whether audit.db at `path` has an index of that name.
    fn has_index(path: &Path, name: &str) -> bool {
        Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [name],
                |row| row.get(0),
            )
            .unwrap()
    }

    #[test]
    fn a_log_made_with_the_tenant_index_loses_it_and_still_appends_lists_and_verifies() {
        let (dir, log, intruder) = log(6);
        let path = dir.path().join("audit.db");
        assert!(
            !has_index(&path, "audit_events_by_tenant"),
            "a new log has none"
        );
        // A file as builds before this one made it: the same table, with the tenant index.
        intruder
            .execute_batch("CREATE INDEX audit_events_by_tenant ON audit_events(tenant_id, seq)")
            .unwrap();
        let keys = log.keys.clone().unwrap();
        drop(log);
        let log =
            SqliteAuditLog::open(&path, Durability::Process, DEFAULT_BUSY_TIMEOUT, keys).unwrap();
        assert!(!has_index(&path, "audit_events_by_tenant"));
        let other = record(8).tenant("other");
        assert_eq!(log.append(&[&record(7), &other]).unwrap(), 7);
        assert_eq!(first_bad(&log), 0);
        let listed = |tenant: &str| -> Vec<u64> {
            let filter = ListFilter {
                tenant_id: tenant.into(),
                limit: 100,
                ..ListFilter::default()
            };
            log.list(&filter)
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect()
        };
        assert_eq!(listed(&record(1).tenant_id), (1..=7).collect::<Vec<_>>());
        assert_eq!(listed("other"), [8]);
    }

    /// What appending costs audit.db per record, for docs/PERFORMANCE.md ("What one audit
    /// record costs"): run by hand, under callgrind (`--toggle-collect='*cost_append*'`, and
    /// `*cost_checkpoint*`, `*cost_list*`) or `strace -c -f`. Records shaped like the bench's
    /// Encrypt records, spread over 100 tenants, appended in batches of `AUDIT_COST_BATCH`
    /// (default 1) to a new file with pages of `AUDIT_COST_PAGE` bytes (default this build's),
    /// checkpointed as the writer thread does (or every `AUDIT_COST_CHECKPOINT` frames);
    /// `AUDIT_COST_INDEX=1` adds back the tenant index older files had.
    #[test]
    #[ignore = "a measurement, run by hand (docs/PERFORMANCE.md)"]
    fn append_cost() {
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let page = env("AUDIT_COST_PAGE", AUDIT_PAGE_SIZE as usize);
        let batch = env("AUDIT_COST_BATCH", 1);
        let total = env("AUDIT_COST_RECORDS", 20_000);
        // WAL frames between checkpoints (0: the writer thread's interval).
        let ckpt = env("AUDIT_COST_CHECKPOINT", 0) as u32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "page_size", page as i64).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(SCHEMA).unwrap();
        }
        let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
        let log =
            SqliteAuditLog::open(&path, Durability::Process, DEFAULT_BUSY_TIMEOUT, keys).unwrap();
        if env("AUDIT_COST_INDEX", 0) == 1 {
            Connection::open(&path)
                .unwrap()
                .execute_batch(
                    "CREATE INDEX audit_events_by_tenant ON audit_events(tenant_id, seq)",
                )
                .unwrap();
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let records: Vec<AuditRecord> = (0..total)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                AuditRecord::new(
                    crate::audit::operation::Rpc::Encrypt,
                    "token:c19367212bea58f4",
                    "127.0.0.1:54970",
                    crate::audit::record::Outcome::Ok,
                )
                .request_id(format!("{state:016x}"))
                .tenant(format!("bench-{}", state % 100))
                .contexts(vec!["bench.customers.email".into()])
                .versions(vec![1])
                .aad_fingerprint(format!("{:032x}", i))
            })
            .collect();
        #[inline(never)]
        fn cost_append(log: &SqliteAuditLog, batch: &[&AuditRecord]) {
            log.append(batch).unwrap();
        }
        #[inline(never)]
        fn cost_checkpoint(log: &SqliteAuditLog) {
            log.wal_checkpoint().unwrap();
        }
        #[inline(never)]
        fn cost_list(log: &SqliteAuditLog, tenant: &str) -> usize {
            log.list(&ListFilter {
                tenant_id: tenant.into(),
                limit: 1000,
                ..ListFilter::default()
            })
            .unwrap()
            .len()
        }
        let (mut frames, mut commits, mut checkpoints) = (0u64, 0u64, 0u64);
        let start = std::time::Instant::now();
        for chunk in records.chunks(batch.max(1)) {
            let refs: Vec<&AuditRecord> = chunk.iter().collect();
            let before = log.wal_bound.frames.load(Ordering::Relaxed);
            cost_append(&log, &refs);
            let after = log.wal_bound.frames.load(Ordering::Relaxed);
            frames += u64::from(if after >= before {
                after - before
            } else {
                after
            });
            commits += 1;
            if match ckpt {
                0 => log.wal_checkpoint_due(),
                pages => log.wal_bound.grown_by(pages),
            } {
                cost_checkpoint(&log);
                checkpoints += 1;
            }
        }
        let appending = start.elapsed();
        let start = std::time::Instant::now();
        let listed = cost_list(&log, "bench-7");
        let listing = start.elapsed();
        let file = std::fs::metadata(&path).unwrap().len() + wal_bytes(&dir);
        eprintln!(
            "page {page} batch {batch}: {total} records in {commits} commits, {frames} WAL frames \
             ({:.2} per record, {:.0} bytes), {checkpoints} checkpoints, {:.1} us per record; \
             list --tenant: {listed} records in {:.1} ms; file {} KiB",
            frames as f64 / total as f64,
            frames as f64 * (page as f64 + 24.0) / total as f64,
            appending.as_secs_f64() * 1e6 / total as f64,
            listing.as_secs_f64() * 1e3,
            file / 1024,
        );
        assert!(log.verify().unwrap().ok);
    }

    #[test]
    fn a_log_that_does_not_verify_is_not_pruned() {
        let (_dir, log, intruder) = log(10);
        intruder
            .execute("UPDATE audit_events SET detail = 'x' WHERE seq = 3", [])
            .unwrap();
        assert!(matches!(
            log.prune(i64::MAX),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(log.count().unwrap(), 10);
    }

    #[test]
    fn a_log_without_its_keys_reads_but_neither_writes_nor_verifies() {
        let (dir, keyed, _intruder) = log(4);
        let head = keyed.head().unwrap();
        let log = SqliteAuditLog::open_unkeyed(
            &dir.path().join("audit.db"),
            Durability::Process,
            DEFAULT_BUSY_TIMEOUT,
        )
        .unwrap();
        assert_eq!(log.count().unwrap(), 4);
        assert_eq!(log.head().unwrap(), head);
        assert!(matches!(
            log.append(&[&record(5)]),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(log.verify(), Err(Error::FailedPrecondition(_))));
        assert_eq!(log.count().unwrap(), 4);
    }

    /// After a failed sync, the next sync writes the WAL's committed frames back before it
    /// counts them durable (a plain sync would succeed over pages Linux marked clean), and
    /// nothing checkpoints meanwhile; when one of them no longer reads as SQLite wrote it, the
    /// log refuses every append and sync from then on, and so does a log opened on the same
    /// files afterwards (as another process's would be).
    #[test]
    fn after_a_failed_sync_the_frames_are_written_back_or_the_log_refuses_for_good() {
        use std::os::unix::fs::FileExt;
        let (dir, path, keys) = fsync_log_files();
        let open = || {
            SqliteAuditLog::open(
                &path,
                Durability::Fsync,
                DEFAULT_BUSY_TIMEOUT,
                Arc::clone(&keys),
            )
            .unwrap()
        };
        let log = open();
        let fault = log.sync_fault();
        let rewrites = || fault.rewrites.load(Ordering::Acquire);
        log.append(&[&record(1)]).unwrap();
        assert_eq!(
            rewrites(),
            1,
            "a process's first sync writes the frames back"
        );
        log.append(&[&record(2)]).unwrap();
        assert_eq!(rewrites(), 1, "a trusted WAL is only synced");

        fault.fail.store(1, Ordering::Release);
        log.append(&[&record(3)]).unwrap_err();
        assert!(log.wal_checkpoint().is_err() && !log.wal_checkpoint_due());
        log.append(&[&record(4)]).unwrap();
        assert_eq!(
            rewrites(),
            2,
            "the sync after a failure writes the frames back"
        );
        log.append(&[&record(5)]).unwrap();
        assert_eq!(rewrites(), 2);
        log.wal_checkpoint().unwrap();

        // A failed sync whose page the page cache then dropped: the frame reads as the disk
        // has it, here zeros.
        log.append(&[&record(6)]).unwrap();
        fault.fail.store(1, Ordering::Release);
        log.append(&[&record(7)]).unwrap_err();
        let wal = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("audit.db-wal"))
            .unwrap();
        wal.write_all_at(&[0u8; FRAME as usize], 32).unwrap();
        let lost = log.append(&[&record(8)]).unwrap_err().to_string();
        assert!(
            lost.contains("lost committed records") && lost.contains("frame 1's"),
            "{lost}"
        );
        let frames = wal_bytes(&dir);
        let again = log.append(&[&record(9)]).unwrap_err().to_string();
        assert!(again.contains("lost committed records"), "{again}");
        assert_eq!(wal_bytes(&dir), frames, "a refused append commits nothing");
        log.sync_committed().unwrap_err();
        log.prune(i64::MAX).unwrap_err();
        log.wal_checkpoint().unwrap_err();

        // Another log finds the loss at its first sync, after its first commit, and refuses
        // from then on.
        let other = open();
        let found = other.append(&[&record(10)]).unwrap_err().to_string();
        assert!(found.contains("lost committed records"), "{found}");
        let frames = wal_bytes(&dir);
        other.append(&[&record(11)]).unwrap_err();
        assert_eq!(
            wal_bytes(&dir),
            frames,
            "the other log refuses before committing"
        );
    }

    /// A fresh `fsync`-durability log's files: the directory, audit.db's path, chain keys.
    fn fsync_log_files() -> (tempfile::TempDir, PathBuf, Arc<ChainKeys>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
        (dir, path, keys)
    }

    /// A WAL that syncs keep failing grows to its bound without a checkpoint; there each
    /// append tries the sync itself (no commit gets through to ask for one) and refuses while
    /// it fails; once it succeeds, the append goes on and checkpoints, and the WAL is bounded.
    #[test]
    fn a_suspect_wal_at_its_bound_retries_the_sync_and_resumes_when_it_succeeds() {
        let (dir, path, keys) = fsync_log_files();
        let log =
            SqliteAuditLog::open(&path, Durability::Fsync, DEFAULT_BUSY_TIMEOUT, keys).unwrap();
        let fault = log.sync_fault();
        let records: Vec<AuditRecord> = (1..=200).map(record).collect();
        let batch: Vec<&AuditRecord> = records.iter().collect();
        fault.fail.store(u32::MAX, Ordering::Release);
        while !log.wal_bound.grown_by(AUDIT_WAL_HARD_PAGES) {
            log.append_unsynced(&batch).unwrap();
        }
        let frames = wal_bytes(&dir);
        let rewrites = fault.rewrites.load(Ordering::Acquire);
        log.append(&batch).unwrap_err();
        assert!(
            fault.rewrites.load(Ordering::Acquire) > rewrites,
            "the append tried a sync"
        );
        assert_eq!(wal_bytes(&dir), frames, "and committed nothing");

        fault.fail.store(0, Ordering::Release);
        log.append(&batch).unwrap();
        assert!(
            !log.wal_bound.grown_by(AUDIT_WAL_HARD_PAGES),
            "the append checkpointed at the bound"
        );
        assert!(log.verify().unwrap().ok);
    }
}
