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

/// The one-statement append of the steady state ([`append_fast`]): under the chain's lock,
/// and only if the chain still ends at the record and signed head value this writer committed
/// last, inserts the rows (one `UNNEST`) and moves the head; otherwise changes nothing and
/// returns false. Run in autocommit, so the call is its own transaction: one round trip,
/// COMMIT included. Versioned by name: a changed body gets a new name, so nodes of two
/// releases never call each other's. PL/pgSQL runs each statement with a fresh snapshot
/// (READ COMMITTED), so the checks after the lock see every append committed before it.
const APPEND_FUNCTION: &str = "tenant_kms_audit_append_v1";
const APPEND_FUNCTION_SQL: &str = "
CREATE OR REPLACE FUNCTION tenant_kms_audit_append_v1(
    p_chain TEXT, p_last_seq BIGINT, p_last_mac BYTEA, p_last_head BYTEA, p_new_head BYTEA,
    p_seqs BIGINT[], p_times BIGINT[], p_request_ids TEXT[], p_callers TEXT[], p_peers TEXT[],
    p_tenants TEXT[], p_operations TEXT[], p_contexts TEXT[], p_versions TEXT[],
    p_items BIGINT[], p_outcomes TEXT[], p_fingerprints TEXT[], p_details TEXT[],
    p_traces TEXT[], p_macs BYTEA[]) RETURNS BOOLEAN LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('tenant-kms/audit-chain/' || p_chain, 0));
    IF NOT EXISTS (
        SELECT 1 FROM (SELECT r.seq, r.mac FROM audit_records r WHERE r.node_id = p_chain
                       ORDER BY r.seq DESC LIMIT 1) AS last
        WHERE last.seq = p_last_seq AND last.mac = p_last_mac) THEN
        RETURN FALSE;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM audit_anchors a
        WHERE a.node_id = p_chain AND a.name = 'head' AND a.value = p_last_head) THEN
        RETURN FALSE;
    END IF;
    INSERT INTO audit_records (node_id, seq, time_us, request_id, caller, peer, tenant_id,
        operation, contexts, key_versions, item_count, outcome, aad_fingerprint, detail,
        trace_parent, mac)
    SELECT p_chain, * FROM UNNEST(p_seqs, p_times, p_request_ids, p_callers, p_peers,
        p_tenants, p_operations, p_contexts, p_versions, p_items, p_outcomes, p_fingerprints,
        p_details, p_traces, p_macs);
    UPDATE audit_anchors SET value = p_new_head WHERE node_id = p_chain AND name = 'head';
    RETURN TRUE;
END
$fn$;
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
            "SELECT to_regclass('audit_records_by_tenant') IS NOT NULL \
             AND to_regproc($1) IS NOT NULL",
            &[&APPEND_FUNCTION],
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
    // Under the lock too: concurrent `CREATE OR REPLACE FUNCTION`s fail with "tuple
    // concurrently updated".
    tx.batch_execute(APPEND_FUNCTION_SQL).map_err(db_error)?;
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
/// Returns the value written.
fn write_anchor(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    owner: &str,
    kind: Kind,
    anchor: &Anchor,
) -> Result<Vec<u8>> {
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
    Ok(value)
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

/// A batch of rows (sequence number, record, MAC) as the column arrays `UNNEST` takes: text
/// columns borrow the records' strings, and each record's JSON columns are encoded once.
struct Columns<'a> {
    seqs: Vec<i64>,
    times: Vec<i64>,
    request_ids: Vec<&'a str>,
    callers: Vec<&'a str>,
    peers: Vec<&'a str>,
    tenants: Vec<&'a str>,
    operations: Vec<&'a str>,
    contexts: Vec<String>,
    versions: Vec<String>,
    items: Vec<i64>,
    outcomes: Vec<&'static str>,
    fingerprints: Vec<&'a str>,
    details: Vec<&'a str>,
    traces: Vec<&'a str>,
    macs: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn new(rows: &'a [(u64, &'a AuditRecord, [u8; MAC_LEN])]) -> Self {
        let n = rows.len();
        let mut c = Columns {
            seqs: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            request_ids: Vec::with_capacity(n),
            callers: Vec::with_capacity(n),
            peers: Vec::with_capacity(n),
            tenants: Vec::with_capacity(n),
            operations: Vec::with_capacity(n),
            contexts: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            items: Vec::with_capacity(n),
            outcomes: Vec::with_capacity(n),
            fingerprints: Vec::with_capacity(n),
            details: Vec::with_capacity(n),
            traces: Vec::with_capacity(n),
            macs: Vec::with_capacity(n),
        };
        for (seq, r, mac) in rows {
            c.seqs.push(seq_param(*seq));
            c.times.push(r.time_micros);
            c.request_ids.push(&r.request_id);
            c.callers.push(&r.caller);
            c.peers.push(&r.peer);
            c.tenants.push(&r.tenant_id);
            c.operations.push(&r.operation);
            c.contexts
                .push(serde_json::to_string(&r.contexts).unwrap_or_default());
            c.versions
                .push(serde_json::to_string(&r.key_versions).unwrap_or_default());
            c.items.push(i64::from(r.item_count));
            c.outcomes.push(r.outcome.as_str());
            c.fingerprints.push(&r.aad_fingerprint);
            c.details.push(&r.detail);
            c.traces.push(&r.trace_parent);
            c.macs.push(mac.as_slice());
        }
        c
    }

    /// The arrays with their types, in the record columns' order after `node_id`.
    fn params(&self) -> [(&(dyn ToSql + Sync), Type); 15] {
        [
            (&self.seqs, Type::INT8_ARRAY),
            (&self.times, Type::INT8_ARRAY),
            (&self.request_ids, Type::TEXT_ARRAY),
            (&self.callers, Type::TEXT_ARRAY),
            (&self.peers, Type::TEXT_ARRAY),
            (&self.tenants, Type::TEXT_ARRAY),
            (&self.operations, Type::TEXT_ARRAY),
            (&self.contexts, Type::TEXT_ARRAY),
            (&self.versions, Type::TEXT_ARRAY),
            (&self.items, Type::INT8_ARRAY),
            (&self.outcomes, Type::TEXT_ARRAY),
            (&self.fingerprints, Type::TEXT_ARRAY),
            (&self.details, Type::TEXT_ARRAY),
            (&self.traces, Type::TEXT_ARRAY),
            (&self.macs, Type::BYTEA_ARRAY),
        ]
    }
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
    let columns = Columns::new(rows);
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::with_capacity(16);
    params.push((&chain, Type::TEXT));
    params.extend(columns.params());
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

