//! The SQL of the PostgreSQL audit log: the schema, and each operation on one chain or on the
//! registry, over a connection or a transaction. What the rows mean is decided by the pure
//! [`crate::audit::verify`], [`crate::audit::anchor`] and [`crate::audit::registry`]; this
//! module only reads and writes them.
//!
//! Every write to a chain holds that chain's transaction-scoped advisory lock, so the server
//! and a command of the same node (`rotate`) append one after the other, while other nodes'
//! chains are not touched: no lock is shared by all nodes except the registry's, which only a
//! node's first open takes.
//!
//! The statements of the append path (one transaction per group commit) are sent with their
//! parameter types (`query_typed`): parse, bind and execute in one round trip instead of a
//! prepare round trip before each, with no per-connection statement cache to keep valid
//! across reconnects, failovers and PgBouncer.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row, Transaction};

use crate::audit::anchor::{self, Anchor, Kind, Stored};
use crate::audit::chain::{ChainKeys, MAC_LEN};
use crate::audit::log::{ListFilter, MergeCursor, MergedRecord};
use crate::audit::record::{AuditRecord, outcome_from_str};
use crate::audit::registry::{self, StoredRegistration};
use crate::audit::verify::{
    self, StoredRow, TAIL_CHECK_RECORDS, TailProblem, VerifyReport, WalkStart,
};
use crate::error::{Error, Result};

