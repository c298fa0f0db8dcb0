//! `audit.db`: the audit records in sequence order, each with its chain MAC, and the signed
//! anchors (head, retention checkpoint) in `audit_meta`.
//!
//! Appends read the chain tail inside the same write transaction (BEGIN IMMEDIATE) and move
//! the signed head in it, so several processes (the server and the `rotate` command) can
//! append to one log and the chain stays whole. Queries and verification use their own read
//! connections; the verifier is in [`super::verify`].

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::anchor::{self, Anchor, Kind, Stored};
use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use super::record::{AuditRecord, outcome_from_str};
use crate::error::{Error, Result};

// `audit_meta` is WITHOUT ROWID so that moving the head in every commit rewrites one b-tree
// page, not a table page and its primary-key index page.
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
    mac             BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_by_tenant ON audit_events(tenant_id, seq);
CREATE TABLE IF NOT EXISTS audit_meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
";

/// The page size of a new audit.db.
const AUDIT_PAGE_SIZE: i64 = 1024;

/// WAL pages between automatic checkpoints of audit.db (4 MiB at 1 KiB pages).
const AUDIT_CHECKPOINT_PAGES: i64 = 4096;

/// How long a write waits for another process's write lock (e.g. `rotate` appending) before
/// it fails, when the caller names no other bound.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn sql_error(e: rusqlite::Error) -> Error {
    Error::Unavailable(format!("audit store: {e}"))
}

/// Opens `audit.db` (mode 0600), in WAL mode, creating the schema. `full_sync` selects
/// `synchronous=FULL` (an fsync per commit) over `NORMAL` (durable across a process crash,
/// not a power loss). A write waits at most `busy_timeout` for another connection's lock.
pub fn open(path: &Path, full_sync: bool, busy_timeout: Duration) -> Result<Connection> {
    crate::fsutil::create_private_file(path)?;
    let conn = Connection::open(path).map_err(sql_error)?;
    conn.busy_timeout(busy_timeout).map_err(sql_error)?;
    // Small pages for a new file (an existing file keeps its size): a commit writes every
    // page it touched to the WAL, and an audit commit touches a few pages per record (the
    // table's last leaf, the tenant index's leaf for each record's tenant, the signed head),
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
    // Checkpoint every 4 MiB of WAL instead of SQLite's 1,000 pages (1 MiB at 1 KiB
    // pages): the hot pages (the table's last leaf, the active tenants' index leaves) are
    // rewritten by most commits, so a longer interval copies each of them once for many more
    // commits.
    conn.pragma_update(None, "wal_autocheckpoint", AUDIT_CHECKPOINT_PAGES)
        .map_err(sql_error)?;
    conn.execute_batch(SCHEMA).map_err(sql_error)?;
    Ok(conn)
}

/// Inserts one record row (the caller computed its MAC).
pub(crate) fn insert(
    conn: &Connection,
    seq: u64,
    record: &AuditRecord,
    mac: &[u8],
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit_events (seq, time_us, request_id, caller, peer, tenant_id, \
         operation, contexts, key_versions, item_count, outcome, aad_fingerprint, \
         detail, mac) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)",
    )?;
    stmt.execute(params![
        seq as i64,
        record.time_micros,
        record.request_id,
        record.caller,
        record.peer,
        record.tenant_id,
        record.operation,
        serde_json::to_string(&record.contexts).unwrap_or_default(),
        serde_json::to_string(&record.key_versions).unwrap_or_default(),
        record.item_count,
        record.outcome.as_str(),
        record.aad_fingerprint,
        record.detail,
        mac,
    ])?;
    Ok(())
}

/// The operation name of the evidence record the writer appends when the end of the log is
/// not the one it signed.
pub const TAIL_EVIDENCE_OPERATION: &str = "AuditTailMismatch";

/// Appends records as one transaction, chained after the current tail, and moves the signed
/// head to the last of them in the same transaction (so the head costs no extra fsync).
/// Returns the sequence number of the first; the rest follow in order. Nothing is written if
/// anything fails.
///
/// If the tail is not the one the signed head names (records were cut from the end, or the
/// head was deleted or forged), the transaction first appends an `AuditTailMismatch` evidence
/// record saying so, chained after what is actually there: the verifier reports it as a break
/// until an operator acknowledges it with `tenant-kms audit recover`. Appending after the cut
/// without it would hide the cut; refusing to append would let anyone who can write the file
/// stop the service with one DELETE.
pub fn append<'a>(
    conn: &mut Connection,
    keys: &ChainKeys,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let mut head = match writable_tail(&tx, keys)? {
        Ok(tail) => tail,
        Err(problem) => append_evidence(&tx, keys, &problem)?,
    };
    let first = head.seq + 1;
    for record in records {
        head.seq += 1;
        head.mac = keys.record_mac(record, head.seq, &head.mac);
        insert(&tx, head.seq, record, &head.mac).map_err(sql_error)?;
    }
    anchor::write(&tx, keys, Kind::Head, &head)?;
    tx.commit().map_err(sql_error)?;
    Ok(first)
}

