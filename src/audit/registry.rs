//! The registry of chains of a log with one chain per node (PostgreSQL, DESIGN §8): which
//! chains exist, so that deleting a whole chain (its records, its head, its registration) is
//! detected like deleting a record. Pure: the MAC of a registration and the check of what a
//! backend read; where the registry is kept is the backend's business.
//!
//! Registrations form a keyed chain of their own: registration `n` (from 1) of the chain
//! named `node` after the MAC `prev` (the genesis MAC for the first) has
//! `HMAC-SHA256(chain key, lp("tenant-kms/v1/audit-chain-registration") ‖ be64(n) ‖ lp(node)
//! ‖ lp(prev))`, and a signed anchor ([`super::anchor::Kind::Registry`]) names the last one.
//! A node registers its chain once, when it first opens the log; that is rare, so the one
//! registry anchor serializes nothing but registrations.

use super::anchor::{Anchor, Stored};
use super::chain::{ChainKeys, GENESIS_MAC, MAC_LEN};
use crate::crypto::envelope::constant_time_eq;
use crate::crypto::labels::push_length_prefixed;

/// Label of a registration's MAC input.
const REGISTRATION_LABEL: &[u8] = b"tenant-kms/v1/audit-chain-registration";

/// Longest chain (node) name: a node id, short and printable.
pub const MAX_CHAIN_NAME: usize = 128;

/// The MAC of registration `position` of the chain `chain` after `prev`.
pub fn registration_mac(
    keys: &ChainKeys,
    position: u64,
    chain: &str,
    prev: &[u8],
) -> [u8; MAC_LEN] {
    let mut bytes = Vec::with_capacity(64 + chain.len() + MAC_LEN);
    push_length_prefixed(&mut bytes, REGISTRATION_LABEL);
    bytes.extend_from_slice(&position.to_be_bytes());
    push_length_prefixed(&mut bytes, chain.as_bytes());
    push_length_prefixed(&mut bytes, prev);
    keys.sign(&bytes)
}

/// The next registration after the registry's end `tail` (from its valid anchor; genesis for
/// an empty registry): its position and MAC, and the registry anchor that names it.
pub fn next_registration(keys: &ChainKeys, tail: Anchor, chain: &str) -> Anchor {
    let seq = tail.seq + 1;
    Anchor {
        seq,
        mac: registration_mac(keys, seq, chain, &tail.mac),
    }
}

/// One registration as stored, nothing trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRegistration {
    /// Its position as stored.
    pub position: i64,
    /// The chain it registers.
    pub chain: String,
    /// Its stored MAC.
    pub mac: Vec<u8>,
}

/// Whether a chain name is acceptable: 1 to [`MAX_CHAIN_NAME`] bytes of ASCII letters,
/// digits, `-`, `_`, `.` and `:`.
pub fn valid_chain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHAIN_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Checks the registry: `rows` in position order, `head` its anchor. Returns the problems in
/// words (empty: whole) and the names of the chains it registers, in position order (those
/// of broken registrations included, so their records are still walked).
pub fn check(
    keys: &ChainKeys,
    rows: &[StoredRegistration],
    head: Stored,
) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut prev: Vec<u8> = GENESIS_MAC.to_vec();
    let mut expected: u64 = 1;
    for row in rows {
        let position = u64::try_from(row.position).unwrap_or(0);
        if position != expected {
            problems.push(if position > expected {
                format!(
                    "registrations {expected} to {} are missing (a chain was removed)",
                    position - 1
                )
            } else {
                format!("registration {} is out of place", row.position)
            });
        } else if !constant_time_eq(
            &registration_mac(keys, position, &row.chain, &prev),
            &row.mac,
        ) {
            problems.push(format!(
                "registration {position} (chain {}) was edited or inserted (MAC mismatch)",
                row.chain
            ));
        }
        prev = row.mac.clone();
        expected = position.max(expected) + 1;
    }
    let count = expected - 1;
    match head {
        Stored::Missing if rows.is_empty() => {}
        Stored::Missing => problems.push("the signed registry head is missing".into()),
        Stored::Invalid => problems
            .push("the signed registry head is invalid, so chains may have been removed".into()),
        Stored::Valid(head) if head.seq > count => problems.push(format!(
            "the signed registry head names {} chains but {count} are registered: a chain \
             was removed",
            head.seq
        )),
        Stored::Valid(head) if head.seq < count => problems.push(format!(
            "{} chains are registered but the signed registry head names {}: registered \
             without the chain key",
            count, head.seq
        )),
        Stored::Valid(head) => {
            if !constant_time_eq(&head.mac, &prev) {
                problems.push(format!(
                    "registration {} is not the one the signed registry head names",
                    head.seq
                ));
            }
        }
    }
    let names = rows.iter().map(|r| r.chain.clone()).collect();
    (problems, names)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit::anchor::{self, Kind};
    use crate::crypto::secret::SecretKey;

    fn registry(keys: &ChainKeys, names: &[&str]) -> (Vec<StoredRegistration>, Stored) {
        let mut tail = Anchor::GENESIS;
        let mut rows = Vec::new();
        for name in names {
            tail = next_registration(keys, tail, name);
            rows.push(StoredRegistration {
                position: tail.seq as i64,
                chain: (*name).into(),
                mac: tail.mac.to_vec(),
            });
        }
        let value = anchor::encode(keys, Kind::Registry, &tail);
        (rows, anchor::decode(keys, Kind::Registry, Some(&value)))
    }

    #[test]
    fn a_removed_renamed_or_added_chain_is_a_problem() {
        let keys = ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap();
        let (rows, head) = registry(&keys, &["a", "b", "c"]);
        let (problems, names) = check(&keys, &rows, head);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names, ["a", "b", "c"]);
        assert!(check(&keys, &[], Stored::Missing).0.is_empty());
        let mut removed_middle = rows.clone();
        removed_middle.remove(1);
        let mut removed_last = rows.clone();
        removed_last.pop();
        let mut renamed = rows.clone();
        renamed[1].chain = "x".into();
        let mut added = rows.clone();
        added.push(StoredRegistration {
            position: 4,
            chain: "d".into(),
            mac: vec![1; MAC_LEN],
        });
        for (what, rows, head) in [
            ("removed in the middle", removed_middle, head),
            ("removed at the end", removed_last, head),
            ("renamed", renamed, head),
            ("added", added, head),
            ("head deleted", rows.clone(), Stored::Missing),
            ("head invalid", rows.clone(), Stored::Invalid),
        ] {
            assert!(!check(&keys, &rows, head).0.is_empty(), "{what}");
        }
    }

    #[test]
    fn chain_names_are_short_and_printable() {
        assert!(valid_chain_name("node-1.eu:a_b"));
        for bad in ["", "a b", "a\n", "ä", &"x".repeat(MAX_CHAIN_NAME + 1)] {
            assert!(!valid_chain_name(bad), "{bad:?}");
        }
    }
}
