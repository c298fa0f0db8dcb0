//! Verifying the chain, the start-up tail check, and the audited recovery step.
//!
//! [`verify`] walks the log from genesis (or the signed retention checkpoint), recomputing
//! every record's MAC from its predecessor's, then compares the end with the signed head. Each
//! place where the chain breaks is a [`Break`] named by the first sequence number it affects:
//! an edited, inserted or moved record fails its MAC; a deleted one leaves a gap in the
//! sequence; records cut from the end leave the head pointing past the last record. After a
//! break the walk resynchronises on the stored MAC, so one break is reported once and the
//! rest of the log is still checked.
//!
//! When the writer finds the end of the log is not the one it signed, it appends an
//! `AuditTailMismatch` evidence record (see [`super::sqlite::append`]); the verifier reports
//! each such record as a break.
//!
//! [`recover`] is the only way past a break. It never deletes or rewrites a record: it appends
//! an `AuditRecover` record, MAC-chained like any other (so only a master-key holder can make
//! one), whose contexts list the breaks it accepts (`seq:N` or `seq:A-B`). The verifier then
//! reports those breaks as acknowledged rather than failing on them; a later edit anywhere
//! else is a new, unacknowledged break.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::anchor::{self, Anchor, Kind, Stored};
use super::chain::{ChainKeys, GENESIS_MAC};
use super::record::{AuditRecord, Outcome};
use super::sqlite::{self, SELECT_RECORD, TAIL_EVIDENCE_OPERATION, record_from_row, sql_error};
use crate::crypto::envelope::constant_time_eq;
use crate::domain::unix_now_micros;
use crate::error::{Error, Result};

/// The operation name of a recovery record.
pub const RECOVER_OPERATION: &str = "AuditRecover";
/// Most breaks listed in a report (the count is always exact).
const MAX_LISTED_BREAKS: usize = 1000;
/// Most break ranges one recovery record may acknowledge.
const MAX_ACKNOWLEDGED_RANGES: usize = 1000;
/// Records the start-up check re-verifies at the end of the log.
pub const TAIL_CHECK_RECORDS: u64 = 1024;

/// A place where the chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    /// The first record it affects (for a cut end: the first missing one).
    pub seq: u64,
    /// What is wrong, in words.
    pub reason: String,
    /// The recovery record that accepted it, if one did.
    pub acknowledged_by: Option<u64>,
    /// Whether it is about the end of the log (head), which a recovery cannot list.
    #[serde(skip)]
    at_head: bool,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// True when every record verified, except breaks a recovery record acknowledged.
    pub ok: bool,
    /// Records read.
    pub records_checked: u64,
    /// The first record of the first unacknowledged break; 0 when ok.
    pub first_bad_seq: u64,
    /// The last record's sequence number (or the checkpoint's when every record was pruned).
    pub head_seq: u64,
    /// The last record's MAC, hex: with `head_seq`, an anchor to keep off the machine and
    /// check later with `audit verify --anchor SEQ:MAC` (a keyed value: it reveals nothing).
    pub head_mac: String,
    /// Why the first unacknowledged break failed; empty when ok.
    pub reason: String,
    /// How many breaks there are, acknowledged or not.
    pub breaks_total: u64,
    /// The breaks, in order (at most 1000).
    pub breaks: Vec<Break>,
}

impl Break {
    /// Whether it is about the end of the log: the head does not name the last record.
    pub fn at_head(&self) -> bool {
        self.at_head
    }
}

impl VerifyReport {
    /// The breaks no recovery record acknowledged.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &Break> {
        self.breaks.iter().filter(|b| b.acknowledged_by.is_none())
    }
}

/// Where a walk starts.
enum Start {
    /// At genesis or the retention checkpoint: the whole log.
    Beginning,
    /// After this record, trusting its stored MAC (the start-up tail check).
    After(u64),
}

#[derive(Default)]
struct Walk {
    breaks: Vec<Break>,
    total: u64,
    /// (first, last, recovery seq) of every range a verified recovery record acknowledged.
    acks: Vec<(u64, u64, u64)>,
}

impl Walk {
    fn push(&mut self, seq: u64, reason: String, at_head: bool) {
        self.total += 1;
        if self.breaks.len() < MAX_LISTED_BREAKS {
            self.breaks.push(Break {
                seq,
                reason,
                acknowledged_by: None,
                at_head,
            });
        }
    }

    /// Notes the ranges a verified recovery record at `seq` acknowledges.
    fn note_recovery(&mut self, seq: u64, record: &AuditRecord) {
        for context in &record.contexts {
            if let Some((first, last)) = parse_range(context)
                && last < seq
            {
                self.acks.push((first, last, seq));
            }
        }
    }
}

