//! Tampering: a burst of ciphertexts that do not open for one tenant (a swapped, moved or
//! edited ciphertext fails its AEAD tag like any other; a burst of them is someone trying).
//!
//! Per tenant, failed opens (a Decrypt, DecryptDataKey or Rewrap answered with the generic
//! decryption failure, and the failed items of a DecryptBatch or RewrapBatch) are counted per
//! window; `failures` within one window trip, once per window.

use super::table::Table;

/// Settings of the tampering detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TamperPolicy {
    /// Length of one window (µs).
    pub window_micros: i64,
    /// Failed opens within one window that trip.
    pub failures: u32,
}

impl Default for TamperPolicy {
    /// 20 failed opens for one tenant within one minute.
    fn default() -> Self {
        Self {
            window_micros: 60_000_000,
            failures: 20,
        }
    }
}

/// A tenant's failed opens in the current window.
pub struct Failures {
    window_start: i64,
    count: u64,
    fired: bool,
}

/// The tampering detector's table.
pub struct Tampering {
    pub(super) table: Table<Failures>,
}

impl Tampering {
    /// A table of at most `cap` tenants.
    pub fn new(cap: usize, policy: &TamperPolicy) -> Self {
        Self {
            table: Table::new(cap, policy.window_micros.saturating_mul(4)),
        }
    }

    /// Counts `failed` opens for `tenant` at `now`; the window's count if it tripped now.
    pub fn observe(
        &mut self,
        policy: &TamperPolicy,
        tenant: u64,
        now: i64,
        failed: u64,
    ) -> Option<u64> {
        let entry = self.table.touch(tenant, now, || Failures {
            window_start: now,
            count: 0,
            fired: false,
        })?;
        if now
            >= entry
                .window_start
                .saturating_add(policy.window_micros.max(1))
        {
            entry.window_start = now;
            entry.count = 0;
            entry.fired = false;
        }
        entry.count = entry.count.saturating_add(failed);
        if !entry.fired && entry.count >= u64::from(policy.failures.max(1)) {
            entry.fired = true;
            return Some(entry.count);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_trips_once_per_window() {
        let policy = TamperPolicy {
            window_micros: 100,
            failures: 3,
        };
        let mut t = Tampering::new(10, &policy);
        assert_eq!(t.observe(&policy, 1, 0, 1), None);
        assert_eq!(t.observe(&policy, 1, 1, 1), None);
        assert_eq!(t.observe(&policy, 1, 2, 1), Some(3));
        assert_eq!(t.observe(&policy, 1, 3, 1), None);
        // Spread over windows, it stays silent.
        assert_eq!(t.observe(&policy, 2, 0, 2), None);
        assert_eq!(t.observe(&policy, 2, 150, 2), None);
        // A batch counts its failed items.
        assert_eq!(t.observe(&policy, 3, 0, 5), Some(5));
    }
}
