//! The PostgreSQL audit log's one-statement append (docs/SCALING.md, "The audit append"):
//! taken in the steady state, and never when the chain is not where this writer left it —
//! after tampering, another writer of the same node, or an error — when the full path reads
//! and judges the tail exactly as before, evidence record included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use tenant_kms::audit::operation::Task;
use tenant_kms::audit::{
    AuditAppend, AuditMaintenance, AuditQuery, AuditRecord, ChainKeys, ListFilter, Operation,
    PostgresAuditLog,
};
use tenant_kms::crypto::secret::SecretKey;

use common::postgres::PgCluster;

use crate::audit_postgres::{Db, append, pool, record};

/// A chain's records as [`rows`] lists them.
type Rows = Vec<(u64, String, String, String)>;
/// What `audit verify` concludes, as [`verdict`] gives it.
type Verdict = (bool, u64, String, u64);

/// What a chain holds, apart from the evidence record's time: (seq, operation, request id,
/// detail) of every record.
fn rows(log: &PostgresAuditLog) -> Rows {
    log.list(&ListFilter {
        limit: 10_000,
        ..ListFilter::default()
    })
    .unwrap()
    .into_iter()
    .map(|(seq, r)| (seq, r.operation, r.request_id, r.detail))
    .collect()
}

/// What `audit verify` concludes: (ok, first bad record, reason, breaks).
fn verdict(log: &PostgresAuditLog) -> Verdict {
    let report = log.verify().unwrap();
    (
        report.ok,
        report.first_bad_seq,
        report.reason,
        report.breaks_total,
    )
}

/// node-a's chain of ten records in two appends, `sql` applied by the intruder, then record
/// 11 appended through the log that wrote the ten (`reuse`: it remembers where it left the
/// chain) or through a newly opened one (whose first append takes the full path, as every
/// append did before the one-statement path). Returns the chain, the verdict and the paths
/// the appending log took.
fn tamper_then_append(sql: &str, reuse: bool) -> (Rows, Verdict, (u64, u64)) {
    let db = Db::new();
    let writer = db.log("node-a");
    let records: Vec<AuditRecord> = (1..=10).map(|i| record(i, 1_000 + i64::from(i))).collect();
    assert_eq!(append(&writer, &records[..5]), 1);
    // The head signed at record 5, kept for a replay.
    db.intruder()
        .batch_execute(
            "CREATE TABLE saved_head AS SELECT value FROM audit_anchors \
             WHERE node_id = 'node-a' AND name = 'head'",
        )
        .unwrap();
    assert_eq!(append(&writer, &records[5..]), 6);
    assert_eq!(
        writer.append_paths(),
        (1, 1),
        "the second append is one statement"
    );
    db.intruder().batch_execute(sql).unwrap();
    let log = if reuse {
        writer
    } else {
        drop(writer);
        db.log("node-a")
    };
    let paths_before = log.append_paths();
    append(&log, &[record(11, 2_000)]);
    let paths = log.append_paths();
    let taken = (paths.0 - paths_before.0, paths.1 - paths_before.1);
    (rows(&log), verdict(&log), taken)
}

#[test]
fn steady_state_appends_are_one_statement_each_and_verify() {
    let db = Db::new();
    let log = db.log("node-a");
    let mut next = 1u32;
    for batch in 1..=6u32 {
        let records: Vec<AuditRecord> = (0..batch)
            .map(|i| record(next + i, 1_000 + i64::from(next + i)))
            .collect();
        assert_eq!(append(&log, &records), u64::from(next));
        next += batch;
    }
    // The first append after opening reads the tail; every later one is one statement.
    assert_eq!(log.append_paths(), (5, 1));
    assert_eq!(log.head().unwrap().seq, u64::from(next - 1));
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked, u64::from(next - 1));
    // An empty append moves nothing and stays on the fast path.
    assert_eq!(log.append(&[]).unwrap(), u64::from(next));
    assert_eq!(log.append_paths(), (6, 1));
    assert!(log.verify().unwrap().ok);
}