fn parse_range(text: &str) -> Option<(u64, u64)> {
    let range = text.strip_prefix("seq:")?;
    match range.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => range.parse().ok().map(|n| (n, n)),
    }
}

/// Verifies the whole log in one read snapshot (its own read transaction), so appends by the
/// server or another process during the walk cannot look like a cut end.
pub fn verify(conn: &mut Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    let tx = conn.transaction().map_err(sql_error)?;
    verify_in(&tx, keys)
}

/// Verifies the whole log; the caller holds a transaction for a consistent snapshot.
pub fn verify_in(conn: &Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    walk(conn, keys, Start::Beginning)
}

/// The start-up check of the writer: whether the tail matches the signed head and the last
/// [`TAIL_CHECK_RECORDS`] records chain to it. Costs one HMAC per record checked (about a
/// millisecond), unlike a full verify, which grows with the log.
pub fn check_tail(conn: &mut Connection, keys: &ChainKeys) -> Result<VerifyReport> {
    let tx = conn.transaction().map_err(sql_error)?;
    let start = match sqlite::last_row(&tx)? {
        Some((last, _)) if last > TAIL_CHECK_RECORDS => Start::After(last - TAIL_CHECK_RECORDS),
        _ => Start::Beginning,
    };
    walk(&tx, keys, start)
}

fn walk(conn: &Connection, keys: &ChainKeys, start: Start) -> Result<VerifyReport> {
    let mut walk = Walk::default();
    // A checkpoint that does not verify is a break at the first record after it: that record
    // can no longer be tied to what was pruned.
    let mut checkpoint_invalid = false;
    // `expected` is the next sequence number; `prev` the MAC it must chain to. `None`: the
    // starting point is not trustworthy, so the first record is taken as it is.
    let (mut expected, mut prev, from): (u64, Option<Vec<u8>>, i64) = match start {
        Start::After(seq) => {
            let row: Option<(i64, Vec<u8>)> = conn
                .query_row(
                    "SELECT seq, mac FROM audit_events WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
                    [seq as i64],
                    |row| Ok((row.get(0)?, sqlite::bytes_at(row, 1))),
                )
                .optional()
                .map_err(sql_error)?;
            match row {
                Some((at, mac)) => (at as u64 + 1, Some(mac), at.saturating_add(1)),
                None => (seq + 1, None, seq as i64 + 1),
            }
        }
        Start::Beginning => match anchor::read(conn, keys, Kind::Checkpoint)? {
            Stored::Missing => (1, Some(GENESIS_MAC.to_vec()), i64::MIN),
            Stored::Valid(checkpoint) => {
                (checkpoint.seq + 1, Some(checkpoint.mac.to_vec()), i64::MIN)
            }
            Stored::Invalid => {
                checkpoint_invalid = true;
                (1, None, i64::MIN)
            }
        },
    };
    let mut stmt = conn
        .prepare(&format!("{SELECT_RECORD} WHERE seq >= ?1 ORDER BY seq"))
        .map_err(sql_error)?;
    let mut rows = stmt.query([from]).map_err(sql_error)?;
    let mut checked = 0u64;
    let mut last_seq: Option<u64> = None;
    while let Some(row) = rows.next().map_err(sql_error)? {
        checked += 1;
        let raw_seq: i64 = row.get(0).map_err(sql_error)?;
        let seq = u64::try_from(raw_seq).unwrap_or(0);
        // A MAC that is NULL or not a blob is as good as a wrong one.
        let mac = sqlite::bytes_at(row, 13);
        if seq < expected && prev.is_some() {
            // Below the checkpoint (or not a valid sequence number): not part of the chain.
            walk.push(
                seq.max(1),
                format!("record {raw_seq} lies before the start of the chain"),
                false,
            );
            continue;
        }
        if checkpoint_invalid && checked == 1 {
            walk.push(
                seq.max(1),
                format!(
                    "the retention checkpoint is invalid, so record {seq} cannot be tied to \
                     what was pruned"
                ),
                false,
            );
        }
        match &prev {
            None => {}
            Some(_) if seq != expected => walk.push(
                expected,
                if seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected} to {} are missing", seq - 1)
                },
                false,
            ),
            Some(prev_mac) => match record_from_row(row) {
                Err(_) => walk.push(seq, format!("record {seq} is malformed"), false),
                Ok((_, record, _)) => {
                    let expected_mac = keys.record_mac(&record, seq, prev_mac);
                    if !constant_time_eq(&expected_mac, &mac) {
                        walk.push(
                            seq,
                            format!("record {seq} was edited, inserted or moved (MAC mismatch)"),
                            false,
                        );
                    } else if record.operation == RECOVER_OPERATION {
                        walk.note_recovery(seq, &record);
                    } else if record.operation == TAIL_EVIDENCE_OPERATION {
                        walk.push(
                            seq,
                            format!(
                                "the end of the log was not the one the writer signed when it \
                                 appended record {seq}: {}",
                                record.detail
                            ),
                            false,
                        );
                    }
                }
            },
        }
        // Resynchronise on what is stored, so the next record is judged on its own.
        prev = Some(mac);
        expected = seq + 1;
        last_seq = Some(seq);
    }
    drop(rows);
    drop(stmt);
    if checkpoint_invalid && checked == 0 {
        walk.push(1, "the retention checkpoint is invalid".into(), false);
    }
    let tail_seq = last_seq.unwrap_or(expected - 1);
    check_head(
        conn,
        keys,
        &mut walk,
        last_seq.is_none(),
        prev.as_deref(),
        tail_seq,
    )?;
    let mut report = finish(walk, checked, tail_seq);
    report.head_mac = prev.map(hex::encode).unwrap_or_default();
    Ok(report)
}