/// The audit tables. `audit_anchors` holds each chain's signed head and checkpoint (by chain
/// name) and the registry's signed end (under the empty name, which no chain may have).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_chains (
    node_id  TEXT PRIMARY KEY,
    position BIGINT NOT NULL UNIQUE,
    mac      BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_anchors (
    node_id TEXT NOT NULL,
    name    TEXT NOT NULL,
    value   BYTEA NOT NULL,
    PRIMARY KEY (node_id, name)
);
CREATE TABLE IF NOT EXISTS audit_records (
    node_id         TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    time_us         BIGINT NOT NULL,
    request_id      TEXT NOT NULL,
    caller          TEXT NOT NULL,
    peer            TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    operation       TEXT NOT NULL,
    contexts        TEXT NOT NULL,
    key_versions    TEXT NOT NULL,
    item_count      BIGINT NOT NULL,
    outcome         TEXT NOT NULL,
    aad_fingerprint TEXT NOT NULL,
    detail          TEXT NOT NULL,
    trace_parent    TEXT NOT NULL DEFAULT '',
    mac             BYTEA NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_by_time ON audit_records (time_us, node_id, seq);
CREATE INDEX IF NOT EXISTS audit_records_by_tenant ON audit_records (tenant_id, time_us);
";

/// Advisory-lock key under which the schema is created (one node at a time: concurrent
/// `CREATE TABLE IF NOT EXISTS` can collide in PostgreSQL's catalog).
const SCHEMA_LOCK: i64 = 0x7465_6e61_6e74_0001;
/// Advisory-lock key of the registry.
const REGISTRY_LOCK: i64 = 0x7465_6e61_6e74_0002;

/// The name under which the registry's anchor is kept in `audit_anchors`.
const REGISTRY_OWNER: &str = "";

/// The record columns, in [`record_from_row`]'s order.
const SELECT_RECORD: &str = "SELECT seq, time_us, request_id, caller, peer, tenant_id, \
     operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, mac, \
     trace_parent, node_id FROM audit_records";

/// A database error as the service sees it: connection loss and the like are UNAVAILABLE
/// (the writer fails calls closed and retries), never a result.
pub(super) fn db_error(e: postgres::Error) -> Error {
    crate::store::postgres::map_error(e)
}

/// Creates the audit tables if missing.
pub(super) fn create_schema(client: &mut impl GenericClient) -> Result<()> {
    // Checked first, without a lock: `CREATE INDEX IF NOT EXISTS` would take a share lock on
    // the table, waiting for (and holding up) every node's appends at each open.
    let present: bool = client
        .query_one(
            "SELECT to_regclass('audit_records_by_tenant') IS NOT NULL",
            &[],
        )
        .map_err(db_error)?
        .get(0);
    if present {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .map_err(db_error)?;
    tx.batch_execute(SCHEMA).map_err(db_error)?;
    tx.commit().map_err(db_error)
}

/// Registers `chain` unless it is registered: its registration after the registry's end,
/// the registry's anchor moved to it, and the chain's head signed at genesis (so a
/// registered chain always has a head, and one whose records and head were deleted is a
/// break, not an empty chain), in one transaction.
pub(super) fn register(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
) -> Result<()> {
    let mut tx = client.transaction().map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REGISTRY_LOCK])
        .map_err(db_error)?;
    let known = tx
        .query_opt("SELECT 1 FROM audit_chains WHERE node_id = $1", &[&chain])
        .map_err(db_error)?;
    if known.is_some() {
        return Ok(());
    }
    let last = tx
        .query_opt(
            "SELECT position, mac FROM audit_chains ORDER BY position DESC LIMIT 1",
            &[],
        )
        .map_err(db_error)?
        .map(|row| (row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)));
    let head = read_anchor(&mut tx, keys, REGISTRY_OWNER, Kind::Registry)?;
    // Registrations chain after what is there, and only onto a registry that ends where its
    // signed anchor says: signing a new anchor over a damaged registry (registrations deleted,
    // edited or inserted, the anchor removed) would erase the evidence `audit verify` reports.
    let tail = match (&last, head) {
        (None, Stored::Missing) => Some(Anchor::GENESIS),
        (None, _) => None,
        (Some((position, mac)), head) => {
            let tail = Anchor {
                seq: u64::try_from(*position).unwrap_or(0),
                mac: <[u8; MAC_LEN]>::try_from(mac.as_slice()).unwrap_or([0; MAC_LEN]),
            };
            (head == Stored::Valid(tail)).then_some(tail)
        }
    };
    let Some(tail) = tail else {
        tracing::error!(
            chain,
            "the audit chain registry does not end where its signed anchor says; refusing to \
             register a chain on it: run `tenant-kms audit verify`"
        );
        return Err(Error::StoreIntegrity(format!(
            "the audit chain registry does not end where its signed anchor says, so chain \
             {chain} cannot be registered: run `tenant-kms audit verify` and restore the audit \
             tables from a backup"
        )));
    };
    let next = registry::next_registration(keys, tail, chain);
    tx.execute(
        "INSERT INTO audit_chains (node_id, position, mac) VALUES ($1, $2, $3)",
        &[&chain, &seq_param(next.seq), &next.mac.as_slice()],
    )
    .map_err(db_error)?;
    write_anchor(&mut tx, keys, REGISTRY_OWNER, Kind::Registry, &next)?;
    let genesis = anchor::encode_chain(keys, Kind::Head, chain, &Anchor::GENESIS);
    tx.execute(
        "INSERT INTO audit_anchors (node_id, name, value) VALUES ($1, $2, $3) \
         ON CONFLICT (node_id, name) DO NOTHING",
        &[&chain, &Kind::Head.name(), &genesis],
    )
    .map_err(db_error)?;
    tx.commit().map_err(db_error)
}

/// Takes `chain`'s write lock for the rest of the transaction.
fn lock_chain(tx: &mut Transaction<'_>, chain: &str) -> Result<()> {
    tx.query_typed(
        "SELECT pg_advisory_xact_lock(hashtextextended('tenant-kms/audit-chain/' || $1, 0))",
        &[(&chain, Type::TEXT)],
    )
    .map_err(db_error)?;
    Ok(())
}

fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Reads and checks an anchor of `owner` (a chain, or the registry).
fn read_anchor(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    owner: &str,
    kind: Kind,
) -> Result<Stored> {
    let value: Option<Vec<u8>> = client
        .query_typed_opt(
            "SELECT value FROM audit_anchors WHERE node_id = $1 AND name = $2",
            &[(&owner, Type::TEXT), (&kind.name(), Type::TEXT)],
        )
        .map_err(db_error)?
        .map(|row| row.get(0));
    Ok(if owner == REGISTRY_OWNER {
        anchor::decode(keys, kind, value.as_deref())
    } else {
        anchor::decode_chain(keys, kind, owner, value.as_deref())
    })
}

