//! `audit.db`: the audit records in sequence order, each with its chain MAC.
//!
//! Appends read the chain head inside the same write transaction (BEGIN IMMEDIATE), so
//! several processes (the server and the `rotate` command) can append to one log and the
//! chain stays whole. Queries and verification use their own read connections.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use super::record::{AuditRecord, outcome_from_str};
use crate::crypto::envelope::constant_time_eq;
use crate::error::{Error, Result};

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
);
";

fn sql_error(e: rusqlite::Error) -> Error {
    Error::Unavailable(format!("audit store: {e}"))
}

/// Opens `audit.db` (mode 0600), in WAL mode, creating the schema. `full_sync` selects
/// `synchronous=FULL` (an fsync per commit) over `NORMAL` (durable across a process crash,
/// not a power loss).
pub fn open(path: &Path, full_sync: bool) -> Result<Connection> {
    crate::fsutil::create_private_file(path)?;
    let conn = Connection::open(path).map_err(sql_error)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_error)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_error)?;
    conn.pragma_update(
        None,
        "synchronous",
        if full_sync { "FULL" } else { "NORMAL" },
    )
    .map_err(sql_error)?;
    conn.execute_batch(SCHEMA).map_err(sql_error)?;
    Ok(conn)
}

/// Appends records as one transaction, chained after the current head. Returns their
/// sequence numbers. Nothing is written if anything fails.
pub fn append(
    conn: &mut Connection,
    keys: &ChainKeys,
    records: &[AuditRecord],
) -> Result<Vec<u64>> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let (mut seq, mut prev) = head(&tx)?;
    let mut seqs = Vec::with_capacity(records.len());
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO audit_events (seq, time_us, request_id, caller, peer, tenant_id, \
                 operation, contexts, key_versions, item_count, outcome, aad_fingerprint, \
                 detail, mac) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)",
            )
            .map_err(sql_error)?;
        for record in records {
            seq += 1;
            let mac = keys.record_mac(record, seq, &prev);
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
                mac.as_slice(),
            ])
            .map_err(sql_error)?;
            prev = mac;
            seqs.push(seq);
        }
    }
    tx.commit().map_err(sql_error)?;
    Ok(seqs)
}

/// The last record's sequence number and MAC (or the checkpoint's, or genesis).
fn head(conn: &Connection) -> Result<(u64, [u8; MAC_LEN])> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(sql_error)?;
    match last {
        Some((seq, mac)) => Ok((seq as u64, mac.try_into().unwrap_or(GENESIS_MAC))),
        None => Ok(checkpoint(conn)?.map_or((0, GENESIS_MAC), |c| (c.seq, c.mac))),
    }
}

/// A retention checkpoint: the sequence number and MAC of the last pruned record, signed so
/// it cannot be moved.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint {
    /// Last pruned sequence number.
    pub seq: u64,
    /// Its MAC (the `prev_mac` of the first kept record).
    pub mac: [u8; MAC_LEN],
}

fn checkpoint(conn: &Connection) -> Result<Option<Checkpoint>> {
    let value: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM audit_meta WHERE name = 'checkpoint'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql_error)?;
    Ok(value.and_then(|v| {
        if v.len() != 8 + MAC_LEN + MAC_LEN {
            return None;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&v[..8]);
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&v[8..8 + MAC_LEN]);
        Some(Checkpoint {
            seq: u64::from_be_bytes(seq),
            mac,
        })
    }))
}

const CHECKPOINT_LABEL: &[u8] = b"tenant-kms/v1/audit-checkpoint";