/// Appends the evidence record for a tail that does not match the signed head; returns it as
/// the new tail.
fn append_evidence(conn: &Connection, keys: &ChainKeys, problem: &TailProblem) -> Result<Anchor> {
    tracing::error!(
        problem = %problem.0,
        "audit.db's end is not the one this service signed: recording the evidence; run \
         `tenant-kms audit verify`"
    );
    let (seq, prev) = actual_tail(conn, keys)?;
    let record = AuditRecord {
        time_micros: crate::domain::unix_now_micros(),
        request_id: String::new(),
        caller: "audit-writer".into(),
        peer: "local".into(),
        tenant_id: String::new(),
        operation: TAIL_EVIDENCE_OPERATION.into(),
        contexts: Vec::new(),
        key_versions: Vec::new(),
        item_count: 0,
        outcome: super::Outcome::Internal,
        aad_fingerprint: String::new(),
        detail: problem.0.clone(),
    };
    let anchor = Anchor {
        seq: seq + 1,
        mac: keys.record_mac(&record, seq + 1, &prev),
    };
    insert(conn, anchor.seq, &record, &anchor.mac).map_err(sql_error)?;
    Ok(anchor)
}

/// The last record's sequence number and stored MAC, if there is a record.
pub(crate) fn last_row(conn: &Connection) -> Result<Option<(u64, Vec<u8>)>> {
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
pub(crate) fn bytes_at(row: &Row<'_>, index: usize) -> Vec<u8> {
    match row.get_ref(index) {
        Ok(rusqlite::types::ValueRef::Blob(bytes)) => bytes.to_vec(),
        _ => Vec::new(),
    }
}

/// What is actually at the end of the log, whatever the head says: the last record (its MAC
/// as stored, whatever its length), else a valid checkpoint, else genesis.
pub(crate) fn actual_tail(conn: &Connection, keys: &ChainKeys) -> Result<(u64, Vec<u8>)> {
    Ok(match last_row(conn)? {
        Some(row) => row,
        None => match checkpoint(conn, keys)? {
            Some(checkpoint) => (checkpoint.seq, checkpoint.mac.to_vec()),
            None => (0, GENESIS_MAC.to_vec()),
        },
    })
}

/// How the end of the log differs from its signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailProblem(pub String);

/// The position new records chain after: the last record, or the retention checkpoint when
/// every record was pruned, or genesis for a new log, if it equals the signed head written
/// by the last append (by any process); otherwise the inner error says how they differ.
pub fn writable_tail(
    conn: &Connection,
    keys: &ChainKeys,
) -> Result<std::result::Result<Anchor, TailProblem>> {
    let problem = |text: String| Ok(Err(TailProblem(text)));
    let tail = match last_row(conn)? {
        Some((seq, mac)) => match <[u8; MAC_LEN]>::try_from(mac.as_slice()) {
            Ok(mac) => Some(Anchor { seq, mac }),
            Err(_) => return problem(format!("record {seq} has a malformed MAC")),
        },
        None => match anchor::read(conn, keys, Kind::Checkpoint)? {
            Stored::Missing => None,
            Stored::Valid(checkpoint) => Some(checkpoint),
            Stored::Invalid => return problem("the retention checkpoint is invalid".into()),
        },
    };
    match (anchor::read(conn, keys, Kind::Head)?, tail) {
        (Stored::Missing, None) => Ok(Ok(Anchor::GENESIS)),
        (Stored::Valid(head), Some(tail)) if head == tail => Ok(Ok(tail)),
        (Stored::Valid(head), Some(tail)) if head.seq == tail.seq => problem(format!(
            "record {} is not the one the signed head names",
            tail.seq
        )),
        (Stored::Valid(head), tail) => problem(format!(
            "the signed head is at record {} but the log ends at record {}",
            head.seq,
            tail.map_or(0, |t| t.seq)
        )),
        (Stored::Missing, Some(tail)) => problem(format!(
            "the signed head is missing (the log ends at record {})",
            tail.seq
        )),
        (Stored::Invalid, tail) => problem(format!(
            "the signed head is invalid (the log ends at record {})",
            tail.map_or(0, |t| t.seq)
        )),
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
    match anchor::read(&conn, keys, Kind::Identity)? {
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
    let head = anchor::read(&conn, keys, Kind::Head)?;
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
        && anchor::read(&conn, keys, Kind::Checkpoint)? == Stored::Missing;
    if empty && !fresh {
        return Err(Error::FailedPrecondition(format!(
            "{} holds no audit log of this data directory (it is empty and unsigned): it was \
             deleted and re-created, or replaced by an empty file; {restore}",
            path.display()
        )));
    }
    let tx = conn.transaction().map_err(sql_error)?;
    anchor::write(&tx, keys, Kind::Identity, &Anchor::GENESIS)?;
    tx.commit().map_err(sql_error)?;
    Ok(())
}

/// The retention checkpoint, if there is a valid one.
pub fn checkpoint(conn: &Connection, keys: &ChainKeys) -> Result<Option<Anchor>> {
    Ok(match anchor::read(conn, keys, Kind::Checkpoint)? {
        Stored::Valid(checkpoint) => Some(checkpoint),
        Stored::Missing | Stored::Invalid => None,
    })
}

pub(crate) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<(u64, AuditRecord, Vec<u8>)> {
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
    Ok((
        row.get::<_, i64>(0)? as u64,
        AuditRecord {
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
        },
        row.get(13)?,
    ))
}

/// The columns of a record row, in [`record_from_row`]'s order.
pub(crate) const SELECT_RECORD: &str = "SELECT seq, time_us, request_id, caller, peer, tenant_id, \
     operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, mac \
     FROM audit_events";

/// Filter for [`list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this tenant (empty: all).
    pub tenant_id: String,
    /// From this time (µs), inclusive.
    pub since_micros: Option<i64>,
    /// Before this time (µs), exclusive.
    pub until_micros: Option<i64>,
    /// Only this operation (empty: all).
    pub operation: String,
    /// Records after this sequence number (paging).
    pub after_seq: u64,
    /// At most this many.
    pub limit: usize,
}

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
            record_from_row,
        )
        .map_err(sql_error)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, record, _) = row.map_err(sql_error)?;
        out.push((seq, record));
    }
    Ok(out)
}