/// Compares the end of the walk with the signed head.
fn check_head(
    conn: &Connection,
    keys: &ChainKeys,
    walk: &mut Walk,
    no_rows: bool,
    last_mac: Option<&[u8]>,
    tail_seq: u64,
) -> Result<()> {
    let empty = no_rows && tail_seq == 0;
    match anchor::read(conn, keys, Kind::Head)? {
        Stored::Missing if empty => {}
        Stored::Missing => walk.push(
            tail_seq + 1,
            "the signed head is missing, so records may have been cut from the end".into(),
            true,
        ),
        Stored::Invalid => walk.push(
            tail_seq + 1,
            "the signed head is invalid, so records may have been cut from the end".into(),
            true,
        ),
        Stored::Valid(head) if head.seq > tail_seq => walk.push(
            tail_seq + 1,
            if head.seq == tail_seq + 1 {
                format!(
                    "record {} is missing from the end (the signed head is at it)",
                    head.seq
                )
            } else {
                format!(
                    "records {} to {} are missing from the end (the signed head is at {})",
                    tail_seq + 1,
                    head.seq,
                    head.seq
                )
            },
            true,
        ),
        Stored::Valid(head) if head.seq < tail_seq => walk.push(
            head.seq + 1,
            format!(
                "records {} to {tail_seq} follow the signed head ({}): appended without the \
                 chain key",
                head.seq + 1,
                head.seq
            ),
            true,
        ),
        Stored::Valid(head) => {
            let matches = last_mac.is_none_or(|mac| constant_time_eq(mac, &head.mac));
            if !matches {
                walk.push(
                    head.seq,
                    format!("record {} is not the one the signed head names", head.seq),
                    true,
                );
            }
        }
    }
    Ok(())
}

fn finish(mut walk: Walk, checked: u64, head_seq: u64) -> VerifyReport {
    for b in &mut walk.breaks {
        b.acknowledged_by = walk
            .acks
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&b.seq))
            .map(|(_, _, by)| *by);
    }
    let listed_unacknowledged = walk
        .breaks
        .iter()
        .find(|b| b.acknowledged_by.is_none())
        .cloned();
    // Breaks past the listing cap are never acknowledged by this report: count them as bad.
    let unlisted = walk.total > walk.breaks.len() as u64;
    let first_bad = listed_unacknowledged.or_else(|| {
        unlisted.then(|| Break {
            seq: walk.breaks.last().map_or(0, |b| b.seq),
            reason: "more breaks than can be listed".into(),
            acknowledged_by: None,
            at_head: false,
        })
    });
    VerifyReport {
        ok: first_bad.is_none(),
        records_checked: checked,
        first_bad_seq: first_bad.as_ref().map_or(0, |b| b.seq),
        head_seq,
        head_mac: String::new(),
        reason: first_bad.map(|b| b.reason).unwrap_or_default(),
        breaks_total: walk.total,
        breaks: walk.breaks,
    }
}

