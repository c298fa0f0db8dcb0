//! Verifying the chain, the start-up tail check, and the audited recovery step: pure
//! functions over what a log backend read, so they are the same for every backend and
//! unit-testable with rows in memory.
//!
//! [`walk`] walks the rows from genesis (or the signed retention checkpoint), recomputing
//! every record's MAC from its predecessor's, then compares the end with the signed head. Each
//! place where the chain breaks is a [`Break`] named by the first sequence number it affects:
//! an edited, inserted or moved record fails its MAC; a deleted one leaves a gap in the
//! sequence; records cut from the end leave the head pointing past the last record. After a
//! break the walk resynchronises on the stored MAC, so one break is reported once and the
//! rest of the log is still checked.
//!
//! When the writer finds the end of the log is not the one it signed ([`writable_tail`]), the
//! backend appends a [`tail_evidence`] record (`AuditTailMismatch`) before the batch; the
//! verifier reports each such record as a break.
//!
//! Recovery ([`recovery_record`]) is the only way past a break. It never deletes or rewrites a
//! record: it is an `AuditRecover` record, MAC-chained like any other (so only a master-key
//! holder can make one), whose contexts list the breaks it accepts (`seq:N` or `seq:A-B`). The
//! verifier then reports those breaks as acknowledged rather than failing on them; a later
//! edit anywhere else is a new, unacknowledged break.

use super::anchor::{Anchor, Stored};
use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use super::operation::{Operation, Task};
use super::record::{AuditRecord, Outcome};
use crate::crypto::envelope::constant_time_eq;
use crate::error::{Error, Result};

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

/// One record as the log stores it, before anything is trusted: the raw sequence number, the
/// record if its columns decode, and the MAC bytes whatever their length. An intruder can
/// leave anything in a row; the verifier reports it as a break instead of stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// The sequence number as stored (may be negative or zero in a tampered log).
    pub seq: i64,
    /// The record, or `None` when a column does not decode.
    pub record: Option<AuditRecord>,
    /// The stored MAC (empty when it is not a byte string at all).
    pub mac: Vec<u8>,
}

/// Where a walk starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkStart {
    /// At genesis or at the retention checkpoint, as the log holds it: the whole log. The rows
    /// are all of them, in sequence order.
    Beginning(Stored),
    /// After a record, trusting its stored MAC (the start-up tail check): `next_seq` is the
    /// first sequence number expected and `prev_mac` the MAC it chains to (`None`: no record
    /// there, so the first row is taken as it is). The rows are those from `next_seq` on.
    After {
        /// The first sequence number expected.
        next_seq: u64,
        /// The MAC the first row chains to, if known.
        prev_mac: Option<Vec<u8>>,
    },
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

