//! The `AuditLog` contract: one suite, generic over the traits, that every backend must pass
//! (SQLite and PostgreSQL, from `tests/integration/audit_contract.rs`). It checks what the writer, the
//! service, the commands and backup rely on: append order and the head, query filters and
//! paging (per chain and merged), pruning that leaves a checkpoint the rest verifies from,
//! snapshots that are one consistent state (backends with file snapshots), and readers that
//! only ever see whole batches while a writer appends.
//!
//! Built for tests and with the `test-seams` feature only; it panics on the first broken
//! promise, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::chain::GENESIS_MAC;
use super::log::{AuditLog, ListFilter, MergeCursor};
use super::operation::Rpc;
use super::record::{AuditRecord, Outcome};

/// Runs the suite every backend passes. `make` returns a new, empty log each time (all with
/// the same chain keys).
pub fn auditlog_contract<L: AuditLog>(make: impl Fn() -> L) {
    append_order_and_head(&make());
    query_filters_and_paging(&make());
    merged_listing_pages_in_order(&make());
    prune_leaves_a_checkpoint_that_verifies(&make());
    readers_see_whole_batches_during_appends(&make());
}

/// The part of the suite for a backend whose log is copied to a file online
/// ([`super::AuditSnapshot::snapshot_to`]; a PostgreSQL log is backed up with its database
/// instead). `make` as for [`auditlog_contract`]; `open_copy` opens, read only, a copy that
/// `snapshot_to` wrote; `scratch` is an empty directory for such copies.
pub fn auditlog_snapshot_contract<L: AuditLog>(
    make: impl Fn() -> L,
    open_copy: impl Fn(&Path) -> L,
    scratch: &Path,
) {
    snapshot_is_one_consistent_state(&make(), &open_copy, scratch);
}

fn merged_listing_pages_in_order(log: &impl AuditLog) {
    let records: Vec<AuditRecord> = (1..=9)
        .map(|i| {
            let tenant = if i % 3 == 0 { "acme" } else { "globex" };
            record(i, tenant, Rpc::Encrypt, 10 * i64::from(i))
        })
        .collect();
    for chunk in records.chunks(4) {
        append(log, chunk);
    }
    let mut paged = Vec::new();
    let mut after: Option<MergeCursor> = None;
    loop {
        let page = log
            .list_merged(
                &ListFilter {
                    limit: 2,
                    ..ListFilter::default()
                },
                after.as_ref(),
            )
            .unwrap();
        assert!(page.len() <= 2, "a merged page holds at most the limit");
        let Some(last) = page.last() else { break };
        // The cursor survives its page token.
        let cursor = MergeCursor::parse(&last.cursor().token()).unwrap();
        assert_eq!(cursor, last.cursor(), "a page token parses back");
        after = Some(cursor);
        paged.extend(page.into_iter().map(|m| m.record));
    }
    assert_eq!(
        paged, records,
        "merged pages add up to the log, in time order"
    );
    let acme: Vec<AuditRecord> = log
        .list_merged(
            &ListFilter {
                tenant_id: "acme".into(),
                since_micros: Some(40),
                limit: 100,
                ..ListFilter::default()
            },
            None,
        )
        .unwrap()
        .into_iter()
        .map(|m| m.record)
        .collect();
    assert_eq!(
        acme,
        [records[5].clone(), records[8].clone()],
        "merged filters"
    );
}

/// A record with everything set, so a backend that drops or mangles a field is caught.
fn record(i: u32, tenant: &str, operation: Rpc, time_micros: i64) -> AuditRecord {
    AuditRecord::new(operation, format!("token:t{i}"), "127.0.0.1:1", Outcome::Ok)
        .at(time_micros)
        .request_id(format!("req-{i}"))
        .tenant(tenant)
        .contexts(vec!["crm.contacts.email".into(), format!("ctx-{i}")])
        .versions(vec![1, i])
        .items(i)
        .aad_fingerprint("00112233445566778899aabbccddeeff")
        .detail(format!("détail {i} ✓"))
        // Every other record with a trace: a backend must keep it, and keep it empty.
        .trace_parent(if i.is_multiple_of(2) {
            format!("00-{:032x}-{:016x}-01", i + 1, i + 1)
        } else {
            String::new()
        })
}

fn all(log: &impl AuditLog) -> Vec<(u64, AuditRecord)> {
    log.list(&ListFilter {
        limit: usize::MAX >> 1,
        ..ListFilter::default()
    })
    .unwrap()
}

fn append(log: &impl AuditLog, records: &[AuditRecord]) -> u64 {
    let refs: Vec<&AuditRecord> = records.iter().collect();
    log.append(&refs).unwrap()
}

fn assert_verifies(log: &impl AuditLog, what: &str) {
    let report = log.verify().unwrap();
    assert!(report.ok, "{what}: the log does not verify: {report:?}");
}

