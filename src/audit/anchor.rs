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
}

impl Kind {
    /// The name the anchor is stored under (`audit_meta.name`): fixed, old logs use it.
    pub fn name(self) -> &'static str {
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

fn signature(keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> [u8; MAC_LEN] {
    let mut bytes = Vec::with_capacity(64 + MAC_LEN);
    push_length_prefixed(&mut bytes, kind.label());
    bytes.extend_from_slice(&anchor.seq.to_be_bytes());
    bytes.extend_from_slice(&anchor.mac);
    keys.sign(&bytes)
}

/// The stored value of an anchor: position and signature.
pub fn encode(keys: &ChainKeys, kind: Kind, anchor: &Anchor) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + 2 * MAC_LEN);
    value.extend_from_slice(&anchor.seq.to_be_bytes());
    value.extend_from_slice(&anchor.mac);
    value.extend_from_slice(&signature(keys, kind, anchor));
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
    let Some(value) = value else {
        return Stored::Missing;
    };
    let (Some(anchor), Some(sig)) = (position(value), value.get(8 + MAC_LEN..)) else {
        return Stored::Invalid;
    };
    if constant_time_eq(sig, &signature(keys, kind, &anchor)) {
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
    }
}