/// Writes (or replaces) an anchor of `owner`; call it in the transaction that makes it true.
fn write_anchor(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    owner: &str,
    kind: Kind,
    anchor: &Anchor,
) -> Result<()> {
    let value = if owner == REGISTRY_OWNER {
        anchor::encode(keys, kind, anchor)
    } else {
        anchor::encode_chain(keys, kind, owner, anchor)
    };
    client
        .query_typed(
            "INSERT INTO audit_anchors (node_id, name, value) VALUES ($1, $2, $3) \
             ON CONFLICT (node_id, name) DO UPDATE SET value = EXCLUDED.value",
            &[
                (&owner, Type::TEXT),
                (&kind.name(), Type::TEXT),
                (&value, Type::BYTEA),
            ],
        )
        .map_err(db_error)?;
    Ok(())
}

/// The last record of `chain`: its sequence number and stored MAC.
fn last_row(client: &mut impl GenericClient, chain: &str) -> Result<Option<(u64, Vec<u8>)>> {
    Ok(client
        .query_typed_opt(
            "SELECT seq, mac FROM audit_records WHERE node_id = $1 ORDER BY seq DESC LIMIT 1",
            &[(&chain, Type::TEXT)],
        )
        .map_err(db_error)?
        .map(|row| (u64::try_from(row.get::<_, i64>(0)).unwrap_or(0), row.get(1))))
}

/// Where `chain` may be extended: the signed head, if the chain ends there (see
/// [`verify::writable_tail`]). A registered chain always has a head, so a missing one is a
/// problem here, not a new chain: its records may have been deleted with it.
fn writable_tail(
    tx: &mut Transaction<'_>,
    keys: &ChainKeys,
    chain: &str,
) -> Result<std::result::Result<Anchor, TailProblem>> {
    let last = last_row(tx, chain)?;
    let checkpoint = read_anchor(tx, keys, chain, Kind::Checkpoint)?;
    let head = read_anchor(tx, keys, chain, Kind::Head)?;
    if head == Stored::Missing {
        let (seq, _) = verify::actual_tail(last, checkpoint);
        return Ok(Err(TailProblem(format!(
            "the signed head of chain {chain} is missing (the chain ends at record {seq}): its \
             records may have been deleted"
        ))));
    }
    Ok(verify::writable_tail(
        last.as_ref().map(|(seq, mac)| (*seq, mac.as_slice())),
        checkpoint,
        head,
    ))
}

/// Inserts `rows` (sequence number, record, MAC) of `chain` in one statement.
fn insert(
    tx: &mut Transaction<'_>,
    chain: &str,
    rows: &[(u64, &AuditRecord, [u8; MAC_LEN])],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let text =
        |f: fn(&AuditRecord) -> String| rows.iter().map(|(_, r, _)| f(r)).collect::<Vec<String>>();
    let seqs: Vec<i64> = rows.iter().map(|(seq, _, _)| seq_param(*seq)).collect();
    let times: Vec<i64> = rows.iter().map(|(_, r, _)| r.time_micros).collect();
    let items: Vec<i64> = rows
        .iter()
        .map(|(_, r, _)| i64::from(r.item_count))
        .collect();
    let macs: Vec<Vec<u8>> = rows.iter().map(|(_, _, mac)| mac.to_vec()).collect();
    let request_ids = text(|r| r.request_id.clone());
    let callers = text(|r| r.caller.clone());
    let peers = text(|r| r.peer.clone());
    let tenants = text(|r| r.tenant_id.clone());
    let operations = text(|r| r.operation.clone());
    let contexts = text(|r| serde_json::to_string(&r.contexts).unwrap_or_default());
    let versions = text(|r| serde_json::to_string(&r.key_versions).unwrap_or_default());
    let outcomes = text(|r| r.outcome.as_str().to_owned());
    let fingerprints = text(|r| r.aad_fingerprint.clone());
    let details = text(|r| r.detail.clone());
    let traces = text(|r| r.trace_parent.clone());
    let params: [(&(dyn ToSql + Sync), Type); 16] = [
        (&chain, Type::TEXT),
        (&seqs, Type::INT8_ARRAY),
        (&times, Type::INT8_ARRAY),
        (&request_ids, Type::TEXT_ARRAY),
        (&callers, Type::TEXT_ARRAY),
        (&peers, Type::TEXT_ARRAY),
        (&tenants, Type::TEXT_ARRAY),
        (&operations, Type::TEXT_ARRAY),
        (&contexts, Type::TEXT_ARRAY),
        (&versions, Type::TEXT_ARRAY),
        (&items, Type::INT8_ARRAY),
        (&outcomes, Type::TEXT_ARRAY),
        (&fingerprints, Type::TEXT_ARRAY),
        (&details, Type::TEXT_ARRAY),
        (&traces, Type::TEXT_ARRAY),
        (&macs, Type::BYTEA_ARRAY),
    ];
    tx.query_typed(
        "INSERT INTO audit_records (node_id, seq, time_us, request_id, caller, peer, tenant_id, \
         operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail, \
         trace_parent, mac) \
         SELECT $1::TEXT, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], \
         $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::BIGINT[], \
         $12::TEXT[], $13::TEXT[], $14::TEXT[], $15::TEXT[], $16::BYTEA[])",
        &params,
    )
    .map_err(db_error)?;
    Ok(())
}