fn append_order_and_head(log: &impl AuditLog) {
    let head = log.head().unwrap();
    assert_eq!(
        (head.seq, head.mac),
        (0, GENESIS_MAC),
        "an empty log's head"
    );
    assert_eq!(log.count().unwrap(), 0);
    assert_verifies(log, "an empty log");
    let first: Vec<AuditRecord> = (1..=3)
        .map(|i| record(i, "acme", Rpc::Encrypt, 1_000 + i64::from(i)))
        .collect();
    let second: Vec<AuditRecord> = (4..=5)
        .map(|i| record(i, "globex", Rpc::Decrypt, 1_000 + i64::from(i)))
        .collect();
    assert_eq!(append(log, &first), 1, "the first batch starts at 1");
    assert_eq!(
        append(log, &second),
        4,
        "a batch follows the last without a gap"
    );
    let listed = all(log);
    let expected: Vec<(u64, AuditRecord)> = (1..).zip(first.into_iter().chain(second)).collect();
    assert_eq!(listed, expected, "records read back as appended, in order");
    assert_eq!(log.count().unwrap(), 5);
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.records_checked, 5);
    let head = log.head().unwrap();
    assert_eq!(head.seq, 5, "the head is the last record");
    assert_eq!(
        hex::encode(head.mac),
        report.head_mac,
        "head and verifier agree"
    );
    assert!(log.check_tail().unwrap().ok, "the tail check passes");
    assert_eq!(log.check_anchor(5, &head.mac).unwrap(), None);
    assert!(
        log.check_anchor(5, &[0; 32]).unwrap().is_some(),
        "a wrong anchor"
    );
    assert!(
        log.check_anchor(9, &head.mac).unwrap().is_some(),
        "an anchor past the end"
    );
    // An empty batch appends nothing to a whole log.
    assert_eq!(log.append(&[]).unwrap(), 6);
    assert_eq!(log.count().unwrap(), 5);
    assert_eq!(log.head().unwrap(), head);
    // Nothing to recover on a whole log.
    assert_eq!(log.recover("cli:contract").unwrap().recovery_seq, 0);
    assert_eq!(log.count().unwrap(), 5);
}

fn query_filters_and_paging(log: &impl AuditLog) {
    let records: Vec<AuditRecord> = (1..=12)
        .map(|i| {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            let op = if i % 3 == 0 {
                Rpc::RotateTenantKey
            } else {
                Rpc::Encrypt
            };
            record(i, tenant, op, 100 * i64::from(i))
        })
        .collect();
    // Several batches, so paging crosses batch boundaries.
    for chunk in records.chunks(5) {
        append(log, chunk);
    }
    let seqs = |filter: ListFilter| -> Vec<u64> {
        log.list(&ListFilter {
            limit: 100,
            ..filter
        })
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect()
    };
    assert_eq!(
        seqs(ListFilter {
            tenant_id: "acme".into(),
            ..ListFilter::default()
        }),
        [2, 4, 6, 8, 10, 12],
        "by tenant"
    );
    assert_eq!(
        seqs(ListFilter {
            operation: Rpc::RotateTenantKey.name().into(),
            ..ListFilter::default()
        }),
        [3, 6, 9, 12],
        "by operation"
    );
    assert_eq!(
        seqs(ListFilter {
            since_micros: Some(300),
            until_micros: Some(700),
            ..ListFilter::default()
        }),
        [3, 4, 5, 6],
        "by time: since inclusive, until exclusive"
    );
    assert_eq!(
        seqs(ListFilter {
            tenant_id: "globex".into(),
            operation: Rpc::Encrypt.name().into(),
            since_micros: Some(200),
            ..ListFilter::default()
        }),
        [5, 7, 11],
        "filters combine"
    );
    assert!(
        seqs(ListFilter {
            tenant_id: "initech".into(),
            ..ListFilter::default()
        })
        .is_empty()
    );
    // Paging: pages of 5 after the last seen, together exactly the whole log.
    let mut paged = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = log
            .list(&ListFilter {
                after_seq,
                limit: 5,
                ..ListFilter::default()
            })
            .unwrap();
        assert!(page.len() <= 5, "a page holds at most the limit");
        let Some((last, _)) = page.last() else { break };
        after_seq = *last;
        paged.extend(page);
    }
    assert_eq!(paged, all(log), "pages add up to the log");
    assert_eq!(paged.len(), 12);
}