/// The chain walk: recomputes every row's MAC from its predecessor's, from `start`, over
/// `rows` in sequence order, then compares the end with the signed `head`. Pure (no I/O): the
/// caller reads the rows, the checkpoint and the head in one consistent snapshot. A row error
/// (the backend failing to read) ends the walk with that error.
pub fn walk(
    keys: &ChainKeys,
    start: WalkStart,
    rows: impl IntoIterator<Item = Result<StoredRow>>,
    head: Stored,
) -> Result<VerifyReport> {
    let mut walk = Walk::default();
    // A checkpoint that does not verify is a break at the first record after it: that record
    // can no longer be tied to what was pruned.
    let mut checkpoint_invalid = false;
    // `expected` is the next sequence number; `prev` the MAC it must chain to. `None`: the
    // starting point is not trustworthy, so the first record is taken as it is.
    let (mut expected, mut prev): (u64, Option<Vec<u8>>) = match start {
        WalkStart::After { next_seq, prev_mac } => (next_seq, prev_mac),
        WalkStart::Beginning(Stored::Missing) => (1, Some(GENESIS_MAC.to_vec())),
        WalkStart::Beginning(Stored::Valid(checkpoint)) => {
            (checkpoint.seq + 1, Some(checkpoint.mac.to_vec()))
        }
        WalkStart::Beginning(Stored::Invalid) => {
            checkpoint_invalid = true;
            (1, None)
        }
    };
    let mut checked = 0u64;
    let mut last_seq: Option<u64> = None;
    for row in rows {
        let StoredRow {
            seq: raw_seq,
            record,
            mac,
        } = row?;
        checked += 1;
        let seq = u64::try_from(raw_seq).unwrap_or(0);
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
        match (&prev, record) {
            (None, _) => {}
            (Some(_), _) if seq != expected => walk.push(
                expected,
                if seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected} to {} are missing", seq - 1)
                },
                false,
            ),
            (Some(_), None) => walk.push(seq, format!("record {seq} is malformed"), false),
            (Some(prev_mac), Some(record)) => {
                let expected_mac = keys.record_mac(&record, seq, prev_mac);
                if !constant_time_eq(&expected_mac, &mac) {
                    walk.push(
                        seq,
                        format!("record {seq} was edited, inserted or moved (MAC mismatch)"),
                        false,
                    );
                } else if Operation::Task(Task::AuditRecover).is(&record.operation) {
                    walk.note_recovery(seq, &record);
                } else if Operation::Task(Task::AuditTailMismatch).is(&record.operation) {
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
        }
        // Resynchronise on what is stored, so the next record is judged on its own.
        prev = Some(mac);
        expected = seq + 1;
        last_seq = Some(seq);
    }
    if checkpoint_invalid && checked == 0 {
        walk.push(1, "the retention checkpoint is invalid".into(), false);
    }
    let tail_seq = last_seq.unwrap_or(expected - 1);
    check_head(
        head,
        &mut walk,
        last_seq.is_none(),
        prev.as_deref(),
        tail_seq,
    );
    let mut report = finish(walk, checked, tail_seq);
    report.head_mac = prev.map(hex::encode).unwrap_or_default();
    Ok(report)
}