/// Appends `records` to `chain` as [`crate::audit::AuditAppend::append`] says: after an
/// `AuditTailMismatch` evidence record when the chain does not end at its signed head, the
/// head moved in the same transaction. Returns the first record's sequence number.
pub(super) fn append(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
    records: &[&AuditRecord],
) -> Result<u64> {
    let mut tx = client.transaction().map_err(db_error)?;
    lock_chain(&mut tx, chain)?;
    let evidence;
    let mut rows: Vec<(u64, &AuditRecord, [u8; MAC_LEN])> = Vec::with_capacity(records.len() + 1);
    let mut head = match writable_tail(&mut tx, keys, chain)? {
        Ok(tail) => tail,
        Err(problem) => {
            tracing::error!(
                chain,
                problem = %problem.0,
                "this node's audit chain does not end where this service signed it: recording \
                 the evidence; run `tenant-kms audit verify`"
            );
            let checkpoint = read_anchor(&mut tx, keys, chain, Kind::Checkpoint)?;
            let (seq, prev) = verify::actual_tail(last_row(&mut tx, chain)?, checkpoint);
            evidence = verify::tail_evidence(&problem);
            let mac = keys.record_mac(&evidence, seq + 1, &prev);
            rows.push((seq + 1, &evidence, mac));
            Anchor { seq: seq + 1, mac }
        }
    };
    let first = head.seq + 1;
    for record in records {
        let seq = head.seq + 1;
        let mac = keys.record_mac(record, seq, &head.mac);
        rows.push((seq, record, mac));
        head = Anchor { seq, mac };
    }
    insert(&mut tx, chain, &rows)?;
    write_anchor(&mut tx, keys, chain, Kind::Head, &head)?;
    tx.commit().map_err(db_error)?;
    Ok(first)
}

/// The end of `chain` (see [`crate::audit::ChainHead`]): the last record, else the
/// checkpoint's position as stored, else genesis.
pub(super) fn head(client: &mut impl GenericClient, chain: &str) -> Result<Anchor> {
    if let Some((seq, mac)) = last_row(client, chain)? {
        let mac = <[u8; MAC_LEN]>::try_from(mac.as_slice())
            .map_err(|_| Error::internal(format!("record {seq} has a malformed MAC")))?;
        return Ok(Anchor { seq, mac });
    }
    let value: Option<Vec<u8>> = client
        .query_opt(
            "SELECT value FROM audit_anchors WHERE node_id = $1 AND name = $2",
            &[&chain, &Kind::Checkpoint.name()],
        )
        .map_err(db_error)?
        .map(|row| row.get(0));
    Ok(value
        .as_deref()
        .and_then(anchor::position)
        .unwrap_or(Anchor::GENESIS))
}

/// The record of a row in [`SELECT_RECORD`]'s order, or `None` when a column does not decode.
fn record_from_row(row: &Row) -> Option<AuditRecord> {
    let contexts: String = row.try_get(7).ok()?;
    let versions: String = row.try_get(8).ok()?;
    let outcome: String = row.try_get(10).ok()?;
    Some(AuditRecord {
        time_micros: row.try_get(1).ok()?,
        request_id: row.try_get(2).ok()?,
        caller: row.try_get(3).ok()?,
        peer: row.try_get(4).ok()?,
        tenant_id: row.try_get(5).ok()?,
        operation: row.try_get(6).ok()?,
        contexts: serde_json::from_str(&contexts).ok()?,
        key_versions: serde_json::from_str(&versions).ok()?,
        item_count: u32::try_from(row.try_get::<_, i64>(9).ok()?).ok()?,
        outcome: outcome_from_str(&outcome)?,
        aad_fingerprint: row.try_get(11).ok()?,
        detail: row.try_get(12).ok()?,
        trace_parent: row.try_get(14).ok()?,
    })
}

