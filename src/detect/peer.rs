//! New peer: a caller's credential used from a network address it has not used before.
//!
//! Per caller, the peer addresses (without port) it has called from are remembered, at most
//! `max_peers`. For `learning` after the caller is first seen it only learns; after that a
//! new address trips (and is learned, so it trips once). A caller that has used more than
//! `max_peers` addresses is a fleet behind changing addresses: it is no longer judged (the
//! log names such callers once, in the record that says so).

use super::table::Table;

/// Settings of the new-peer detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerPolicy {
    /// How long a newly seen caller only learns its addresses (µs).
    pub learning_micros: i64,
    /// Most addresses remembered per caller.
    pub max_peers: usize,
}

impl Default for PeerPolicy {
    /// One hour of learning; 64 addresses per caller.
    fn default() -> Self {
        Self {
            learning_micros: 3_600_000_000,
            max_peers: 64,
        }
    }
}

/// A caller's known addresses.
pub struct Peers {
    first_seen: i64,
    known: Vec<u64>,
    saturated: bool,
}

/// What tripped the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerFigures {
    /// Addresses the caller had used before this one.
    pub known_peers: usize,
}

/// The new-peer detector's table.
pub struct NewPeers {
    pub(super) table: Table<Peers>,
}

impl NewPeers {
    /// A table of at most `cap` callers.
    pub fn new(cap: usize, policy: &PeerPolicy) -> Self {
        Self {
            // Forgetting a caller restarts its learning, so idle callers are kept long.
            table: Table::new(cap, policy.learning_micros.max(1).saturating_mul(24)),
        }
    }

    /// `caller` called from `peer` at `now`; the figures if that is a new address after the
    /// caller's learning period.
    pub fn observe(
        &mut self,
        policy: &PeerPolicy,
        caller: u64,
        peer: u64,
        now: i64,
    ) -> Option<PeerFigures> {
        let peers = self.table.touch(caller, now, || Peers {
            first_seen: now,
            known: Vec::new(),
            saturated: false,
        })?;
        if peers.saturated || peers.known.contains(&peer) {
            return None;
        }
        if peers.known.len() >= policy.max_peers.max(1) {
            peers.saturated = true;
            return None;
        }
        let known_peers = peers.known.len();
        peers.known.push(peer);
        let learning = now < peers.first_seen.saturating_add(policy.learning_micros);
        (!learning && known_peers > 0).then_some(PeerFigures { known_peers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_address_after_learning_trips_once() {
        let policy = PeerPolicy {
            learning_micros: 100,
            max_peers: 3,
        };
        let mut peers = NewPeers::new(10, &policy);
        assert_eq!(peers.observe(&policy, 1, 10, 0), None);
        assert_eq!(peers.observe(&policy, 1, 11, 50), None, "learning");
        assert_eq!(peers.observe(&policy, 1, 10, 200), None, "known");
        assert_eq!(
            peers.observe(&policy, 1, 12, 201),
            Some(PeerFigures { known_peers: 2 })
        );
        assert_eq!(peers.observe(&policy, 1, 12, 202), None, "learned now");
        // A fourth address: past max_peers the caller is no longer judged.
        assert_eq!(peers.observe(&policy, 1, 13, 203), None);
        assert_eq!(peers.observe(&policy, 1, 14, 204), None);
    }
}