fn prune_leaves_a_checkpoint_that_verifies(log: &impl AuditLog) {
    let records: Vec<AuditRecord> = (1..=10)
        .map(|i| record(i, "acme", Rpc::Encrypt, 100 * i64::from(i)))
        .collect();
    append(log, &records[..4]);
    let at4 = log.head().unwrap();
    append(log, &records[4..]);
    let before = all(log);
    let head = log.head().unwrap();
    assert_eq!(
        log.prune(100).unwrap(),
        0,
        "nothing is older than the first record"
    );
    // Records 1..=4 are older than 500; record 5 is not.
    assert_eq!(log.prune(500).unwrap(), 4);
    assert_eq!(log.count().unwrap(), 6);
    assert_eq!(all(log), before[4..].to_vec(), "only the oldest went");
    assert_eq!(log.head().unwrap(), head, "pruning does not move the head");
    assert_verifies(log, "after a prune");
    assert!(log.check_tail().unwrap().ok);
    // An anchor at the checkpoint still checks; one before it was pruned on purpose.
    assert_eq!(
        log.check_anchor(4, &at4.mac).unwrap(),
        None,
        "the checkpoint"
    );
    assert!(
        log.check_anchor(4, &[0; 32]).unwrap().is_some(),
        "a wrong anchor at the checkpoint"
    );
    assert_eq!(
        log.check_anchor(2, &[0; 32]).unwrap(),
        None,
        "before the checkpoint"
    );
    // Appends go on after a prune and chain to what is left.
    assert_eq!(append(log, &[record(11, "acme", Rpc::Decrypt, 1_100)]), 11);
    assert_verifies(log, "an append after a prune");
    // Pruning everything leaves the checkpoint as the head's position.
    let head = log.head().unwrap();
    assert_eq!(log.prune(i64::MAX).unwrap(), 7);
    assert_eq!(log.count().unwrap(), 0);
    assert_eq!(
        log.head().unwrap(),
        head,
        "the checkpoint keeps the position"
    );
    assert_verifies(log, "a log pruned to nothing");
    assert_eq!(append(log, &[record(12, "acme", Rpc::Decrypt, 1_200)]), 12);
    assert_verifies(log, "an append after pruning everything");
}

fn snapshot_is_one_consistent_state<L: AuditLog>(
    log: &L,
    open_copy: &impl Fn(&Path) -> L,
    scratch: &Path,
) {
    let batch: Vec<AuditRecord> = (1..=4)
        .map(|i| record(i, "acme", Rpc::Encrypt, i64::from(i)))
        .collect();
    append(log, &batch);
    let done = AtomicBool::new(false);
    let copies: Vec<std::path::PathBuf> = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            for _ in 0..30 {
                append(log, &batch);
            }
            done.store(true, Ordering::Release);
        });
        let mut copies = Vec::new();
        // At least one snapshot, more while the writer runs.
        while copies.is_empty() || (!done.load(Ordering::Acquire) && copies.len() < 8) {
            let path = scratch.join(format!("snapshot-{}.db", copies.len()));
            let head = log.snapshot_to(&path).unwrap();
            copies.push((path, head));
        }
        writer.join().unwrap();
        copies
            .into_iter()
            .map(|(path, head)| {
                let copy = open_copy(&path);
                assert_eq!(
                    copy.head().unwrap(),
                    head,
                    "the copy ends where snapshot said"
                );
                assert_eq!(head.seq % 4, 0, "a snapshot holds whole batches");
                assert_eq!(copy.count().unwrap(), head.seq);
                assert_verifies(&copy, "a snapshot");
                path
            })
            .collect()
    });
    // Each copy is a prefix of the log.
    let whole = all(log);
    for path in copies {
        let copy = all(&open_copy(&path));
        assert_eq!(copy, whole[..copy.len()].to_vec(), "a snapshot is a prefix");
    }
}

fn readers_see_whole_batches_during_appends(log: &impl AuditLog) {
    const BATCH: usize = 3;
    const BATCHES: u64 = 40;
    let batch: Vec<AuditRecord> = (1..=BATCH as u32)
        .map(|i| record(i, "acme", Rpc::Encrypt, i64::from(i)))
        .collect();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..BATCHES {
                append(log, &batch);
            }
            done.store(true, Ordering::Release);
        });
        for _ in 0..2 {
            scope.spawn(|| {
                let mut last_count = 0;
                let mut rounds = 0u32;
                // Read until the writer is done, and at least a few times.
                while !done.load(Ordering::Acquire) || rounds < 3 {
                    rounds += 1;
                    let count = log.count().unwrap();
                    assert!(count >= last_count, "the count never goes back");
                    assert_eq!(count % BATCH as u64, 0, "no half batch is visible");
                    last_count = count;
                    let listed = all(log);
                    assert_eq!(listed.len() % BATCH, 0, "no half batch is listed");
                    for (i, (seq, _)) in listed.iter().enumerate() {
                        assert_eq!(*seq, i as u64 + 1, "listed in order without gaps");
                    }
                    assert_eq!(log.head().unwrap().seq % BATCH as u64, 0);
                    assert_verifies(log, "during appends");
                }
            });
        }
    });
    assert_eq!(log.count().unwrap(), BATCHES * BATCH as u64);
    assert_verifies(log, "after concurrent appends");
}
