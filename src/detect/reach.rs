//! Reach: a caller touching many tenants it has not touched before (enumeration), and a
//! burst of PERMISSION_DENIED / NOT_FOUND answers across tenant ids (probing).
//!
//! **Enumeration.** Per caller, the tenants it has named are remembered (as keyed hashes, at
//! most [`MAX_KNOWN_TENANTS`]; past that the caller starts learning again). For `learning`
//! after the caller is first seen it only learns. After that, a tenant it has not named
//! before counts as new; `new_tenants` new ones within one window trip. A tenant the caller
//! creates itself is learned, never counted (a provisioning job is not enumerating).
//!
//! **Probing.** Per caller, calls answered PERMISSION_DENIED or NOT_FOUND are collected per
//! window by distinct tenant; `tenants` distinct ones within one window trip. No learning
//! period: an honest caller is not refused across many tenant ids.

use std::collections::HashSet;

use super::table::{MapHasher, Table};

/// Most tenants remembered per caller; past it the caller's memory starts over.
pub const MAX_KNOWN_TENANTS: usize = 4096;

/// Settings of the enumeration detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnumerationPolicy {
    /// Length of one window (µs).
    pub window_micros: i64,
    /// New tenants within one window that trip.
    pub new_tenants: u32,
    /// How long a newly seen caller only learns (µs).
    pub learning_micros: i64,
}

impl Default for EnumerationPolicy {
    /// 50 new tenants within 10 minutes, after one hour of learning.
    fn default() -> Self {
        Self {
            window_micros: 600_000_000,
            new_tenants: 50,
            learning_micros: 3_600_000_000,
        }
    }
}

/// Settings of the probing detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbingPolicy {
    /// Length of one window (µs).
    pub window_micros: i64,
    /// Distinct refused tenants within one window that trip.
    pub tenants: u32,
}

impl Default for ProbingPolicy {
    /// 10 distinct tenant ids refused within one minute.
    fn default() -> Self {
        Self {
            window_micros: 60_000_000,
            tenants: 10,
        }
    }
}

/// A caller's reach.
pub struct Reach {
    first_seen: i64,
    known: HashSet<u64, MapHasher>,
    window_start: i64,
    new_in_window: u32,
    fired: bool,
}

/// A caller's refusals.
pub struct Probe {
    window_start: i64,
    refused: Vec<u64>,
    fired: bool,
}

/// What tripped enumeration or probing: tenants counted in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReachFigures {
    /// New (enumeration) or refused (probing) tenants in the window.
    pub tenants: u32,
    /// The window's length (µs).
    pub window_micros: i64,
}

/// The reach detectors' tables.
pub struct Reaches {
    pub(super) reach: Table<Reach>,
    pub(super) probes: Table<Probe>,
}

impl Reaches {
    /// Tables of at most `cap` callers each.
    pub fn new(cap: usize, enumeration: &EnumerationPolicy, probing: &ProbingPolicy) -> Self {
        Self {
            reach: Table::new(
                cap,
                enumeration
                    .learning_micros
                    .max(enumeration.window_micros)
                    .saturating_mul(4),
            ),
            probes: Table::new(cap, probing.window_micros.saturating_mul(4)),
        }
    }

    /// `caller` named `tenant` at `now` (`created`: by creating it). The figures if
    /// enumeration tripped now.
    pub fn touch(
        &mut self,
        policy: &EnumerationPolicy,
        caller: u64,
        tenant: u64,
        created: bool,
        now: i64,
    ) -> Option<ReachFigures> {
        let reach = self.reach.touch(caller, now, || Reach {
            first_seen: now,
            known: HashSet::default(),
            window_start: now,
            new_in_window: 0,
            fired: false,
        })?;
        if reach.known.contains(&tenant) {
            return None;
        }
        if reach.known.len() >= MAX_KNOWN_TENANTS {
            // A caller that legitimately reaches this many tenants learns afresh rather than
            // being judged against a memory that cannot hold its reach.
            reach.known.clear();
            reach.first_seen = now;
        }
        reach.known.insert(tenant);
        if created || now < reach.first_seen.saturating_add(policy.learning_micros) {
            return None;
        }
        if now
            >= reach
                .window_start
                .saturating_add(policy.window_micros.max(1))
        {
            reach.window_start = now;
            reach.new_in_window = 0;
            reach.fired = false;
        }
        reach.new_in_window = reach.new_in_window.saturating_add(1);
        if !reach.fired && reach.new_in_window >= policy.new_tenants.max(1) {
            reach.fired = true;
            return Some(ReachFigures {
                tenants: reach.new_in_window,
                window_micros: policy.window_micros,
            });
        }
        None
    }

