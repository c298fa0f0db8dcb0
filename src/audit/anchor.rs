//! Signed anchors of the chain: the **head** (the last record's sequence number and MAC,
//! rewritten in the same transaction as every append), the retention **checkpoint** (the
//! last pruned record's, written by `audit prune`) and the log's **identity** (written once,
//! when the data directory's audit key and its log are created together; it binds the log to
//! that key, so another directory's `audit.db` put in its place is refused at start). Pure:
//! encoding and checking only; where anchors are kept is the log backend's business
//! (`audit.db`'s `audit_meta` table for [`super::sqlite`]).
//!
//! A chain alone proves every record follows from its predecessor, but not that nothing was
//! cut from its end: the head closes that gap. Each anchor is stored as
//! `be64(seq) ‖ mac ‖ HMAC-SHA256(chain key, lp(label) ‖ be64(seq) ‖ mac)`, so someone without
//! the master key can delete an anchor or replay an old one, but cannot move one.

use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use crate::crypto::envelope::constant_time_eq;
use crate::crypto::labels::push_length_prefixed;

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
    /// The end of the registry of chains of a log with one chain per node (PostgreSQL):
    /// `seq` is the number of chains registered, `mac` the last registration's MAC.
    Registry,
}

impl Kind {
    /// The name the anchor is stored under (`audit_meta.name`): fixed, old logs use it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Head => "head",
            Kind::Checkpoint => "checkpoint",
            Kind::Identity => "identity",
            Kind::Registry => "registry",
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Kind::Head => b"tenant-kms/v1/audit-head",
            Kind::Checkpoint => b"tenant-kms/v1/audit-checkpoint",
            Kind::Identity => b"tenant-kms/v1/audit-identity",
            Kind::Registry => b"tenant-kms/v1/audit-registry",
        }
    }
}

/// What a log holds for an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Nothing.
    Missing,
    /// A value that is malformed or whose signature does not verify.
    Invalid,
    /// A value whose signature verifies.
    Valid(Anchor),
}

impl Stored {
    /// The anchor, if the stored value verified.
    pub fn valid(self) -> Option<Anchor> {
        match self {
            Stored::Valid(anchor) => Some(anchor),
            Stored::Missing | Stored::Invalid => None,
        }
    }
}

/// Label that binds an anchor to one chain of a log with several (PostgreSQL).
const CHAIN_LABEL: &[u8] = b"chain";

fn signature(keys: &ChainKeys, kind: Kind, chain: Option<&str>, anchor: &Anchor) -> [u8; MAC_LEN] {
    let mut bytes = Vec::with_capacity(64 + MAC_LEN);
    push_length_prefixed(&mut bytes, kind.label());
    // A chain's anchors also sign its name, so one chain's head or checkpoint cannot stand in
    // for another's. The unbound form (one chain, SQLite) is unchanged: its fixed 40 bytes
    // after the label cannot be confused with `lp("chain") ‖ lp(name) ‖ …`.
    if let Some(chain) = chain {
        push_length_prefixed(&mut bytes, CHAIN_LABEL);
        push_length_prefixed(&mut bytes, chain.as_bytes());
    }
    bytes.extend_from_slice(&anchor.seq.to_be_bytes());
    bytes.extend_from_slice(&anchor.mac);
    keys.sign(&bytes)
}

/// The stored value of an anchor: position and signature.
pub fn encode(keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> Vec<u8> {
    encode_value(keys, kind, None, anchor)
}

/// The stored value of an anchor of the chain named `chain` in a log with one chain per node:
/// as [`encode`], with the chain's name under the signature.
pub fn encode_chain(keys: &ChainKeys, kind: Kind, chain: &str, anchor: &Anchor) -> Vec<u8> {
    encode_value(keys, kind, Some(chain), anchor)
}

fn encode_value(keys: &ChainKeys, kind: Kind, chain: Option<&str>, anchor: &Anchor) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + 2 * MAC_LEN);
    value.extend_from_slice(&anchor.seq.to_be_bytes());
    value.extend_from_slice(&anchor.mac);
    value.extend_from_slice(&signature(keys, kind, chain, anchor));
    value
}

/// The position a stored value names, without checking its signature (what a backup
/// manifest records; the verifier checks the signature).
pub fn position(value: &[u8]) -> Option<Anchor> {
    // Layout: seq (8) ‖ mac (MAC_LEN) ‖ signature (MAC_LEN).
    let seq = <[u8; 8]>::try_from(value.get(..8)?).ok()?;
    let mac = <[u8; MAC_LEN]>::try_from(value.get(8..8 + MAC_LEN)?).ok()?;
    Some(Anchor {
        seq: u64::from_be_bytes(seq),
        mac,
    })
}

/// Checks a stored value (`None`: nothing stored) of the anchor `kind`.
pub fn decode(keys: &ChainKeys, kind: Kind, value: Option<&[u8]>) -> Stored {
    decode_value(keys, kind, None, value)
}

/// Checks a stored value of the anchor `kind` of the chain named `chain` ([`encode_chain`]):
/// another chain's anchor is [`Stored::Invalid`] here.
pub fn decode_chain(keys: &ChainKeys, kind: Kind, chain: &str, value: Option<&[u8]>) -> Stored {
    decode_value(keys, kind, Some(chain), value)
}

fn decode_value(keys: &ChainKeys, kind: Kind, chain: Option<&str>, value: Option<&[u8]>) -> Stored {
    let Some(value) = value else {
        return Stored::Missing;
    };
    let (Some(anchor), Some(sig)) = (position(value), value.get(8 + MAC_LEN..)) else {
        return Stored::Invalid;
    };
    if constant_time_eq(sig, &signature(keys, kind, chain, &anchor)) {
        Stored::Valid(anchor)
    } else {
        Stored::Invalid
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::crypto::secret::SecretKey;

    #[test]
    fn an_anchor_decodes_only_as_itself() {
        let keys = ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap();
        let other = ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap();
        let anchor = Anchor {
            seq: 7,
            mac: [9; MAC_LEN],
        };
        let value = encode(&keys, Kind::Head, &anchor);
        assert_eq!(
            decode(&keys, Kind::Head, Some(&value)),
            Stored::Valid(anchor)
        );
        assert_eq!(position(&value), Some(anchor));
        // Another kind, another key, a moved position, a cut value: invalid.
        assert_eq!(
            decode(&keys, Kind::Checkpoint, Some(&value)),
            Stored::Invalid
        );
        assert_eq!(decode(&other, Kind::Head, Some(&value)), Stored::Invalid);
        let mut moved = value.clone();
        moved[7] = 8;
        assert_eq!(decode(&keys, Kind::Head, Some(&moved)), Stored::Invalid);
        assert_eq!(
            decode(&keys, Kind::Head, Some(&value[..20])),
            Stored::Invalid
        );
        assert_eq!(decode(&keys, Kind::Head, None), Stored::Missing);
        // A chain's anchor checks only as that chain's, never unbound or as another chain's.
        let bound = encode_chain(&keys, Kind::Head, "node-a", &anchor);
        assert_eq!(
            decode_chain(&keys, Kind::Head, "node-a", Some(&bound)),
            Stored::Valid(anchor)
        );
        assert_eq!(
            decode_chain(&keys, Kind::Head, "node-b", Some(&bound)),
            Stored::Invalid
        );
        assert_eq!(decode(&keys, Kind::Head, Some(&bound)), Stored::Invalid);
        assert_eq!(
            decode_chain(&keys, Kind::Head, "node-a", Some(&value)),
            Stored::Invalid
        );
    }
}
