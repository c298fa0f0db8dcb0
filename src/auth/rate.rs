//! Per-caller rate limits: one token bucket per caller (a token id, a certificate identity,
//! or, for calls that fail authentication, the peer's IP address), refilled continuously at
//! `rate` calls per second up to `burst`. A call takes one token; an empty bucket answers
//! with how long until the next token, which the client gets as retry info.
//!
//! The buckets live in one mutex-guarded map: a check is a few arithmetic operations, far
//! shorter than anything else a call does, so contention is not worth sharding for. The map
//! is bounded: when full, buckets that have refilled completely (indistinguishable from new
//! ones) are dropped first, and if none has, the map starts over (a burst of fresh buckets is
//! the worst that can happen, never a refusal of a caller that did nothing).

use std::hash::RandomState;
use std::sync::Mutex;

use hashbrown::HashMap;
use std::time::{Duration, Instant};

/// Rate-limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Calls per second each caller may sustain; 0 disables the limit.
    pub per_second: f64,
    /// Calls a caller may make at once after being idle (the bucket size, at least 1).
    pub burst: u32,
}

impl Default for RateLimit {
    /// 10,000 calls per second with bursts of 20,000, per caller: a guard against a runaway
    /// client rather than a quota (batches carry up to 10,000 values per call, so this is far
    /// above what one application instance needs). Operators tighten it per deployment.
    fn default() -> Self {
        Self {
            per_second: 10_000.0,
            burst: 20_000,
        }
    }
}

/// Most callers tracked at once.
const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The per-caller token buckets.
pub struct RateLimiter {
    limit: RateLimit,
    /// Keyed also by peer addresses of failed authentications (chosen by anyone who can
    /// connect), so std's keyed SipHash, bounded by `MAX_BUCKETS`.
    buckets: Mutex<HashMap<String, Bucket, RandomState>>,
}

impl RateLimiter {
    /// A limiter with the given settings.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::default()),
        }
    }

    /// The settings.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token from `key`'s bucket: `Ok(())`, or `Err(wait)` with the time until a
    /// token will be there.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`RateLimiter::check`] at a given instant (for tests).
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let RateLimit { per_second, burst } = self.limit;
        if per_second <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_second
                    < burst
            });
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        // The key is copied only when its bucket is new, not on every call.
        let bucket = buckets.entry_ref(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / per_second;
            Err(Duration::from_secs_f64(wait.min(86_400.0)).max(Duration::from_millis(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("a", t0).is_ok());
        }
        let wait = limiter.check_at("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(limiter.check_at("b", t0).is_ok(), "buckets are per caller");
        assert!(
            limiter
                .check_at("a", t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            limiter
                .check_at("a", t0 + Duration::from_millis(500))
                .is_err()
        );
    }

    #[test]
    fn zero_rate_disables() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 0.0,
            burst: 0,
        });
        for _ in 0..10 {
            assert!(limiter.check("a").is_ok());
        }
    }
}