/// The statements the server logged (`log_statement=all`) while `f` ran: those between two
/// marker statements of `marker`'s connection.
fn statements_during(
    cluster: &PgCluster,
    marker: &mut postgres::Client,
    f: impl FnOnce(),
) -> usize {
    marker.batch_execute("SELECT 'h14-mark-begin'").unwrap();
    f();
    marker.batch_execute("SELECT 'h14-mark-end'").unwrap();
    let log = std::fs::read_to_string(cluster.server_log()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let begin = lines
        .iter()
        .rposition(|l| l.contains("'h14-mark-begin'"))
        .unwrap();
    let end = lines
        .iter()
        .rposition(|l| l.contains("'h14-mark-end'"))
        .unwrap();
    lines[begin + 1..end]
        .iter()
        .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
        .count()
}

/// Round trips per audit commit, counted by the server: each statement the log sends is one
/// round trip (`query_typed`: parse, bind and execute together; BEGIN and COMMIT each one).
#[test]
fn a_steady_state_append_is_one_round_trip_the_full_path_eight() {
    let cluster = PgCluster::with_settings(&format!(
        "{} -c log_statement=all",
        common::postgres::TEST_SETTINGS
    ));
    let url = cluster.url(&cluster.create_database());
    let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
    let log = PostgresAuditLog::open(pool(&url), "node-a", keys).unwrap();
    let mut marker = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let batch: Vec<AuditRecord> = (1..=20).map(|i| record(i, i64::from(i))).collect();
    let full = statements_during(&cluster, &mut marker, || {
        append(&log, &batch[..10]);
    });
    let fast = statements_during(&cluster, &mut marker, || {
        append(&log, &batch[10..]);
    });
    println!("round trips per audit commit: full path {full}, one-statement path {fast}");
    assert_eq!(log.append_paths(), (1, 1));
    assert_eq!(
        full, 8,
        "BEGIN, lock, last row, checkpoint, head, insert, head, COMMIT"
    );
    assert_eq!(fast, 1);
    assert!(log.verify().unwrap().ok);
}

#[test]
fn a_change_between_appends_takes_the_full_path_and_records_the_same_evidence() {
    let a = "node_id = 'node-a'";
    // (tampering, whether the append after it must take the full path)
    let cases: Vec<(String, bool)> = vec![
        // The end cut.
        (
            format!("DELETE FROM audit_records WHERE {a} AND seq >= 9"),
            true,
        ),
        // The last record deleted.
        (
            format!("DELETE FROM audit_records WHERE {a} AND seq = 10"),
            true,
        ),
        // The last record's MAC replaced.
        (
            format!(
                "UPDATE audit_records SET mac = (SELECT mac FROM audit_records WHERE {a} AND \
                 seq = 9) WHERE {a} AND seq = 10"
            ),
            true,
        ),
        // An older signed head replayed.
        (
            format!(
                "UPDATE audit_anchors SET value = (SELECT value FROM saved_head) \
                 WHERE {a} AND name = 'head'"
            ),
            true,
        ),
        // The head deleted.
        (
            format!("DELETE FROM audit_anchors WHERE {a} AND name = 'head'"),
            true,
        ),
        // The head overwritten with garbage.
        (
            format!("UPDATE audit_anchors SET value = '\\x00'::bytea WHERE {a} AND name = 'head'"),
            true,
        ),
        // A field of the last record edited, its MAC kept: no append path reads it (the
        // full path did not either); `audit verify` finds it.
        (
            format!("UPDATE audit_records SET detail = 'edited' WHERE {a} AND seq = 10"),
            false,
        ),
    ];
    for (sql, full) in cases {
        let (cached_rows, cached_verdict, cached_paths) = tamper_then_append(&sql, true);
        let (fresh_rows, fresh_verdict, fresh_paths) = tamper_then_append(&sql, false);
        assert_eq!(fresh_paths, (0, 1), "{sql}");
        let expected = if full { (0, 1) } else { (1, 0) };
        assert_eq!(cached_paths, expected, "{sql}: the path taken");
        // Exactly what the full path alone records and concludes.
        assert_eq!(cached_rows, fresh_rows, "{sql}");
        assert_eq!(cached_verdict, fresh_verdict, "{sql}");
        assert!(!cached_verdict.0, "{sql}: not detected");
        let evidence = cached_rows
            .iter()
            .filter(|(_, op, _, _)| Operation::Task(Task::AuditTailMismatch).is(op))
            .count();
        assert_eq!(evidence, usize::from(full), "{sql}: {cached_rows:?}");
    }
}

#[test]
fn two_writers_of_one_node_append_in_turn_and_never_fork_its_chain() {
    let db = Db::new();
    // Two values over pools of their own: the server and a `rotate` of the same node.
    let (one, two) = (db.log("node-a"), db.log("node-a"));
    assert_eq!(append(&one, &[record(1, 1)]), 1);
    assert_eq!(append(&one, &[record(2, 2)]), 2);
    assert_eq!(append(&two, &[record(3, 3)]), 3);
    // `one` left the chain at 2: its next append finds it moved, reads the tail (signed by
    // `two`, so no evidence) and goes on after it.
    assert_eq!(append(&one, &[record(4, 4)]), 4);
    assert_eq!(one.append_paths(), (1, 2));
    // Both at once, from several threads each.
    const THREADS: u32 = 2;
    const PER_THREAD: u32 = 40;
    std::thread::scope(|scope| {
        for (w, log) in [&one, &two].into_iter().enumerate() {
            for t in 0..THREADS {
                scope.spawn(move || {
                    for i in 0..PER_THREAD {
                        let n = 1_000 * (u32::try_from(w).unwrap() * THREADS + t + 1) + i;
                        append(log, &[record(n, i64::from(n)), record(n, i64::from(n))]);
                    }
                });
            }
        }
    });
    let total = 4 + u64::from(2 * THREADS * PER_THREAD * 2);
    let chain = rows(&one);
    assert_eq!(chain.len() as u64, total);
    for (i, (seq, op, _, _)) in chain.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "no gap, no fork");
        assert!(
            !Operation::Task(Task::AuditTailMismatch).is(op),
            "no evidence: every change was a signed append"
        );
    }
    let report = one.verify().unwrap();
    assert!(report.ok, "{report:?}");
    let appends = |log: &PostgresAuditLog| {
        let (fast, full) = log.append_paths();
        fast + full
    };
    assert_eq!(appends(&one), 3 + u64::from(THREADS * PER_THREAD));
    assert_eq!(appends(&two), 1 + u64::from(THREADS * PER_THREAD));
}

