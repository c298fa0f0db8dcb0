//! Which failed calls are tried again, and when.
//!
//! Two answers are retried:
//!
//! - **RESOURCE_EXHAUSTED with `retry-after-ms` metadata**, for every RPC. The server sends
//!   the hint only when it refused the call at admission (rate limit, concurrency cap,
//!   refused-authentication budget), before the call touched anything: the call did nothing,
//!   so sending it again is safe even for CreateTenant or RotateTenantKey. The wait is the
//!   hint (plus up to 10 % jitter, so clients refused together do not return together). A
//!   RESOURCE_EXHAUSTED without the hint (a spent nonce budget, a message too large) is final.
//! - **UNAVAILABLE**, only for [`Idempotency::Idempotent`] RPCs, after capped exponential
//!   back-off with full jitter (`random(0, min(max_delay, base_delay * 2^attempt))`, as in
//!   AWS's "Exponential Backoff and Jitter"). UNAVAILABLE does not say whether the server
//!   acted (a connection may drop after the server committed), so a call whose repetition
//!   would change the outcome is not repeated.
//!
//! The idempotent RPCs are the data plane (Encrypt, Decrypt, the batches, GenerateDataKey,
//! GenerateDataKeyWithoutPlaintext, DecryptDataKey, Rewrap, ComputeBlindIndex: repeating one
//! gives another equally valid answer), the reads (GetTenant, ListTenants, ListKeyVersions,
//! ListBlindIndexes, ListAuditEvents, VerifyAuditChain, GetUsage) and the two declarative
//! writes whose repetition is a no-op by contract (SetRotationPolicy sets the same values again;
//! DeclareBlindIndex returns an identical definition unchanged). The others — CreateTenant,
//! RotateTenantKey, Suspend/Resume, Schedule/CancelTenantDeletion and Enable/Disable/
//! DestroyKeyVersion — are not retried on UNAVAILABLE (a second RotateTenantKey would rotate
//! twice; a second CreateTenant would answer ALREADY_EXISTS).

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tonic::Code;

/// The metadata key of the server's retry hint, in milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Whether an RPC may be sent again after an answer that does not say whether it acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating the call gives an equally valid outcome.
    Idempotent,
    /// Repeating the call may change the outcome; retried only when the server says it did
    /// nothing.
    NotIdempotent,
}

/// How many times and how long to retry (see the module docs for what is retried).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// The back-off ceiling after the first UNAVAILABLE.
    pub base_delay: Duration,
    /// The back-off ceiling never grows past this.
    pub max_delay: Duration,
    /// A `retry-after-ms` hint longer than this is not waited for: the status is returned.
    pub max_hint: Duration,
}

impl Default for RetryPolicy {
    /// Four attempts, back-off from 50 ms capped at 2 s, hints up to 10 s honoured.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            max_hint: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// How long to wait before attempt `attempt + 1` (`attempt` counts from 0) after
    /// `status`, or `None` when the call must not be retried. `unit` is a uniform random
    /// number in [0, 1) (the jitter), given so the schedule can be tested.
    pub fn delay(
        &self,
        idempotency: Idempotency,
        status: &tonic::Status,
        attempt: u32,
        unit: f64,
    ) -> Option<Duration> {
        if attempt.saturating_add(1) >= self.max_attempts {
            return None;
        }
        let unit = unit.clamp(0.0, 1.0);
        match status.code() {
            Code::ResourceExhausted => {
                let hint = retry_after(status)?;
                (hint <= self.max_hint).then(|| hint + hint.mul_f64(0.1 * unit))
            }
            Code::Unavailable if idempotency == Idempotency::Idempotent => {
                let ceiling = self
                    .base_delay
                    .saturating_mul(2u32.saturating_pow(attempt))
                    .min(self.max_delay);
                Some(ceiling.mul_f64(unit))
            }
            _ => None,
        }
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts are spent; the last
    /// status is returned.
    pub async fn run<T, F, Fut>(
        &self,
        idempotency: Idempotency,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            let status = match call().await {
                Ok(answer) => return Ok(answer),
                Err(status) => status,
            };
            let unit = rand::rng().random::<f64>();
            match self.delay(idempotency, &status, attempt, unit) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(status),
            }
            attempt += 1;
        }
    }
}