/// Checks an anchor kept from an earlier verify (`head_seq`, `head_mac`): the record there
/// must still be the same one. This is what catches a rollback to an older copy of the log
/// (or a cut back to an older signed head), which the chain and the head alone cannot, as
/// both were valid once. Returns the problem, if any. An anchor at or before the retention
/// checkpoint is checked against it when it names exactly the checkpoint, and passes
/// otherwise (those records were pruned on purpose).
pub fn check_anchor(
    conn: &Connection,
    keys: &ChainKeys,
    seq: u64,
    mac: &[u8],
) -> Result<Option<String>> {
    if let Some(checkpoint) = sqlite::checkpoint(conn, keys)?
        && seq <= checkpoint.seq
    {
        return Ok(
            (seq == checkpoint.seq && !constant_time_eq(&checkpoint.mac, mac))
                .then(|| format!("the checkpoint at record {seq} is not the one the anchor names")),
        );
    }
    let stored: Option<Vec<u8>> = conn
        .query_row(
            "SELECT mac FROM audit_events WHERE seq = ?1",
            [i64::try_from(seq).unwrap_or(i64::MAX)],
            |row| Ok(sqlite::bytes_at(row, 0)),
        )
        .optional()
        .map_err(sql_error)?;
    Ok(match stored {
        None => Some(format!(
            "record {seq}, which the anchor names, is gone: the log was cut or rolled back"
        )),
        Some(stored) if !constant_time_eq(&stored, mac) => Some(format!(
            "record {seq} is not the one the anchor names: the log was rolled back or rewritten"
        )),
        Some(_) => None,
    })
}

/// What [`recover`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovery {
    /// The report the recovery acted on.
    pub report: VerifyReport,
    /// The recovery record's sequence number; 0 when there was nothing to recover.
    pub recovery_seq: u64,
}

/// The audited recovery step: in one write transaction, verifies the whole log and, if it has
/// unacknowledged breaks, appends an `AuditRecover` record by `caller` that acknowledges them
/// and re-signs the head on it. Deletes and rewrites nothing. Refuses (and changes nothing)
/// when the breaks are too scattered to list in one record: then the log is beyond repair
/// and `audit recover --new-log` moves it aside (kept as evidence) and begins a new one.
pub fn recover(conn: &mut Connection, keys: &ChainKeys, caller: &str) -> Result<Recovery> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error)?;
    let report = verify_in(&tx, keys)?;
    if report.ok {
        return Ok(Recovery {
            report,
            recovery_seq: 0,
        });
    }
    if report.breaks_total > report.breaks.len() as u64 {
        return Err(Error::FailedPrecondition(format!(
            "the log has {} breaks, more than one recovery can list: start a new log \
             with `audit recover --new-log` (the old one is kept as evidence)",
            report.breaks_total
        )));
    }
    let tail = sqlite::actual_tail(&tx, keys)?;
    let ranges = acknowledged_ranges(report.unacknowledged().filter(|b| !b.at_head));
    if ranges.len() > MAX_ACKNOWLEDGED_RANGES {
        return Err(Error::FailedPrecondition(format!(
            "the log has {} separate breaks, more than one recovery can list: start a new \
             log with `audit recover --new-log` (the old one is kept as evidence)",
            ranges.len()
        )));
    }
    let unacknowledged: Vec<&Break> = report.unacknowledged().collect();
    let mut detail = format!(
        "accepted the log as it stands: {} break(s), first at record {}: {}",
        unacknowledged.len(),
        report.first_bad_seq,
        report.reason
    );
    if let Some(head) = unacknowledged.iter().find(|b| b.at_head) {
        detail.push_str(&format!("; at the end: {}", head.reason));
    }
    let record = AuditRecord {
        time_micros: unix_now_micros(),
        request_id: String::new(),
        caller: caller.to_owned(),
        peer: "local".into(),
        tenant_id: String::new(),
        operation: RECOVER_OPERATION.into(),
        contexts: ranges,
        key_versions: Vec::new(),
        item_count: u32::try_from(unacknowledged.len()).unwrap_or(u32::MAX),
        outcome: Outcome::Ok,
        aad_fingerprint: String::new(),
        detail,
    };
    let seq = tail.0 + 1;
    let mac = keys.record_mac(&record, seq, &tail.1);
    sqlite::insert(&tx, seq, &record, &mac).map_err(sql_error)?;
    anchor::write(&tx, keys, Kind::Head, &Anchor { seq, mac })?;
    tx.commit().map_err(sql_error)?;
    Ok(Recovery {
        report,
        recovery_seq: seq,
    })
}

