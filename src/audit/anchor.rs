//! Signed anchors of the chain, kept in `audit.db`'s `audit_meta` table: the **head** (the
//! last record's sequence number and MAC, rewritten in the same transaction as every append),
//! the retention **checkpoint** (the last pruned record's, written by `audit prune`) and the
//! log's **identity** (written once, when the data directory's audit key and its `audit.db`
//! are created together; it binds the file to that key, so another directory's `audit.db`
//! put in its place is refused at start, see [`super::sqlite::check_identity`]).
//!
//! A chain alone proves every record follows from its predecessor, but not that nothing was
//! cut from its end: the head closes that gap. Each anchor is stored as
//! `be64(seq) ‖ mac ‖ HMAC-SHA256(chain key, lp(label) ‖ be64(seq) ‖ mac)`, so someone without
//! the master key can delete an anchor or replay an old one, but cannot move one.

use rusqlite::{Connection, OptionalExtension, params};

use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use crate::crypto::envelope::constant_time_eq;
use crate::crypto::labels::push_length_prefixed;
use crate::error::Result;

/// A position in the chain: a sequence number and the MAC of the record there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The record's sequence number (0 before the first record).
    pub seq: u64,
    /// The record's MAC (the genesis MAC before the first record).
    pub mac: [u8; MAC_LEN],
}

impl Anchor {
    /// The position before the first record.
    pub const GENESIS: Anchor = Anchor {
        seq: 0,
        mac: GENESIS_MAC,
    };
}

/// Which anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The last appended record.
    Head,
    /// The last pruned record.
    Checkpoint,
    /// The log's birth under this data directory's audit key (always [`Anchor::GENESIS`]).
    Identity,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Head => "head",
            Kind::Checkpoint => "checkpoint",
            Kind::Identity => "identity",
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Kind::Head => b"tenant-kms/v1/audit-head",
            Kind::Checkpoint => b"tenant-kms/v1/audit-checkpoint",
            Kind::Identity => b"tenant-kms/v1/audit-identity",
        }
    }
}

/// What `audit_meta` holds for an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// No row.
    Missing,
    /// A row that is malformed or whose signature does not verify.
    Invalid,
    /// A row whose signature verifies.
    Valid(Anchor),
}

fn signature(keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> [u8; MAC_LEN] {
    let mut bytes = Vec::with_capacity(64 + MAC_LEN);
    push_length_prefixed(&mut bytes, kind.label());
    bytes.extend_from_slice(&anchor.seq.to_be_bytes());
    bytes.extend_from_slice(&anchor.mac);
    keys.sign(&bytes)
}

/// Reads and checks an anchor.
pub fn read(conn: &Connection, keys: &ChainKeys, kind: Kind) -> Result<Stored> {
    let value: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM audit_meta WHERE name = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([kind.name()], |row| Ok(super::sqlite::bytes_at(row, 0)))
                .optional()
        })
        .map_err(super::sqlite::sql_error)?;
    let Some(value) = value else {
        return Ok(Stored::Missing);
    };
    // Layout: seq (8) ‖ mac (MAC_LEN) ‖ signature (MAC_LEN).
    let (Some(seq), Some(mac), Some(sig)) = (
        value.get(..8),
        value.get(8..8 + MAC_LEN),
        value.get(8 + MAC_LEN..),
    ) else {
        return Ok(Stored::Invalid);
    };
    let (Ok(seq), Ok(mac)) = (<[u8; 8]>::try_from(seq), <[u8; MAC_LEN]>::try_from(mac)) else {
        return Ok(Stored::Invalid);
    };
    let anchor = Anchor {
        seq: u64::from_be_bytes(seq),
        mac,
    };
    if constant_time_eq(sig, &signature(keys, kind, &anchor)) {
        Ok(Stored::Valid(anchor))
    } else {
        Ok(Stored::Invalid)
    }
}

/// Writes (or replaces) an anchor. Call it inside the transaction that makes it true.
pub fn write(conn: &Connection, keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> Result<()> {
    let mut value = Vec::with_capacity(8 + 2 * MAC_LEN);
    value.extend_from_slice(&anchor.seq.to_be_bytes());
    value.extend_from_slice(&anchor.mac);
    value.extend_from_slice(&signature(keys, kind, anchor));
    conn.prepare_cached("INSERT OR REPLACE INTO audit_meta (name, value) VALUES (?1, ?2)")
        .and_then(|mut stmt| stmt.execute(params![kind.name(), value]))
        .map_err(super::sqlite::sql_error)?;
    Ok(())
}