#[test]
fn a_database_restart_between_appends_loses_nothing_and_the_next_append_reads_the_tail() {
    let mut cluster = PgCluster::new();
    let url = cluster.url(&cluster.create_database());
    let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
    let log = PostgresAuditLog::open(pool(&url), "node-a", keys).unwrap();
    assert_eq!(append(&log, &[record(1, 1)]), 1);
    assert_eq!(append(&log, &[record(2, 2)]), 2);
    assert_eq!(log.append_paths(), (1, 1));
    cluster.stop();
    assert!(
        log.append(&[&record(3, 3)]).is_err(),
        "no append acknowledged while the database is down"
    );
    cluster.start();
    // The pool reconnects on demand; a connection broken by the restart fails one call.
    let mut seq = None;
    for _ in 0..50 {
        if let Ok(s) = log.append(&[&record(3, 3)]) {
            seq = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seq, Some(3), "the log works again after the restart");
    let (fast, full) = log.append_paths();
    assert_eq!(fast, 1, "after an error the tail is read, never trusted");
    assert_eq!(full, 2);
    assert_eq!(append(&log, &[record(4, 4)]), 4);
    assert_eq!(log.append_paths(), (2, 2));
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(log.count().unwrap(), 4, "nothing lost, nothing twice");
}

#[test]
fn a_dropped_append_function_is_created_again_and_the_batch_takes_the_full_path() {
    let db = Db::new();
    let log = db.log("node-a");
    assert_eq!(append(&log, &[record(1, 1_001)]), 1);
    assert_eq!(append(&log, &[record(2, 1_002)]), 2);
    assert_eq!(log.append_paths(), (1, 1));
    db.intruder()
        .batch_execute("DROP FUNCTION tenant_kms_audit_append_v1")
        .unwrap();
    // The failed call ran nothing: this batch is written by the full path, not failed.
    assert_eq!(append(&log, &[record(3, 1_003)]), 3);
    assert_eq!(log.append_paths(), (1, 2));
    // The function is back: the next batch is one statement again.
    assert_eq!(append(&log, &[record(4, 1_004)]), 4);
    assert_eq!(log.append_paths(), (2, 2));
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked, 4);
}