/// Compresses break sequence numbers into `seq:N` / `seq:A-B` contexts.
fn acknowledged_ranges<'a>(breaks: impl Iterator<Item = &'a Break>) -> Vec<String> {
    let mut seqs: Vec<u64> = breaks.map(|b| b.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for seq in seqs {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs.into_iter()
        .map(|(a, b)| {
            if a == b {
                format!("seq:{a}")
            } else {
                format!("seq:{a}-{b}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::secret::SecretKey;

    fn record(i: u32) -> AuditRecord {
        AuditRecord {
            time_micros: 1_000 + i64::from(i),
            request_id: format!("r{i}"),
            caller: "token:t".into(),
            peer: "local".into(),
            tenant_id: "acme".into(),
            operation: "Encrypt".into(),
            contexts: vec!["ctx".into()],
            key_versions: vec![1],
            item_count: 1,
            outcome: Outcome::Ok,
            aad_fingerprint: String::new(),
            detail: String::new(),
        }
    }

    /// A log of `n` records in a temporary directory.
    fn log(n: u32) -> (tempfile::TempDir, Connection, ChainKeys) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = sqlite::open(
            &dir.path().join("audit.db"),
            false,
            sqlite::DEFAULT_BUSY_TIMEOUT,
        )
        .unwrap();
        let keys = ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap();
        let records: Vec<AuditRecord> = (1..=n).map(record).collect();
        // Two batches, so the head moves more than once.
        let (a, b) = records.split_at(records.len() / 2);
        sqlite::append(&mut conn, &keys, a).unwrap();
        sqlite::append(&mut conn, &keys, b).unwrap();
        (dir, conn, keys)
    }

    fn first_bad(conn: &mut Connection, keys: &ChainKeys) -> u64 {
        let report = verify(conn, keys).unwrap();
        assert_eq!(report.ok, report.first_bad_seq == 0, "{report:?}");
        report.first_bad_seq
    }

    #[test]
    fn a_whole_log_verifies() {
        let (_dir, mut conn, keys) = log(10);
        let report = verify(&mut conn, &keys).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!((report.records_checked, report.head_seq), (10, 10));
        assert!(check_tail(&mut conn, &keys).unwrap().ok);
    }

    #[test]
    fn each_kind_of_tampering_names_its_first_record() {
        let cases: [(&str, u64); 6] = [
            ("UPDATE audit_events SET tenant_id = 'x' WHERE seq = 4", 4),
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
        ];
        for (sql, bad) in cases {
            let (_dir, mut conn, keys) = log(10);
            conn.execute_batch(sql).unwrap();
            assert_eq!(first_bad(&mut conn, &keys), bad, "{sql}");
        }
    }

    #[test]
    fn a_cut_tail_gets_evidence_and_recovery_acknowledges_it_without_deleting() {
        let (_dir, mut conn, keys) = log(10);
        conn.execute("DELETE FROM audit_events WHERE seq = 10", [])
            .unwrap();
        assert!(!check_tail(&mut conn, &keys).unwrap().ok);
        // The next append records the cut before its own record.
        let first = sqlite::append(&mut conn, &keys, [&record(11)]).unwrap();
        assert_eq!(first, 11);
        let report = verify(&mut conn, &keys).unwrap();
        assert_eq!(report.first_bad_seq, 10, "{report:?}");
        assert!(
            report.reason.contains("signed head is at record 10"),
            "{report:?}"
        );
        let recovery = recover(&mut conn, &keys, "cli:test").unwrap();
        assert_eq!(recovery.recovery_seq, 12);
        let report = verify(&mut conn, &keys).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.breaks[0].acknowledged_by, Some(12));
        // 9 kept, the evidence, record 11, the recovery: nothing was deleted.
        assert_eq!(sqlite::count(&conn).unwrap(), 12);
        // A later edit of a record the recovery did not accept is a new break.
        conn.execute("UPDATE audit_events SET detail = 'x' WHERE seq = 3", [])
            .unwrap();
        assert_eq!(first_bad(&mut conn, &keys), 3);
        // Nothing to recover on a whole log.
        let (_dir, mut conn, keys) = log(3);
        assert_eq!(
            recover(&mut conn, &keys, "cli:test").unwrap().recovery_seq,
            0
        );
    }

    #[test]
    fn ranges_compress_and_parse() {
        let breaks: Vec<Break> = [3, 4, 5, 9, 12, 13]
            .into_iter()
            .map(|seq| Break {
                seq,
                reason: String::new(),
                acknowledged_by: None,
                at_head: false,
            })
            .collect();
        let ranges = acknowledged_ranges(breaks.iter());
        assert_eq!(ranges, ["seq:3-5", "seq:9", "seq:12-13"]);
        assert_eq!(parse_range("seq:3-5"), Some((3, 5)));
        assert_eq!(parse_range("seq:9"), Some((9, 9)));
        assert_eq!(parse_range("ctx"), None);
    }
}
