//! The PostgreSQL audit log with one chain per node (docs/AUDIT.md §9), against a real
//! PostgreSQL that the harness starts (`tests/common/postgres.rs`): each test has a database
//! of its own, and an "intruder" connection that edits the tables with plain SQL as someone
//! with database access but without the master key would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;

use tenant_kms::audit::operation::{Rpc, Task};
use tenant_kms::audit::{
    AuditAppend, AuditMaintenance, AuditQuery, AuditRecord, AuditWriter, ChainKeys, ListFilter,
    MergeCursor, Operation, Outcome, PostgresAuditLog,
};
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::store::postgres::{PgOptions, PgPool};

/// A fresh database and the chain keys its logs share.
pub(crate) struct Db {
    pub(crate) url: String,
    pub(crate) keys: Arc<ChainKeys>,
}

impl Db {
    pub(crate) fn new() -> Self {
        Self {
            url: common::postgres::fresh_database(),
            keys: Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap()),
        }
    }

    /// The log of `node`, on a pool of its own (as a node process has).
    pub(crate) fn log(&self, node: &str) -> PostgresAuditLog {
        PostgresAuditLog::open(pool(&self.url), node, Arc::clone(&self.keys)).unwrap()
    }

    /// A plain connection, as an intruder with database access has.
    pub(crate) fn intruder(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

/// Record `i` at time `time` (µs), of tenant `acme`.
pub(crate) fn record(i: u32, time: i64) -> AuditRecord {
    AuditRecord::new(Rpc::Encrypt, "token:t", "127.0.0.1:1", Outcome::Ok)
        .at(time)
        .request_id(format!("r{i}"))
        .tenant("acme")
        .contexts(vec!["ctx".into()])
        .versions(vec![1])
}

pub(crate) fn append(log: &PostgresAuditLog, records: &[AuditRecord]) -> u64 {
    let refs: Vec<&AuditRecord> = records.iter().collect();
    log.append(&refs).unwrap()
}

/// Two nodes' logs with ten records each (two batches), node a's at even, b's at odd times.
fn two_chains(db: &Db) -> (PostgresAuditLog, PostgresAuditLog) {
    let (a, b) = (db.log("node-a"), db.log("node-b"));
    for (log, offset) in [(&a, 0), (&b, 1)] {
        let records: Vec<AuditRecord> = (1..=10)
            .map(|i| record(i, 1_000 + 2 * i64::from(i) + offset))
            .collect();
        append(log, &records[..5]);
        append(log, &records[5..]);
    }
    (a, b)
}

#[test]
fn two_nodes_write_their_own_chains_concurrently_and_everything_verifies() {
    let db = Db::new();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 50;
    // Each node with its own group-commit writer, as each node process has.
    let writers: Vec<(String, AuditWriter)> = ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let writer = AuditWriter::start(Box::new(db.log(node)), Arc::clone(&db.keys)).unwrap();
            (node.to_owned(), writer)
        })
        .collect();
    let acknowledged: Vec<(String, u64, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = writers
            .iter()
            .flat_map(|(node, writer)| {
                (0..THREADS).map(move |t| {
                    scope.spawn(move || {
                        (0..PER_THREAD)
                            .map(|i| {
                                let id = format!("{node}-{t}-{i}");
                                let r = AuditRecord::new(
                                    Rpc::Encrypt,
                                    "token:t",
                                    "127.0.0.1:1",
                                    Outcome::Ok,
                                )
                                .request_id(id.clone());
                                let seq = writer.append_blocking(r).unwrap();
                                (node.clone(), seq, id)
                            })
                            .collect::<Vec<_>>()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let commits: u64 = writers.iter().map(|(_, w)| w.commits()).sum();
    for (_, writer) in writers {
        writer.shutdown();
    }
    let total = 2 * THREADS * PER_THREAD;
    println!(
        "{total} records from 2 nodes in {commits} commits ({:.1} records per commit)",
        total as f64 / commits as f64
    );
    let a = db.log("node-a");
    let report = a.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked, total as u64);
    // Every acknowledged record is in its node's chain at the sequence number it was given,
    // and each chain is 1..=n without gaps.
    let b = db.log("node-b");
    for (node, log) in [("node-a", &a), ("node-b", &b)] {
        let chain = log
            .list(&ListFilter {
                limit: 10_000,
                ..ListFilter::default()
            })
            .unwrap();
        assert_eq!(chain.len(), THREADS * PER_THREAD, "{node}");
        for (i, (seq, _)) in chain.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "{node}: no gap");
        }
        for (acked_node, seq, id) in acknowledged.iter().filter(|(n, _, _)| n == node) {
            assert_eq!(
                &chain[*seq as usize - 1].1.request_id,
                id,
                "{acked_node}: record {seq}"
            );
        }
    }
    // The merged listing holds both chains, in time order.
    let merged = a
        .list_merged(
            &ListFilter {
                limit: 10_000,
                ..ListFilter::default()
            },
            None,
        )
        .unwrap();
    assert_eq!(merged.len(), total);
    assert!(
        merged.iter().any(|m| m.chain == "node-a") && merged.iter().any(|m| m.chain == "node-b")
    );
    assert!(
        merged
            .windows(2)
            .all(|w| (w[0].record.time_micros, &w[0].chain, w[0].seq)
                < (w[1].record.time_micros, &w[1].chain, w[1].seq)),
        "merged in (time, node, seq) order"
    );
}

#[test]
fn merged_pages_interleave_the_chains_in_time_order() {
    let db = Db::new();
    let (a, _b) = two_chains(&db);
    let mut times = Vec::new();
    let mut chains = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let after = token.as_deref().map(|t| MergeCursor::parse(t).unwrap());
        let page = a
            .list_merged(
                &ListFilter {
                    limit: 3,
                    ..ListFilter::default()
                },
                after.as_ref(),
            )
            .unwrap();
        let Some(last) = page.last() else { break };
        token = Some(last.cursor().token());
        for m in page {
            times.push(m.record.time_micros);
            chains.push(m.chain);
        }
    }
    // a at 1002, 1004, …; b at 1003, 1005, …: strictly alternating.
    let expected: Vec<i64> = (0..20).map(|i| 1_002 + i).collect();
    assert_eq!(times, expected);
    assert_eq!(chains[..4], ["node-a", "node-b", "node-a", "node-b"]);
}

/// Applies `sql` as the intruder to a fresh pair of chains; returns the verifier's reason.
fn tampered(sql: &str) -> (u64, String) {
    let db = Db::new();
    let (a, _b) = two_chains(&db);
    assert!(a.verify().unwrap().ok);
    db.intruder().batch_execute(sql).unwrap();
    let report = a.verify().unwrap();
    assert!(!report.ok, "{sql}: not detected");
    assert_eq!(report.ok, report.first_bad_seq == 0);
    (report.first_bad_seq, report.reason)
}

#[test]
fn verify_detects_each_kind_of_tampering_in_any_chain() {
    let b = "node_id = 'node-b'";
    let cases: Vec<(String, u64, &str)> = vec![
        (
            format!("UPDATE audit_records SET tenant_id = 'x' WHERE {b} AND seq = 4"),
            4,
            "chain node-b: record 4 was edited",
        ),
        (
            format!("DELETE FROM audit_records WHERE {b} AND seq = 4"),
            4,
            "chain node-b: record 4 is missing",
        ),
        (
            // A forged record inserted at 5, the later ones renumbered.
            format!(
                "UPDATE audit_records SET seq = seq + 100 WHERE {b} AND seq >= 5; \
                 UPDATE audit_records SET seq = seq - 99 WHERE {b} AND seq >= 105; \
                 INSERT INTO audit_records SELECT node_id, 5, time_us, 'forged', caller, peer, \
                 tenant_id, operation, contexts, key_versions, item_count, outcome, \
                 aad_fingerprint, detail, trace_parent, mac FROM audit_records WHERE {b} AND seq = 4"
            ),
            5,
            "chain node-b: record 5",
        ),
        (
            format!(
                "UPDATE audit_records SET seq = -4 WHERE {b} AND seq = 4; \
                 UPDATE audit_records SET seq = 4 WHERE {b} AND seq = 5; \
                 UPDATE audit_records SET seq = 5 WHERE {b} AND seq = -4"
            ),
            4,
            "chain node-b: record 4",
        ),
        (
            format!("DELETE FROM audit_records WHERE {b} AND seq >= 9"),
            9,
            "chain node-b: records 9 to 10 are missing from the end",
        ),
        (
            format!("DELETE FROM audit_anchors WHERE {b} AND name = 'head'"),
            1,
            "chain node-b is registered but its signed head is missing",
        ),
        (
            // node-a's head put in place of node-b's (both at record 10).
            "UPDATE audit_anchors SET value = (SELECT value FROM audit_anchors WHERE \
             node_id = 'node-a' AND name = 'head') WHERE node_id = 'node-b' AND name = 'head'"
                .into(),
            11,
            "chain node-b: the signed head is invalid",
        ),
        (
            // A record moved from node-a's chain to the end of node-b's.
            "UPDATE audit_records SET node_id = 'node-b', seq = 11 WHERE node_id = 'node-a' \
             AND seq = 10"
                .into(),
            10,
            "chain node-a: record 10 is missing from the end",
        ),
        (
            // A whole chain deleted, registration and anchors included.
            format!(
                "DELETE FROM audit_records WHERE {b}; DELETE FROM audit_anchors WHERE {b}; \
                 DELETE FROM audit_chains WHERE {b}"
            ),
            1,
            "the chain registry: the signed registry head names 2 chains but 1 are registered",
        ),
        (
            format!("DELETE FROM audit_records WHERE {b}; DELETE FROM audit_anchors WHERE {b}"),
            1,
            "chain node-b is registered but its signed head is missing",
        ),
        (
            // A chain added without the key: node-b's rows copied under another name.
            "INSERT INTO audit_records SELECT 'node-c', seq, time_us, request_id, caller, peer, \
             tenant_id, operation, contexts, key_versions, item_count, outcome, \
             aad_fingerprint, detail, trace_parent, mac FROM audit_records WHERE \
             node_id = 'node-b'"
                .into(),
            1,
            "chain node-c is not registered",
        ),
        (
            "DELETE FROM audit_anchors WHERE node_id = '' AND name = 'registry'".into(),
            1,
            "the signed registry head is missing",
        ),
    ];
    for (sql, seq, reason) in cases {
        let (first_bad, found) = tampered(&sql);
        assert!(found.contains(reason), "{sql}: {found}");
        assert_eq!(first_bad, seq, "{sql}: {found}");
    }
}

#[test]
fn a_damaged_registry_is_refused_not_signed_over() {
    let cases = [
        // A whole chain deleted, its registration included.
        "DELETE FROM audit_records WHERE node_id = 'node-b'; \
         DELETE FROM audit_anchors WHERE node_id = 'node-b'; \
         DELETE FROM audit_chains WHERE node_id = 'node-b'",
        // The registry's signed anchor removed.
        "DELETE FROM audit_anchors WHERE node_id = '' AND name = 'registry'",
        // Every registration removed (the anchor still names two).
        "DELETE FROM audit_chains",
    ];
    for sql in cases {
        let db = Db::new();
        let (a, _b) = two_chains(&db);
        db.intruder().batch_execute(sql).unwrap();
        let before = a.verify().unwrap();
        assert!(!before.ok, "{sql}: not detected");
        // A new node registering its chain must not re-sign the registry over the damage.
        let err = PostgresAuditLog::open(pool(&db.url), "node-c", Arc::clone(&db.keys))
            .err()
            .unwrap_or_else(|| panic!("{sql}: a damaged registry was signed over"));
        assert!(
            matches!(err, tenant_kms::error::Error::StoreIntegrity(_)),
            "{sql}: {err}"
        );
        assert!(err.to_string().contains("audit verify"), "{sql}: {err}");
        // The evidence is unchanged.
        let after = a.verify().unwrap();
        assert!(!after.ok, "{sql}: the break was hidden");
        assert_eq!(after.reason, before.reason, "{sql}");
    }
}

#[test]
fn prune_leaves_a_checkpoint_per_chain_and_the_rest_verifies() {
    let db = Db::new();
    let (a, b) = two_chains(&db);
    // Older than 1009: node-a's records 1..=4 (1002..1008) and node-b's 1..=3 (1003..1007).
    assert_eq!(a.prune(1_009).unwrap(), 7);
    assert_eq!(a.count().unwrap(), 13);
    let report = b.verify().unwrap();
    assert!(report.ok, "{report:?}");
    let checkpoints: i64 = db
        .intruder()
        .query_one(
            "SELECT COUNT(*) FROM audit_anchors WHERE name = 'checkpoint'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 2, "one checkpoint per chain");
    // Each chain goes on after its checkpoint.
    assert_eq!(append(&a, &[record(11, 2_000)]), 11);
    assert_eq!(append(&b, &[record(11, 2_001)]), 11);
    assert!(a.verify().unwrap().ok);
    // A checkpoint of one chain put in place of the other's is caught.
    db.intruder()
        .batch_execute(
            "UPDATE audit_anchors SET value = (SELECT value FROM audit_anchors WHERE \
             node_id = 'node-a' AND name = 'checkpoint') WHERE node_id = 'node-b' AND \
             name = 'checkpoint'",
        )
        .unwrap();
    let report = a.verify().unwrap();
    assert!(
        report
            .reason
            .contains("chain node-b: the retention checkpoint is invalid"),
        "{report:?}"
    );
    // And a log that does not verify is not pruned.
    assert!(a.prune(i64::MAX).is_err());
    assert_eq!(a.count().unwrap(), 15);
}

#[test]
fn a_reopened_node_continues_its_chain_and_a_cut_gets_evidence_then_recovery() {
    let db = Db::new();
    let (a, _b) = two_chains(&db);
    drop(a);
    // A restart: the node reads its committed head and continues.
    let a = db.log("node-a");
    assert_eq!(a.head().unwrap().seq, 10);
    assert_eq!(append(&a, &[record(11, 3_000)]), 11);
    assert!(a.verify().unwrap().ok);
    // The end of node-a's chain cut: the next append records the evidence first.
    db.intruder()
        .batch_execute("DELETE FROM audit_records WHERE node_id = 'node-a' AND seq = 11")
        .unwrap();
    assert!(!a.check_tail().unwrap().ok);
    assert_eq!(append(&a, &[record(12, 3_001)]), 12);
    let listed = a
        .list(&ListFilter {
            after_seq: 10,
            limit: 1,
            ..ListFilter::default()
        })
        .unwrap();
    assert!(Operation::Task(Task::AuditTailMismatch).is(&listed[0].1.operation));
    let report = a.verify().unwrap();
    assert_eq!(report.first_bad_seq, 11, "{report:?}");
    assert!(report.reason.starts_with("chain node-a: "), "{report:?}");
    // Recovery of node-a's chain acknowledges it; nothing is deleted.
    assert_eq!(a.recover("cli:test").unwrap().recovery_seq, 13);
    let report = a.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(a.count().unwrap(), 23);
}

/// A pool on the database at `url`, as a node opens one.
pub(crate) fn pool(url: &str) -> PgPool {
    PgPool::connect(&PgOptions::new(url)).unwrap()
}