/// Compares the end of the walk with the signed head.
fn check_head(
    head: Stored,
    walk: &mut Walk,
    no_rows: bool,
    last_mac: Option<&[u8]>,
    tail_seq: u64,
) {
    let empty = no_rows && tail_seq == 0;
    match head {
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

/// The whole-log report of a log with one chain per node (PostgreSQL) from the registry's
/// problems ([`super::registry::check`]) and each chain's own report, `own` naming the chain
/// whose head the report gives (the anchor to keep for that node). Every break's reason
/// names its chain (`chain NODE: …`) or the registry (`the chain registry: …`, reported at
/// record 1: no record of any chain can be trusted to be complete); the first unacknowledged
/// one, in registry then chain order, is the report's.
pub fn combine(
    registry: Vec<String>,
    chains: Vec<(String, VerifyReport)>,
    own: &str,
) -> VerifyReport {
    let mut combined = Walk::default();
    let mut checked = 0u64;
    for problem in registry {
        combined.push(1, format!("the chain registry: {problem}"), false);
    }
    let mut first_bad: Option<(u64, String)> =
        combined.breaks.first().map(|b| (b.seq, b.reason.clone()));
    let (mut head_seq, mut head_mac) = (0, String::new());
    for (chain, report) in chains {
        checked += report.records_checked;
        if chain == own {
            head_seq = report.head_seq;
            head_mac = report.head_mac.clone();
        }
        if first_bad.is_none() && !report.ok {
            first_bad = Some((
                report.first_bad_seq,
                format!("chain {chain}: {}", report.reason),
            ));
        }
        combined.total += report.breaks_total - report.breaks.len() as u64;
        for mut b in report.breaks {
            b.reason = format!("chain {chain}: {}", b.reason);
            combined.total += 1;
            if combined.breaks.len() < MAX_LISTED_BREAKS {
                combined.breaks.push(b);
            }
        }
    }
    VerifyReport {
        ok: first_bad.is_none(),
        records_checked: checked,
        first_bad_seq: first_bad.as_ref().map_or(0, |(seq, _)| *seq),
        head_seq,
        head_mac,
        reason: first_bad.map(|(_, reason)| reason).unwrap_or_default(),
        breaks_total: combined.total,
        breaks: combined.breaks,
    }
}

/// Checks an anchor kept from an earlier verify (`seq`, `mac`): the record there must still
/// be the same one. This is what catches a rollback to an older copy of the log (or a cut
/// back to an older signed head), which the chain and the head alone cannot, as both were
/// valid once. `checkpoint` is the log's valid retention checkpoint, `stored` the MAC of the
/// record at `seq` as the log holds it (`None`: no such record). Returns the problem, if any.
/// An anchor at or before the retention checkpoint is checked against it when it names
/// exactly the checkpoint, and passes otherwise (those records were pruned on purpose).
pub fn judge_anchor(
    checkpoint: Option<Anchor>,
    stored: Option<&[u8]>,
    seq: u64,
    mac: &[u8],
) -> Option<String> {
    if let Some(checkpoint) = checkpoint
        && seq <= checkpoint.seq
    {
        return (seq == checkpoint.seq && !constant_time_eq(&checkpoint.mac, mac))
            .then(|| format!("the checkpoint at record {seq} is not the one the anchor names"));
    }
    match stored {
        None => Some(format!(
            "record {seq}, which the anchor names, is gone: the log was cut or rolled back"
        )),
        Some(stored) if !constant_time_eq(stored, mac) => Some(format!(
            "record {seq} is not the one the anchor names: the log was rolled back or rewritten"
        )),
        Some(_) => None,
    }
}

/// How the end of the log differs from its signed head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailProblem(pub String);

/// The position new records chain after: the last record (`last`: its sequence number and
/// stored MAC), or the retention checkpoint when every record was pruned, or genesis for a new
/// log, if it equals the signed `head` written by the last append (by any process);
/// otherwise how they differ. Pure: the backend reads the three in its write transaction.
pub fn writable_tail(
    last: Option<(u64, &[u8])>,
    checkpoint: Stored,
    head: Stored,
) -> std::result::Result<Anchor, TailProblem> {
    let problem = |text: String| Err(TailProblem(text));
    let tail = match last {
        Some((seq, mac)) => match <[u8; MAC_LEN]>::try_from(mac) {
            Ok(mac) => Some(Anchor { seq, mac }),
            Err(_) => return problem(format!("record {seq} has a malformed MAC")),
        },
        None => match checkpoint {
            Stored::Missing => None,
            Stored::Valid(checkpoint) => Some(checkpoint),
            Stored::Invalid => return problem("the retention checkpoint is invalid".into()),
        },
    };
    match (head, tail) {
        (Stored::Missing, None) => Ok(Anchor::GENESIS),
        // A head signed at genesis (an empty append to a new log, or a chain registered
        // before its first record) names exactly an empty log.
        (Stored::Valid(head), None) if head == Anchor::GENESIS => Ok(Anchor::GENESIS),
        (Stored::Valid(head), Some(tail)) if head == tail => Ok(tail),
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

/// What is actually at the end of the log, whatever the head says: the last record (its MAC
/// as stored, whatever its length), else a valid checkpoint, else genesis.
pub fn actual_tail(last: Option<(u64, Vec<u8>)>, checkpoint: Stored) -> (u64, Vec<u8>) {
    match (last, checkpoint) {
        (Some(row), _) => row,
        (None, Stored::Valid(checkpoint)) => (checkpoint.seq, checkpoint.mac.to_vec()),
        (None, Stored::Missing | Stored::Invalid) => (0, GENESIS_MAC.to_vec()),
    }
}

/// The evidence record the writer appends when the end of the log is not the one it signed
/// (see [`writable_tail`]); the verifier reports it as a break.
pub fn tail_evidence(problem: &TailProblem) -> AuditRecord {
    AuditRecord::local(Task::AuditTailMismatch, "audit-writer", Outcome::Internal)
        .items(0)
        .detail(problem.0.clone())
}

/// What [`recovery_record`] and a log's `recover` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovery {
    /// The report the recovery acted on.
    pub report: VerifyReport,
    /// The recovery record's sequence number; 0 when there was nothing to recover.
    pub recovery_seq: u64,
}

/// The recovery record by `caller` that acknowledges the unacknowledged breaks of `report`
/// (a whole-log verify); `None` when the log verifies. Refuses when the breaks are too
/// scattered to list in one record: then the log is beyond repair and
/// `audit recover --new-log` moves it aside (kept as evidence) and begins a new one. The backend appends the record after
/// the actual tail and re-signs the head on it, in the transaction that verified.
pub fn recovery_record(report: &VerifyReport, caller: &str) -> Result<Option<AuditRecord>> {
    if report.ok {
        return Ok(None);
    }
    if report.breaks_total > report.breaks.len() as u64 {
        return Err(Error::FailedPrecondition(format!(
            "the log has {} breaks, more than one recovery can list: start a new log \
             with `audit recover --new-log` (the old one is kept as evidence)",
            report.breaks_total
        )));
    }
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
    Ok(Some(
        AuditRecord::local(Task::AuditRecover, caller, Outcome::Ok)
            .contexts(ranges)
            .items(u32::try_from(unacknowledged.len()).unwrap_or(u32::MAX))
            .detail(detail),
    ))
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
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::anchor::{self, Kind};
    use crate::audit::operation::Rpc;
    use crate::crypto::secret::SecretKey;

    /// A record numbered `i` (time, request id), otherwise like every other.
    pub(crate) fn record(i: u32) -> AuditRecord {
        AuditRecord::new(Rpc::Encrypt, "token:t", "local", Outcome::Ok)
            .at(1_000 + i64::from(i))
            .request_id(format!("r{i}"))
            .tenant("acme")
            .contexts(vec!["ctx".into()])
            .versions(vec![1])
    }

    /// A log in memory: its rows and its signed head.
    struct Log {
        keys: ChainKeys,
        rows: Vec<StoredRow>,
        head: Stored,
    }

    impl Log {
        fn new(n: u32) -> Self {
            let mut log = Log {
                keys: ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap(),
                rows: Vec::new(),
                head: Stored::Missing,
            };
            for i in 1..=n {
                log.append(record(i));
            }
            log
        }

        /// Appends as a backend does: after the last row, moving the signed head.
        fn append(&mut self, record: AuditRecord) -> u64 {
            let (seq, prev) = actual_tail(
                self.rows.last().map(|r| (r.seq as u64, r.mac.clone())),
                Stored::Missing,
            );
            let seq = seq + 1;
            let mac = self.keys.record_mac(&record, seq, &prev);
            self.rows.push(StoredRow {
                seq: seq as i64,
                record: Some(record),
                mac: mac.to_vec(),
            });
            self.sign_head(Anchor { seq, mac });
            seq
        }

        fn sign_head(&mut self, head: Anchor) {
            let value = anchor::encode(&self.keys, Kind::Head, &head);
            self.head = anchor::decode(&self.keys, Kind::Head, Some(&value));
        }

        fn verify(&self) -> VerifyReport {
            self.verify_from(WalkStart::Beginning(Stored::Missing))
        }

        fn verify_from(&self, start: WalkStart) -> VerifyReport {
            let report = walk(
                &self.keys,
                start,
                self.rows.iter().cloned().map(Ok),
                self.head,
            )
            .unwrap();
            assert_eq!(report.ok, report.first_bad_seq == 0, "{report:?}");
            report
        }

        fn index(&self, seq: i64) -> usize {
            self.rows.iter().position(|r| r.seq == seq).unwrap()
        }
    }

    #[test]
    fn a_whole_log_verifies() {
        let log = Log::new(10);
        let report = log.verify();
        assert!(report.ok, "{report:?}");
        assert_eq!((report.records_checked, report.head_seq), (10, 10));
        assert_eq!(report.head_mac, hex::encode(&log.rows[9].mac));
        assert!(Log::new(0).verify().ok);
    }

    #[test]
    fn each_kind_of_tampering_names_its_first_record() {
        type Tamper = fn(&mut Log);
        let cases: [(&str, Tamper, u64); 10] = [
            (
                "edit",
                |log| {
                    let i = log.index(4);
                    log.rows[i].record.as_mut().unwrap().tenant_id = "x".into();
                },
                4,
            ),
            ("edit the MAC", |log| log.rows[3].mac[0] ^= 1, 4),
            ("malformed", |log| log.rows[3].record = None, 4),
            (
                "delete",
                |log| {
                    log.rows.remove(3);
                },
                4,
            ),
            (
                "delete the first",
                |log| {
                    log.rows.remove(0);
                },
                1,
            ),
            (
                "insert",
                |log| {
                    // A forged record at 5, the rest renumbered after it.
                    for row in &mut log.rows[4..] {
                        row.seq += 1;
                    }
                    let forged = StoredRow {
                        seq: 5,
                        record: Some(record(99)),
                        mac: vec![7; MAC_LEN],
                    };
                    log.rows.insert(4, forged);
                },
                5,
            ),
            (
                "reorder",
                |log| {
                    log.rows.swap(3, 4);
                    log.rows[3].seq = 4;
                    log.rows[4].seq = 5;
                },
                4,
            ),
            ("truncate", |log| log.rows.truncate(8), 9),
            ("drop the head", |log| log.head = Stored::Missing, 11),
            (
                "append without the key",
                |log| {
                    let forged = StoredRow {
                        seq: 11,
                        record: Some(record(11)),
                        mac: vec![7; MAC_LEN],
                    };
                    log.rows.push(forged);
                },
                11,
            ),
        ];
        for (what, tamper, bad) in cases {
            let mut log = Log::new(10);
            tamper(&mut log);
            assert_eq!(log.verify().first_bad_seq, bad, "{what}");
        }
    }

    #[test]
    fn a_cut_end_is_caught_by_the_head_and_a_rollback_by_a_kept_anchor() {
        let mut log = Log::new(10);
        let kept = (10u64, log.rows[9].mac.clone());
        // Cut the end and re-sign the head on what is left: only the master key can do that,
        // so it stands for a rollback to an older copy of the log.
        log.rows.truncate(8);
        let mac = <[u8; MAC_LEN]>::try_from(log.rows[7].mac.as_slice()).unwrap();
        log.sign_head(Anchor { seq: 8, mac });
        assert!(log.verify().ok);
        let stored = log
            .rows
            .iter()
            .find(|r| r.seq == 10)
            .map(|r| r.mac.as_slice());
        assert!(judge_anchor(None, stored, kept.0, &kept.1).is_some());
        // The same anchor on the whole log passes; a wrong MAC does not.
        let log = Log::new(10);
        let at = |seq: i64| {
            log.rows
                .iter()
                .find(|r| r.seq == seq)
                .map(|r| r.mac.as_slice())
        };
        assert_eq!(judge_anchor(None, at(5), 5, &log.rows[4].mac), None);
        assert!(judge_anchor(None, at(5), 5, &[0; MAC_LEN]).is_some());
    }

    #[test]
    fn a_checkpoint_starts_the_chain_and_an_invalid_one_is_a_break() {
        let mut log = Log::new(10);
        let mac = <[u8; MAC_LEN]>::try_from(log.rows[2].mac.as_slice()).unwrap();
        let checkpoint = Anchor { seq: 3, mac };
        log.rows.drain(..3);
        let report = log.verify_from(WalkStart::Beginning(Stored::Valid(checkpoint)));
        assert!(report.ok, "{report:?}");
        assert_eq!(report.records_checked, 7);
        // An anchor at the checkpoint is checked against it; one before it passes.
        assert_eq!(judge_anchor(Some(checkpoint), None, 3, &mac), None);
        assert!(judge_anchor(Some(checkpoint), None, 3, &[0; MAC_LEN]).is_some());
        assert_eq!(judge_anchor(Some(checkpoint), None, 2, &[0; MAC_LEN]), None);
        // A checkpoint that does not verify cannot tie record 4 to what was pruned.
        let report = log.verify_from(WalkStart::Beginning(Stored::Invalid));
        assert_eq!(report.first_bad_seq, 4, "{report:?}");
        // Without the checkpoint, the first kept record has nothing to chain to.
        assert_eq!(log.verify().first_bad_seq, 1);
    }

    #[test]
    fn the_tail_check_trusts_the_record_it_starts_after() {
        let mut log = Log::new(10);
        log.rows[1].mac[0] ^= 1; // before the start: not looked at
        let start = WalkStart::After {
            next_seq: 6,
            prev_mac: Some(log.rows[4].mac.clone()),
        };
        let tail: Vec<StoredRow> = log.rows[5..].to_vec();
        let report = walk(&log.keys, start.clone(), tail.into_iter().map(Ok), log.head).unwrap();
        assert!(report.ok, "{report:?}");
        log.rows[7].record.as_mut().unwrap().detail = "x".into();
        let tail: Vec<StoredRow> = log.rows[5..].to_vec();
        let report = walk(&log.keys, start, tail.into_iter().map(Ok), log.head).unwrap();
        assert_eq!(report.first_bad_seq, 8);
    }

    #[test]
    fn a_read_error_ends_the_walk_with_it() {
        let log = Log::new(3);
        let rows = log
            .rows
            .iter()
            .cloned()
            .map(Ok)
            .chain([Err(Error::Unavailable(
                "audit store: disk I/O error".into(),
            ))]);
        let result = walk(
            &log.keys,
            WalkStart::Beginning(Stored::Missing),
            rows,
            log.head,
        );
        assert!(matches!(result, Err(Error::Unavailable(_))));
    }

    #[test]
    fn evidence_of_a_cut_and_its_recovery() {
        let mut log = Log::new(10);
        log.rows.truncate(9);
        let last = log.rows.last().map(|r| (r.seq as u64, r.mac.as_slice()));
        let problem = writable_tail(last, Stored::Missing, log.head).unwrap_err();
        assert!(
            problem.0.contains("signed head is at record 10"),
            "{problem:?}"
        );
        // The backend records the cut before the next record.
        assert_eq!(log.append(tail_evidence(&problem)), 10);
        assert_eq!(log.append(record(11)), 11);
        let report = log.verify();
        assert_eq!(report.first_bad_seq, 10, "{report:?}");
        let recovery = recovery_record(&report, "cli:test").unwrap().unwrap();
        assert_eq!(recovery.contexts, ["seq:10"]);
        assert_eq!(log.append(recovery), 12);
        let report = log.verify();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.breaks[0].acknowledged_by, Some(12));
        // A later edit the recovery did not accept is a new break.
        log.rows[2].record.as_mut().unwrap().detail = "x".into();
        assert_eq!(log.verify().first_bad_seq, 3);
        // Nothing to recover on a whole log.
        assert!(
            recovery_record(&Log::new(3).verify(), "cli:test")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_writable_tail_is_the_signed_head_or_a_problem() {
        let log = Log::new(3);
        let last = log.rows.last().map(|r| (r.seq as u64, r.mac.as_slice()));
        assert_eq!(
            writable_tail(last, Stored::Missing, log.head).map(|a| a.seq),
            Ok(3)
        );
        assert_eq!(
            writable_tail(None, Stored::Missing, Stored::Missing),
            Ok(Anchor::GENESIS)
        );
        let genesis = anchor::encode(&log.keys, Kind::Head, &Anchor::GENESIS);
        let genesis = anchor::decode(&log.keys, Kind::Head, Some(&genesis));
        assert_eq!(
            writable_tail(None, Stored::Missing, genesis),
            Ok(Anchor::GENESIS)
        );
        for (last, checkpoint, head) in [
            (last, Stored::Missing, Stored::Missing),
            (last, Stored::Missing, Stored::Invalid),
            (Some((3, &[1u8; 5][..])), Stored::Missing, log.head),
            (None, Stored::Invalid, Stored::Missing),
            (None, Stored::Missing, log.head),
        ] {
            assert!(writable_tail(last, checkpoint, head).is_err());
        }
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