fn listed(row: &Row) -> Result<(u64, AuditRecord)> {
    let seq = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    let record = record_from_row(row)
        .ok_or_else(|| Error::internal(format!("audit record {seq} is malformed")))?;
    Ok((seq, record))
}

/// `chain`'s records matching `filter`, in sequence order.
pub(super) fn list(
    client: &mut impl GenericClient,
    chain: &str,
    filter: &ListFilter,
) -> Result<Vec<(u64, AuditRecord)>> {
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    client
        .query(
            &format!(
                "{SELECT_RECORD} WHERE node_id = $1 AND seq > $2 AND ($3 = '' OR tenant_id = $3) \
                 AND ($4::BIGINT IS NULL OR time_us >= $4) AND ($5::BIGINT IS NULL OR time_us < $5) \
                 AND ($6 = '' OR operation = $6) ORDER BY seq LIMIT $7"
            ),
            &[
                &chain,
                &seq_param(filter.after_seq),
                &filter.tenant_id,
                &filter.since_micros,
                &filter.until_micros,
                &filter.operation,
                &limit,
            ],
        )
        .map_err(db_error)?
        .iter()
        .map(listed)
        .collect()
}

/// Every chain's records matching `filter` after `after`, merged in (time, chain, sequence
/// number) order: one statement, so one committed state.
pub(super) fn list_merged(
    client: &mut impl GenericClient,
    filter: &ListFilter,
    after: Option<&MergeCursor>,
) -> Result<Vec<MergedRecord>> {
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let (time, chain, seq) = after.map_or((i64::MIN, String::new(), 0), |c| {
        (c.time_micros, c.chain.clone(), seq_param(c.seq))
    });
    client
        .query(
            &format!(
                "{SELECT_RECORD} WHERE (time_us, node_id, seq) > ($1, $2, $3) \
                 AND ($4 = '' OR tenant_id = $4) \
                 AND ($5::BIGINT IS NULL OR time_us >= $5) AND ($6::BIGINT IS NULL OR time_us < $6) \
                 AND ($7 = '' OR operation = $7) ORDER BY time_us, node_id, seq LIMIT $8"
            ),
            &[
                &time,
                &chain,
                &seq,
                &filter.tenant_id,
                &filter.since_micros,
                &filter.until_micros,
                &filter.operation,
                &limit,
            ],
        )
        .map_err(db_error)?
        .iter()
        .map(|row| {
            let (seq, record) = listed(row)?;
            Ok(MergedRecord {
                chain: row.get(15),
                seq,
                record,
            })
        })
        .collect()
}

