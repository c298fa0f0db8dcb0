//! A bounded map from a keyed hash to a detector's state, shared by every detector so that
//! no attacker-chosen name (a caller, a tenant id, a peer address) can grow memory without
//! bound.
//!
//! Keys are foldhash values ([`KeyHasher`]) under a per-process key with 64 bits from the OS
//! random source, so an attacker, who never sees a hash, cannot aim names at a collision (a
//! collision would only merge two keys' counts: an early or a missed detection for them,
//! never a refused call). foldhash is a fast keyed hash, not a MAC: chosen because these
//! hashes are on every call's path (a few nanoseconds per name, against ~20 for SipHash). No
//! name is stored, so an entry costs a few dozen bytes whatever the length of the names; the
//! maps hash their `u64` keys again with foldhash's fast variant (one multiply).
//!
//! When the map is full, entries idle for longer than the table's horizon are dropped, at most
//! once per horizon (a full map of live entries must not make every call scan it); if none can
//! go, a new key is simply not tracked (and counted in [`Table::untracked`]): the cost of an
//! attacker filling the map is that further keys go unwatched, never that a call is refused or
//! slowed.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// The keyed hash of names (see the module docs).
pub type KeyHasher = foldhash::quality::SeedableRandomState;

/// A fresh [`KeyHasher`] keyed from the OS random source.
pub fn key_hasher() -> KeyHasher {
    KeyHasher::with_seed(rand::random(), foldhash::SharedSeed::global_random())
}

/// The hasher of maps and sets keyed by [`key_of`] values (already keyed and uniform).
pub type MapHasher = foldhash::fast::RandomState;

/// One tracked key's state and when it was last touched (µs on the injected clock).
struct Entry<T> {
    touched: i64,
    value: T,
}

/// The bounded map (see the module docs).
pub struct Table<T> {
    entries: HashMap<u64, Entry<T>, MapHasher>,
    cap: usize,
    /// Entries idle longer than this (µs) may be dropped when the map is full.
    idle_micros: i64,
    /// When the last sweep ran (µs), so a full map is swept at most once per horizon.
    swept: i64,
    untracked: u64,
}

/// The keyed hash of `parts` (each part length-delimited by `Hash for str`).
pub fn key_of(hasher: &KeyHasher, parts: &[&str]) -> u64 {
    let mut state = hasher.build_hasher();
    for part in parts {
        part.hash(&mut state);
    }
    std::hash::Hasher::finish(&state)
}

impl<T> Table<T> {
    /// An empty table of at most `cap` keys (at least 1) whose entries idle for `idle_micros`
    /// may be dropped.
    pub fn new(cap: usize, idle_micros: i64) -> Self {
        Self {
            entries: HashMap::default(),
            cap: cap.max(1),
            idle_micros: idle_micros.max(1),
            swept: i64::MIN,
            untracked: 0,
        }
    }

    /// The state of `key`, made by `make` if it is new; `None` if the table is full of live
    /// entries (the key goes unwatched this time).
    pub fn touch(&mut self, key: u64, now: i64, make: impl FnOnce() -> T) -> Option<&mut T> {
        // The size first: below the cap (the usual case) a touch is one lookup, not two.
        if self.entries.len() >= self.cap && !self.entries.contains_key(&key) {
            if now.saturating_sub(self.swept) >= self.idle_micros {
                self.swept = now;
                let horizon = now.saturating_sub(self.idle_micros);
                self.entries.retain(|_, e| e.touched >= horizon);
            }
            if self.entries.len() >= self.cap {
                self.untracked = self.untracked.saturating_add(1);
                return None;
            }
        }
        let entry = self.entries.entry(key).or_insert_with(|| Entry {
            touched: now,
            value: make(),
        });
        entry.touched = now;
        Some(&mut entry.value)
    }

    /// The state of `key`, if tracked (does not count as a touch).
    pub fn get(&self, key: u64) -> Option<&T> {
        self.entries.get(&key).map(|e| &e.value)
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Observations that found the table full and went unwatched.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_idle_entries_make_room() {
        let mut table: Table<u32> = Table::new(2, 10);
        assert!(table.touch(1, 0, || 1).is_some());
        assert!(table.touch(2, 0, || 2).is_some());
        // Full of live entries: the third key is not tracked.
        assert!(table.touch(3, 5, || 3).is_none());
        assert_eq!(table.untracked(), 1);
        // Known keys are still served.
        assert_eq!(table.touch(1, 5, || 9).copied(), Some(1));
        // Swept at most once per horizon: not yet at 12.
        assert!(table.touch(3, 12, || 3).is_none());
        // At 15 key 2 has been idle for 15 (key 1 for 10, not more): it goes, 3 takes its place.
        assert!(table.touch(3, 15, || 3).is_some());
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn each_hasher_has_its_own_random_key() {
        // Two servers (or two runs) hash the same name differently: the key is not fixed.
        let (a, b) = (key_hasher(), key_hasher());
        assert_ne!(key_of(&a, &["token:x"]), key_of(&b, &["token:x"]));
    }

    #[test]
    fn keys_depend_on_every_part() {
        let hasher = key_hasher();
        assert_ne!(key_of(&hasher, &["ab", "c"]), key_of(&hasher, &["a", "bc"]));
        assert_eq!(key_of(&hasher, &["a", "b"]), key_of(&hasher, &["a", "b"]));
    }
}
