//! Rate spike: a caller's decrypt rate for one tenant far above its own learned baseline.
//!
//! Per (caller, tenant), decrypted items (Decrypt, the items of a DecryptBatch, DecryptDataKey)
//! are counted in fixed intervals. When an interval closes, its count is folded into an
//! exponentially weighted moving average (EWMA, weight `alpha` for the newest interval;
//! intervals with no call fold in as zeros). Once `warmup` intervals have closed, the open
//! interval's count is judged against `max(factor × baseline, floor)`: the floor keeps a
//! near-idle caller from tripping on a handful of calls, the warm-up keeps a new caller from
//! tripping before it has a baseline. One finding per interval at most.

use super::table::Table;

/// Settings of the rate-spike detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpikePolicy {
    /// Length of one counting interval (µs).
    pub interval_micros: i64,
    /// How far above the baseline the open interval's count must be.
    pub factor: f64,
    /// Least count that can trip, whatever the baseline.
    pub floor: u64,
    /// Closed intervals needed before the caller is judged.
    pub warmup: u32,
    /// Weight of the newest interval in the EWMA (0 < alpha ≤ 1).
    pub alpha: f64,
}

impl Default for SpikePolicy {
    /// One-minute intervals, 10× the baseline and at least 1,000 items per minute, after 10
    /// minutes of history, alpha 0.1 (about ten minutes of memory).
    fn default() -> Self {
        Self {
            interval_micros: 60_000_000,
            factor: 10.0,
            floor: 1_000,
            warmup: 10,
            alpha: 0.1,
        }
    }
}

/// One (caller, tenant)'s counts.
pub struct Rate {
    interval_start: i64,
    count: u64,
    baseline: f64,
    closed: u32,
    fired: bool,
}

/// What tripped the detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpikeFigures {
    /// Items in the open interval.
    pub count: u64,
    /// The learned baseline (items per interval).
    pub baseline: f64,
    /// The threshold the count passed.
    pub threshold: f64,
}

impl Rate {
    fn new(now: i64) -> Self {
        Self {
            interval_start: now,
            count: 0,
            baseline: 0.0,
            closed: 0,
            fired: false,
        }
    }
}

/// Adds `items` at `now` to `rate`; the figures if it tripped now.
pub fn observe(
    policy: &SpikePolicy,
    rate: &mut Rate,
    now: i64,
    items: u64,
) -> Option<SpikeFigures> {
    let interval = policy.interval_micros.max(1);
    let passed = now.saturating_sub(rate.interval_start) / interval;
    if passed >= 1 {
        let alpha = policy.alpha.clamp(f64::MIN_POSITIVE, 1.0);
        rate.baseline = if rate.closed == 0 {
            rate.count as f64
        } else {
            alpha * rate.count as f64 + (1.0 - alpha) * rate.baseline
        };
        // Empty intervals since: each decays the baseline (capped: after a thousand the
        // baseline is zero for any alpha worth having).
        let empty = (passed - 1).min(1000);
        rate.baseline *= (1.0 - alpha).powi(i32::try_from(empty).unwrap_or(1000));
        rate.closed = rate
            .closed
            .saturating_add(u32::try_from(passed).unwrap_or(u32::MAX));
        rate.interval_start = rate
            .interval_start
            .saturating_add(passed.saturating_mul(interval));
        rate.count = 0;
        rate.fired = false;
    }
    rate.count = rate.count.saturating_add(items);
    if rate.fired || rate.closed < policy.warmup {
        return None;
    }
    let threshold = (policy.factor * rate.baseline).max(policy.floor as f64);
    if (rate.count as f64) > threshold {
        rate.fired = true;
        return Some(SpikeFigures {
            count: rate.count,
            baseline: rate.baseline,
            threshold,
        });
    }
    None
}

/// The rate-spike detector's table.
pub struct Spikes {
    pub(super) table: Table<Rate>,
}

impl Spikes {
    /// A table of at most `cap` (caller, tenant) pairs.
    pub fn new(cap: usize, policy: &SpikePolicy) -> Self {
        // A pair idle for many intervals has a decayed baseline anyway.
        let idle = policy
            .interval_micros
            .saturating_mul(i64::from(policy.warmup.max(1)) * 4);
        Self {
            table: Table::new(cap, idle),
        }
    }

    /// Counts `items` for `key` at `now`.
    pub fn observe(
        &mut self,
        policy: &SpikePolicy,
        key: u64,
        now: i64,
        items: u64,
    ) -> Option<SpikeFigures> {
        let rate = self.table.touch(key, now, || Rate::new(now))?;
        observe(policy, rate, now, items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    #[test]
    fn steady_rate_is_silent_and_a_tenfold_jump_trips_once() {
        let policy = SpikePolicy {
            floor: 100,
            warmup: 3,
            ..SpikePolicy::default()
        };
        let mut rate = Rate::new(0);
        // Ten minutes at 200 per minute, spread over the minute.
        for minute in 0..10 {
            for i in 0..200 {
                let at = minute * MIN + i * (MIN / 200);
                assert_eq!(observe(&policy, &mut rate, at, 1), None, "minute {minute}");
            }
        }
        // Then 2,001 in the next minute: the 2,001st trips (10 × 200 = 2,000), once.
        let start = 10 * MIN;
        let mut tripped = Vec::new();
        for i in 0..3000 {
            if let Some(f) = observe(&policy, &mut rate, start + i, 1) {
                tripped.push((i, f));
            }
        }
        assert_eq!(tripped.len(), 1, "{tripped:?}");
        assert_eq!(tripped[0].0, 2000);
        assert!((tripped[0].1.baseline - 200.0).abs() < 1.0);
    }

    #[test]
    fn warmup_and_floor_hold() {
        let policy = SpikePolicy {
            floor: 50,
            warmup: 2,
            ..SpikePolicy::default()
        };
        let mut rate = Rate::new(0);
        // Before the warm-up nothing trips, however high.
        assert_eq!(observe(&policy, &mut rate, 0, 10_000), None);
        assert_eq!(observe(&policy, &mut rate, MIN, 1), None);
        // Baseline ~1000 now; after a long quiet spell it decays, but the floor holds.
        assert_eq!(observe(&policy, &mut rate, 500 * MIN, 50), None);
        assert!(observe(&policy, &mut rate, 500 * MIN + 1, 1).is_some());
    }

    #[test]
    fn without_warmup_the_floor_alone_decides() {
        let policy = SpikePolicy {
            floor: 5,
            warmup: 0,
            ..SpikePolicy::default()
        };
        let mut rate = Rate::new(0);
        for i in 0..5 {
            assert_eq!(observe(&policy, &mut rate, i, 1), None);
        }
        assert!(observe(&policy, &mut rate, 6, 1).is_some());
    }
}