/// How many records every chain holds together.
pub(super) fn count(client: &mut impl GenericClient) -> Result<u64> {
    let n: i64 = client
        .query_one("SELECT COUNT(*) FROM audit_records", &[])
        .map_err(db_error)?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Walks `chain` from `start` with the pure verifier, reading its rows from `from` on as a
/// stream; the caller holds the transaction that makes them one state.
fn walk_chain(
    tx: &mut Transaction<'_>,
    keys: &ChainKeys,
    chain: &str,
    start: WalkStart,
    from: i64,
) -> Result<VerifyReport> {
    let head = read_anchor(tx, keys, chain, Kind::Head)?;
    let sql = format!("{SELECT_RECORD} WHERE node_id = $1 AND seq >= $2 ORDER BY seq");
    let params: [&(dyn ToSql + Sync); 2] = [&chain, &from];
    let rows = tx
        .query_raw(sql.as_str(), params)
        .map_err(db_error)?
        .iterator()
        .map(|row| {
            let row = row.map_err(db_error)?;
            Ok(StoredRow {
                seq: row.get(0),
                record: record_from_row(&row),
                mac: row.try_get(13).unwrap_or_default(),
            })
        });
    verify::walk(keys, start, rows, head)
}

/// Verifies all of `chain`; the caller holds the transaction.
fn verify_chain(tx: &mut Transaction<'_>, keys: &ChainKeys, chain: &str) -> Result<VerifyReport> {
    let start = WalkStart::Beginning(read_anchor(tx, keys, chain, Kind::Checkpoint)?);
    walk_chain(tx, keys, chain, start, i64::MIN)
}

/// The names of every chain that has records or anchors, registered or not (an index skip
/// scan over the records' primary key, not a full scan).
fn chains_present(tx: &mut Transaction<'_>) -> Result<Vec<String>> {
    let rows = tx
        .query(
            "WITH RECURSIVE n AS ( \
               SELECT MIN(node_id) AS id FROM audit_records \
               UNION ALL \
               SELECT (SELECT MIN(node_id) FROM audit_records WHERE node_id > n.id) FROM n \
               WHERE n.id IS NOT NULL) \
             SELECT id FROM n WHERE id IS NOT NULL \
             UNION SELECT node_id FROM audit_anchors WHERE node_id <> '' ORDER BY 1",
            &[],
        )
        .map_err(db_error)?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Verifies the whole log in one snapshot: the registry, every chain it registers (a
/// registered chain without a head is a break: its records may have been deleted with it),
/// and any chain found that it does not register (a break). The report's head is `own`'s.
pub(super) fn verify_all(
    tx: &mut Transaction<'_>,
    keys: &ChainKeys,
    own: &str,
) -> Result<VerifyReport> {
    let registrations: Vec<StoredRegistration> = tx
        .query(
            "SELECT position, node_id, mac FROM audit_chains ORDER BY position",
            &[],
        )
        .map_err(db_error)?
        .iter()
        .map(|row| StoredRegistration {
            position: row.get(0),
            chain: row.get(1),
            mac: row.get(2),
        })
        .collect();
    let registry_head = read_anchor(tx, keys, REGISTRY_OWNER, Kind::Registry)?;
    let (mut problems, registered) = registry::check(keys, &registrations, registry_head);
    let mut chains: Vec<(String, VerifyReport)> = Vec::new();
    for chain in &registered {
        if read_anchor(tx, keys, chain, Kind::Head)? == Stored::Missing {
            problems.push(format!(
                "chain {chain} is registered but its signed head is missing: its records may \
                 have been deleted"
            ));
        }
        chains.push((chain.clone(), verify_chain(tx, keys, chain)?));
    }
    for chain in chains_present(tx)? {
        if !registered.contains(&chain) {
            problems.push(format!(
                "chain {chain} is not registered: it was added without the chain key, or its \
                 registration was removed"
            ));
            chains.push((chain.clone(), verify_chain(tx, keys, &chain)?));
        }
    }
    Ok(verify::combine(problems, chains, own))
}

/// The start-up check of `chain`: its last [`TAIL_CHECK_RECORDS`] records and its head.
pub(super) fn check_tail(
    tx: &mut Transaction<'_>,
    keys: &ChainKeys,
    chain: &str,
) -> Result<VerifyReport> {
    let after = match last_row(tx, chain)? {
        Some((last, _)) if last > TAIL_CHECK_RECORDS => last - TAIL_CHECK_RECORDS,
        _ => return verify_chain(tx, keys, chain),
    };
    let row = tx
        .query_opt(
            "SELECT seq, mac FROM audit_records WHERE node_id = $1 AND seq <= $2 \
             ORDER BY seq DESC LIMIT 1",
            &[&chain, &seq_param(after)],
        )
        .map_err(db_error)?
        .map(|row| (row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)));
    let (start, from) = match row {
        Some((at, mac)) => (
            WalkStart::After {
                next_seq: u64::try_from(at).unwrap_or(0) + 1,
                prev_mac: Some(mac),
            },
            at.saturating_add(1),
        ),
        None => (
            WalkStart::After {
                next_seq: after + 1,
                prev_mac: None,
            },
            seq_param(after + 1),
        ),
    };
    walk_chain(tx, keys, chain, start, from)
}

/// Judges an anchor kept from an earlier verify of `chain` ([`verify::judge_anchor`]).
pub(super) fn check_anchor(
    tx: &mut Transaction<'_>,
    keys: &ChainKeys,
    chain: &str,
    seq: u64,
    mac: &[u8],
) -> Result<Option<String>> {
    let checkpoint = read_anchor(tx, keys, chain, Kind::Checkpoint)?.valid();
    let stored: Option<Vec<u8>> = tx
        .query_opt(
            "SELECT mac FROM audit_records WHERE node_id = $1 AND seq = $2",
            &[&chain, &seq_param(seq)],
        )
        .map_err(db_error)?
        .map(|row| row.get(0));
    Ok(verify::judge_anchor(
        checkpoint,
        stored.as_deref(),
        seq,
        mac,
    ))
}

/// The registered chains, in registration order.
pub(super) fn registered(client: &mut impl GenericClient) -> Result<Vec<String>> {
    Ok(client
        .query("SELECT node_id FROM audit_chains ORDER BY position", &[])
        .map_err(db_error)?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Prunes `chain`'s oldest records, all older than `before_micros`, leaving the signed
/// checkpoint of the last one removed, in one transaction under the chain's lock. The caller
/// verified the whole log first. Returns how many were removed.
pub(super) fn prune_chain(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
    before_micros: i64,
) -> Result<u64> {
    let mut tx = client.transaction().map_err(db_error)?;
    lock_chain(&mut tx, chain)?;
    // Verified again under the chain's lock: a record edited after the caller's check must
    // not be deleted under a freshly signed checkpoint (that would erase the evidence).
    let report = verify_chain(&mut tx, keys, chain)?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "chain {chain} does not verify (record {}: {}); not pruning",
            report.first_bad_seq, report.reason
        )));
    }
    let keep_from: Option<i64> = tx
        .query_one(
            "SELECT MIN(seq) FROM audit_records WHERE node_id = $1 AND time_us >= $2",
            &[&chain, &before_micros],
        )
        .map_err(db_error)?
        .get(0);
    let last = tx
        .query_opt(
            "SELECT seq, mac FROM audit_records WHERE node_id = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT 1",
            &[&chain, &keep_from.unwrap_or(i64::MAX)],
        )
        .map_err(db_error)?
        .map(|row| (row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)));
    let Some((seq, mac)) = last else {
        return Ok(0);
    };
    let mac = <[u8; MAC_LEN]>::try_from(mac.as_slice())
        .map_err(|_| Error::internal("a verified record has a malformed MAC"))?;
    let removed = tx
        .execute(
            "DELETE FROM audit_records WHERE node_id = $1 AND seq <= $2",
            &[&chain, &seq],
        )
        .map_err(db_error)?;
    let checkpoint = Anchor {
        seq: u64::try_from(seq).unwrap_or(0),
        mac,
    };
    write_anchor(&mut tx, keys, chain, Kind::Checkpoint, &checkpoint)?;
    tx.commit().map_err(db_error)?;
    Ok(removed)
}

/// Recovers `chain` as [`crate::audit::AuditMaintenance::recover`] says, under its lock:
/// verifies it and, if it has unacknowledged breaks, appends the recovery record after its
/// actual end and re-signs its head there.
pub(super) fn recover_chain(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
    caller: &str,
) -> Result<verify::Recovery> {
    let mut tx = client.transaction().map_err(db_error)?;
    lock_chain(&mut tx, chain)?;
    let report = verify_chain(&mut tx, keys, chain)?;
    let Some(record) = verify::recovery_record(&report, caller)? else {
        return Ok(verify::Recovery {
            report,
            recovery_seq: 0,
        });
    };
    let checkpoint = read_anchor(&mut tx, keys, chain, Kind::Checkpoint)?;
    let (seq, prev) = verify::actual_tail(last_row(&mut tx, chain)?, checkpoint);
    let mac = keys.record_mac(&record, seq + 1, &prev);
    insert(&mut tx, chain, &[(seq + 1, &record, mac)])?;
    let head = Anchor { seq: seq + 1, mac };
    write_anchor(&mut tx, keys, chain, Kind::Head, &head)?;
    tx.commit().map_err(db_error)?;
    Ok(verify::Recovery {
        report,
        recovery_seq: head.seq,
    })
}