    /// `caller` was refused (PERMISSION_DENIED or NOT_FOUND) for `tenant` at `now`. The
    /// figures if probing tripped now.
    pub fn refused(
        &mut self,
        policy: &ProbingPolicy,
        caller: u64,
        tenant: u64,
        now: i64,
    ) -> Option<ReachFigures> {
        let probe = self.probes.touch(caller, now, || Probe {
            window_start: now,
            refused: Vec::new(),
            fired: false,
        })?;
        if now
            >= probe
                .window_start
                .saturating_add(policy.window_micros.max(1))
        {
            probe.window_start = now;
            probe.refused.clear();
            probe.fired = false;
        }
        let wanted = usize::try_from(policy.tenants.max(1)).unwrap_or(usize::MAX);
        // Bounded by the threshold: once it trips, further tenants need not be remembered.
        if probe.fired || probe.refused.contains(&tenant) || probe.refused.len() >= wanted {
            return None;
        }
        probe.refused.push(tenant);
        if probe.refused.len() >= wanted {
            probe.fired = true;
            return Some(ReachFigures {
                tenants: u32::try_from(probe.refused.len()).unwrap_or(u32::MAX),
                window_micros: policy.window_micros,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumeration_learns_then_counts_new_tenants() {
        let policy = EnumerationPolicy {
            window_micros: 100,
            new_tenants: 3,
            learning_micros: 1000,
        };
        let mut reaches = Reaches::new(10, &policy, &ProbingPolicy::default());
        // Learning: many tenants, nothing trips.
        for t in 0..20 {
            assert_eq!(reaches.touch(&policy, 1, t, false, t as i64), None);
        }
        // Known tenants never count; created ones neither.
        assert_eq!(reaches.touch(&policy, 1, 5, false, 2000), None);
        assert_eq!(reaches.touch(&policy, 1, 100, true, 2001), None);
        assert_eq!(reaches.touch(&policy, 1, 101, false, 2002), None);
        assert_eq!(reaches.touch(&policy, 1, 102, false, 2003), None);
        let figures = reaches.touch(&policy, 1, 103, false, 2004).unwrap();
        assert_eq!(figures.tenants, 3);
        // Once per window.
        assert_eq!(reaches.touch(&policy, 1, 104, false, 2005), None);
    }

    #[test]
    fn probing_counts_distinct_refused_tenants_per_window() {
        let policy = ProbingPolicy {
            window_micros: 100,
            tenants: 3,
        };
        let mut reaches = Reaches::new(10, &EnumerationPolicy::default(), &policy);
        assert_eq!(reaches.refused(&policy, 1, 7, 0), None);
        assert_eq!(
            reaches.refused(&policy, 1, 7, 1),
            None,
            "the same tenant again"
        );
        assert_eq!(reaches.refused(&policy, 1, 8, 2), None);
        // A new window starts over.
        assert_eq!(reaches.refused(&policy, 1, 9, 200), None);
        assert_eq!(reaches.refused(&policy, 1, 10, 201), None);
        assert_eq!(reaches.refused(&policy, 1, 11, 202).unwrap().tenants, 3);
        // Another caller is counted apart.
        assert_eq!(reaches.refused(&policy, 2, 11, 203), None);
    }
}