fn checkpoint_signature(keys: &ChainKeys, seq: u64, mac: &[u8]) -> [u8; MAC_LEN] {
    let mut bytes = Vec::with_capacity(CHECKPOINT_LABEL.len() + 8 + MAC_LEN + 4);
    crate::crypto::labels::push_length_prefixed(&mut bytes, CHECKPOINT_LABEL);
    bytes.extend_from_slice(&seq.to_be_bytes());
    bytes.extend_from_slice(mac);
    keys.sign(&bytes)
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<(u64, AuditRecord, Vec<u8>)> {
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

const SELECT_RECORD: &str = "SELECT seq, time_us, request_id, caller, peer, tenant_id, operation, \
     contexts, key_versions, item_count, outcome, aad_fingerprint, detail, mac FROM audit_events";

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// True when every record verified.
    pub ok: bool,
    /// Records checked (up to and including the first bad one).
    pub records_checked: u64,
    /// The first record that was edited, inserted, reordered or is missing; 0 when ok.
    pub first_bad_seq: u64,
    /// The last verified sequence number (the chain head when ok).
    pub head_seq: u64,
    /// Why the first bad record failed.
    pub reason: String,
}

/// Walks the whole chain from genesis (or the signed retention checkpoint) and reports the
/// first record whose sequence number or MAC does not follow from its predecessor.
pub fn verify(conn: &Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    let (mut expected_seq, mut prev) = match checkpoint(conn)? {
        None => (1, GENESIS_MAC.to_vec()),
        Some(cp) => {
            let signature: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT value FROM audit_meta WHERE name = 'checkpoint'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql_error)?;
            let signature = signature.unwrap_or_default();
            let expected = checkpoint_signature(keys, cp.seq, &cp.mac);
            if !constant_time_eq(&signature[8 + MAC_LEN..], &expected) {
                return Ok(VerifyReport {
                    ok: false,
                    records_checked: 0,
                    first_bad_seq: cp.seq + 1,
                    head_seq: 0,
                    reason: "the retention checkpoint's signature is invalid".into(),
                });
            }
            (cp.seq + 1, cp.mac.to_vec())
        }
    };
    let mut stmt = conn
        .prepare(&format!("{SELECT_RECORD} ORDER BY seq"))
        .map_err(sql_error)?;
    let mut rows = stmt.query([]).map_err(sql_error)?;
    let mut checked = 0;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => return Err(sql_error(e)),
        };
        checked += 1;
        let bad = |reason: String, seq: u64| VerifyReport {
            ok: false,
            records_checked: checked,
            first_bad_seq: seq,
            head_seq: expected_seq - 1,
            reason,
        };
        let (seq, record, mac) = match record_from_row(row) {
            Ok(parsed) => parsed,
            Err(_) => {
                let seq: i64 = row.get(0).unwrap_or(0);
                return Ok(bad("malformed record".into(), seq as u64));
            }
        };
        if seq != expected_seq {
            return Ok(bad(
                format!("record {expected_seq} is missing (found {seq} next)"),
                expected_seq.min(seq),
            ));
        }
        let expected_mac = keys.record_mac(&record, seq, &prev);
        if !constant_time_eq(&expected_mac, &mac) {
            return Ok(bad(
                format!("record {seq} was edited, inserted or moved (MAC mismatch)"),
                seq,
            ));
        }
        prev = mac;
        expected_seq += 1;
    }
    Ok(VerifyReport {
        ok: true,
        records_checked: checked,
        first_bad_seq: 0,
        head_seq: expected_seq - 1,
        reason: String::new(),
    })
}

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

/// Removes records older than `before_micros`, after verifying them, and stores a signed
/// checkpoint of the last removed record so the rest still verifies. Returns how many were
/// removed. Refuses to prune a chain that does not verify.
pub fn prune(conn: &mut Connection, keys: &ChainKeys, before_micros: i64) -> Result<u64> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let report = verify(&tx, keys)?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "the audit chain does not verify ({}); not pruning",
            report.reason
        )));
    }
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, mac FROM audit_events WHERE time_us < ?1 ORDER BY seq DESC LIMIT 1",
            [before_micros],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .map_err(sql_error)?;
    let Some((seq, mac)) = last else {
        return Ok(0);
    };
    let removed = tx
        .execute("DELETE FROM audit_events WHERE seq <= ?1", [seq])
        .map_err(sql_error)? as u64;
    let mut value = Vec::with_capacity(8 + 2 * MAC_LEN);
    value.extend_from_slice(&(seq as u64).to_be_bytes());
    value.extend_from_slice(&mac);
    value.extend_from_slice(&checkpoint_signature(keys, seq as u64, &mac));
    tx.execute(
        "INSERT OR REPLACE INTO audit_meta (name, value) VALUES ('checkpoint', ?1)",
        [value],
    )
    .map_err(sql_error)?;
    tx.commit().map_err(sql_error)?;
    Ok(removed)
}

/// The chain head: the last record's sequence number and MAC (the checkpoint's, or 0 and the
/// genesis MAC, when there is no record). A backup manifest names it, so a restored log can be
/// checked to be exactly the one backed up.
pub fn chain_head(conn: &Connection) -> Result<(u64, [u8; MAC_LEN])> {
    head(conn)
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
    let source = open(path, true)?;
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