/// Where an append of this process left `chain`: the last record's position and the exact
/// bytes of the signed head value it wrote. What [`append_fast`] checks the chain against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Written {
    head: Anchor,
    value: Vec<u8>,
}

/// The records of a batch after `head`: (sequence number, record, MAC) each, and the new head.
fn chain_rows<'a>(
    keys: &ChainKeys,
    mut head: Anchor,
    records: &[&'a AuditRecord],
    rows: &mut Vec<(u64, &'a AuditRecord, [u8; MAC_LEN])>,
) -> Anchor {
    for record in records {
        let seq = head.seq + 1;
        let mac = keys.record_mac(record, seq, &head.mac);
        rows.push((seq, record, mac));
        head = Anchor { seq, mac };
    }
    head
}

/// The steady-state append: `records` after `last`, in one autocommit statement (one round
/// trip, COMMIT included) through [`APPEND_FUNCTION`], which inserts them only if the chain
/// still ends at `last` — its last record is `last.head` (sequence number and MAC) and its
/// stored head value is byte for byte `last.value`. Those are the only facts the full
/// path's tail check ([`verify::writable_tail`]) reads, and a head value this writer signed
/// decodes to exactly `last.head`, so "unchanged" here is "writable, no evidence due" there.
/// `Ok(None)`: the chain changed (another writer of the node, a prune that took every
/// record, tampering), nothing was written: run [`append`]. An error may or may not have
/// committed: the caller must forget `last`.
pub(super) fn append_fast(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
    last: &Written,
    records: &[&AuditRecord],
) -> Result<Option<(u64, Written)>> {
    if last.head.seq == 0 {
        // Nothing to compare a last record with (a new or fully pruned chain): the full
        // path reads the checkpoint too.
        return Ok(None);
    }
    let mut rows = Vec::with_capacity(records.len());
    let head = chain_rows(keys, last.head, records, &mut rows);
    let value = anchor::encode_chain(keys, Kind::Head, chain, &head);
    let columns = Columns::new(&rows);
    let last_seq = seq_param(last.head.seq);
    let last_mac = last.head.mac.as_slice();
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::with_capacity(20);
    params.push((&chain, Type::TEXT));
    params.push((&last_seq, Type::INT8));
    params.push((&last_mac, Type::BYTEA));
    params.push((&last.value, Type::BYTEA));
    params.push((&value, Type::BYTEA));
    params.extend(columns.params());
    // An answer that does not decode is an error, never "changed": the full path after a
    // fast append that did commit would append the batch a second time.
    let done: std::result::Result<bool, postgres::Error> = client
        .query_typed_one(
            "SELECT tenant_kms_audit_append_v1($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             $12, $13, $14, $15, $16, $17, $18, $19, $20)",
            &params,
        )
        .and_then(|row| row.try_get(0));
    let done = match done {
        Ok(done) => done,
        // Nothing ran: the function is gone (dropped by hand, or a restore of a dump taken
        // without it). Create it again for the next batch; this one takes the full path.
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_FUNCTION) => {
            tracing::warn!(
                function = APPEND_FUNCTION,
                "the audit append function is missing from the database; creating it again"
            );
            create_schema(client)?;
            return Ok(None);
        }
        Err(e) => return Err(db_error(e)),
    };
    Ok(done.then(|| (last.head.seq + 1, Written { head, value })))
}

/// Appends `records` to `chain` as [`crate::audit::AuditAppend::append`] says: after an
/// `AuditTailMismatch` evidence record when the chain does not end at its signed head, the
/// head moved in the same transaction. Returns the first record's sequence number and where
/// the chain now ends (for [`append_fast`]).
pub(super) fn append(
    client: &mut impl GenericClient,
    keys: &ChainKeys,
    chain: &str,
    records: &[&AuditRecord],
) -> Result<(u64, Written)> {
    let mut tx = client.transaction().map_err(db_error)?;
    lock_chain(&mut tx, chain)?;
    let evidence;
    let mut rows: Vec<(u64, &AuditRecord, [u8; MAC_LEN])> = Vec::with_capacity(records.len() + 1);
    let head = match writable_tail(&mut tx, keys, chain)? {
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
    let head = chain_rows(keys, head, records, &mut rows);
    insert(&mut tx, chain, &rows)?;
    let value = write_anchor(&mut tx, keys, chain, Kind::Head, &head)?;
    tx.commit().map_err(db_error)?;
    Ok((first, Written { head, value }))
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