/// The server's `retry-after-ms` hint, if the status carries a valid one.
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    let text = status.metadata().get(RETRY_AFTER_MS)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn exhausted(hint_ms: Option<&str>) -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted("slow down");
        if let Some(hint) = hint_ms {
            status
                .metadata_mut()
                .insert(RETRY_AFTER_MS, hint.parse().unwrap());
        }
        status
    }

    #[test]
    fn hints_are_honoured_for_every_call_and_only_hints() {
        let policy = RetryPolicy::default();
        let hinted = exhausted(Some("250"));
        for idempotency in [Idempotency::Idempotent, Idempotency::NotIdempotent] {
            assert_eq!(
                policy.delay(idempotency, &hinted, 0, 0.0),
                Some(Duration::from_millis(250))
            );
            let wait = policy.delay(idempotency, &hinted, 0, 0.999).unwrap();
            assert!(wait >= Duration::from_millis(250) && wait < Duration::from_millis(276));
        }
        assert_eq!(
            policy.delay(Idempotency::Idempotent, &exhausted(None), 0, 0.5),
            None,
            "no hint (a spent nonce budget): final"
        );
        assert_eq!(
            policy.delay(Idempotency::Idempotent, &exhausted(Some("junk")), 0, 0.5),
            None
        );
        assert_eq!(
            policy.delay(Idempotency::Idempotent, &exhausted(Some("60000")), 0, 0.5),
            None,
            "a hint past max_hint is returned, not slept through"
        );
    }

    #[test]
    fn unavailable_backs_off_exponentially_with_a_cap_for_idempotent_calls_only() {
        let policy = RetryPolicy {
            max_attempts: 10,
            ..RetryPolicy::default()
        };
        let unavailable = tonic::Status::unavailable("down");
        let ceilings: Vec<_> = (0..8)
            .map(|attempt| {
                policy
                    .delay(Idempotency::Idempotent, &unavailable, attempt, 1.0)
                    .unwrap()
            })
            .collect();
        assert_eq!(ceilings[0], Duration::from_millis(50));
        assert_eq!(ceilings[1], Duration::from_millis(100));
        assert_eq!(ceilings[4], Duration::from_millis(800));
        assert_eq!(ceilings[7], Duration::from_secs(2), "capped");
        assert_eq!(
            policy.delay(Idempotency::Idempotent, &unavailable, 3, 0.25),
            Some(Duration::from_millis(100)),
            "full jitter: a fraction of the ceiling"
        );
        assert_eq!(
            policy.delay(Idempotency::NotIdempotent, &unavailable, 0, 0.5),
            None
        );
        for code in [
            tonic::Status::deadline_exceeded("?"),
            tonic::Status::internal("x"),
            tonic::Status::invalid_argument("x"),
        ] {
            assert_eq!(policy.delay(Idempotency::Idempotent, &code, 0, 0.5), None);
        }
    }

    #[tokio::test]
    async fn run_stops_after_max_attempts_and_returns_the_last_status() {
        let policy = RetryPolicy {
            base_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = policy
            .run(Idempotency::Idempotent, || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(tonic::Status::unavailable("down")) }
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), policy.max_attempts);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = policy
            .run(Idempotency::NotIdempotent, || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(tonic::Status::unavailable("down")) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "not idempotent: one attempt"
        );

        let calls = AtomicU32::new(0);
        let answer = policy
            .run(Idempotency::NotIdempotent, || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Err(exhausted(Some("1")))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(
            answer, 2,
            "hinted refusals retried until the call is admitted"
        );
    }
}
