//! The request guard: a tower layer in front of the `tenantkms.v1` services that caps the
//! number of requests in flight and enforces each request's deadline.
//!
//! **Concurrency cap.** A semaphore with `max_concurrent_requests` permits; a request that
//! finds none free is answered at once with RESOURCE_EXHAUSTED and retry info, before it is
//! decoded or authenticated. We refuse rather than queue (as tower's `ConcurrencyLimit` would):
//! a queue hides overload, lets latency grow past every caller's deadline and holds memory for
//! requests that will time out anyway, while a fast refusal lets clients back off and retry
//! elsewhere. These refusals touch no key and are not audited (the audit store is what an
//! overload would stress first); they are logged at debug level. Health checks and reflection
//! are not counted, so an overloaded server still answers its orchestrator truthfully.
//!
//! **Deadlines.** The deadline is the caller's `grpc-timeout`, capped by the server's
//! `request_timeout` (which also applies when the caller sends none). When it passes, the
//! handler is dropped and the caller gets DEADLINE_EXCEEDED. tonic's own timeout (applied
//! outside every user layer, on the same header) would answer CANCELLED instead, so ours is
//! set [`DEADLINE_MARGIN`] earlier and is polled first: whenever tonic's timer has fired, ours
//! has too, and ours wins. The handler learns the deadline through [`RequestDeadline`] so a
//! call cut off before its audit record was written still leaves one (see `call::Call`'s
//! `Drop`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::codegen::http;

use super::status;
use crate::error::Error;

/// How much earlier than the caller's deadline ours fires (see the module docs).
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// Path prefix of the guarded services.
const GUARDED_PREFIX: &str = "/tenantkms.v1.";

/// The instant a request's deadline passes, put into its extensions by the guard.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub Instant);

/// Builds [`Guard`]s.
#[derive(Clone)]
pub struct GuardLayer {
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    max_timeout: Duration,
}

impl GuardLayer {
    /// A guard allowing `max_concurrent` requests in flight (at least 1) and deadlines of at
    /// most `max_timeout`.
    pub fn new(max_concurrent: usize, max_timeout: Duration) -> Self {
        let max_concurrent = max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            max_timeout,
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

/// The guard around one service (see the module docs).
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, R> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !request.uri().path().starts_with(GUARDED_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = Arc::clone(&self.layer.permits).try_acquire_owned() else {
            tracing::debug!(
                limit = self.layer.max_concurrent,
                "request refused: concurrency cap reached"
            );
            let refusal = Error::RetryLater {
                reason: format!(
                    "the server is at its limit of {} concurrent requests",
                    self.layer.max_concurrent
                ),
                retry_after_ms: 100,
            };
            let response = status::to_status(&refusal, "").into_http();
            return Box::pin(std::future::ready(Ok(response)));
        };
        let timeout = grpc_timeout(request.headers())
            .map_or(self.layer.max_timeout, |t| t.min(self.layer.max_timeout));
        let deadline = Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN);
        request.extensions_mut().insert(RequestDeadline(deadline));
        let work = self.inner.call(request);
        Box::pin(async move {
            let _permit = permit;
            match tokio::time::timeout_at(deadline, work).await {
                Ok(result) => result,
                Err(_) => Ok(status::to_status(&Error::DeadlineExceeded, "").into_http()),
            }
        })
    }
}

/// The `grpc-timeout` header (gRPC over HTTP/2: at most 8 digits, then H, M, S, m, u or n);
/// `None` when absent or malformed (tonic ignores a malformed one too).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit = text.chars().last()?;
    let digits = text.get(..text.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(value.saturating_mul(3600)),
        'M' => Duration::from_secs(value.saturating_mul(60)),
        'S' => Duration::from_secs(value),
        'm' => Duration::from_millis(value),
        'u' => Duration::from_micros(value),
        'n' => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse("123456789S"), None, "more than 8 digits");
        assert_eq!(parse("S"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("-5S"), None);
    }
}