/// Number of records.
pub fn count(conn: &Connection) -> Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM audit_events", [], |row| {
        row.get::<_, i64>(0)
    })
    .map(|n| n as u64)
    .map_err(sql_error)
}

/// Removes the oldest records, all of them older than `before_micros`, after verifying the
/// whole log, and stores a signed checkpoint of the last removed record so the rest still
/// verifies. Only a prefix can go (the chain needs it): the prefix ends before the first
/// record at or after `before_micros`, so no newer record is ever removed even if clocks
/// made times non-monotonic. Refuses to prune a log that does not verify. Returns how many
/// records were removed.
pub fn prune(conn: &mut Connection, keys: &ChainKeys, before_micros: i64) -> Result<u64> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let report = super::verify::verify_in(&tx, keys)?;
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
    anchor::write(
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

/// The chain head: the last record's sequence number and MAC (the checkpoint's, or 0 and the
/// genesis MAC, when there is no record). A backup manifest names it, so a restored log can be
/// checked to be exactly the one backed up.
pub fn chain_head(conn: &Connection) -> Result<(u64, [u8; MAC_LEN])> {
    if let Some((seq, mac)) = last_row(conn)? {
        let mac = <[u8; MAC_LEN]>::try_from(mac.as_slice())
            .map_err(|_| Error::internal(format!("record {seq} has a malformed MAC")))?;
        return Ok((seq, mac));
    }
    // No record: the checkpoint's position as stored (its signature is the verifier's job).
    let value: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM audit_meta WHERE name = 'checkpoint'",
            [],
            |row| Ok(bytes_at(row, 0)),
        )
        .optional()
        .map_err(sql_error)?;
    let parsed = value.as_deref().and_then(|v| {
        let seq = <[u8; 8]>::try_from(v.get(..8)?).ok()?;
        let mac = <[u8; MAC_LEN]>::try_from(v.get(8..8 + MAC_LEN)?).ok()?;
        Some((u64::from_be_bytes(seq), mac))
    });
    Ok(parsed.unwrap_or((0, GENESIS_MAC)))
}

/// Opens an existing `audit.db` read-only (a backup's copy), writing nothing to disk.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_error)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_error)?;
    Ok(conn)
}

/// Writes a consistent snapshot of the audit log at `path` to the new file `dest` (mode
/// 0600) with SQLite's online backup API, while the server keeps appending. The copy is a
/// self-contained file (rollback journal mode, no `-wal` beside it).
pub fn snapshot(path: &Path, dest: &Path) -> Result<()> {
    let source = open(path, true, DEFAULT_BUSY_TIMEOUT)?;
    crate::fsutil::create_private_file(dest)?;
    let mut out = Connection::open(dest).map_err(sql_error)?;
    {
        // One step: every page copied inside one read transaction, so the copy is the log as
        // of one commit; appends by the writer go on meanwhile (WAL).
        let backup = rusqlite::backup::Backup::new(&source, &mut out).map_err(sql_error)?;
        copy_all_pages(&backup)?;
    }
    out.pragma_update(None, "journal_mode", "DELETE")
        .map_err(sql_error)?;
    out.close().map_err(|(_, e)| sql_error(e))?;
    crate::fsutil::sync_file(dest)
}

/// Runs an online backup as one step (-1: every page), retrying while another connection
/// holds a lock that keeps the step from starting (bounded).
fn copy_all_pages(backup: &rusqlite::backup::Backup<'_, '_>) -> Result<()> {
    use rusqlite::backup::StepResult;
    for attempt in 0..100u64 {
        match backup.step(-1).map_err(sql_error)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(Duration::from_millis(10 * (attempt + 1).min(10)));
            }
            _ => {}
        }
    }
    Err(Error::internal("online backup: the database stayed busy"))
}
