//! The request guard: a tower layer in front of the `tenantkms.v1` services that receives each
//! request's body under a short deadline, hands the handler the [`Admission`] counter, and
//! enforces each request's deadline.
//!
//! **Body deadline.** A request's body must arrive whole within `body_timeout` (capped by its
//! own deadline); otherwise it is answered DEADLINE_EXCEEDED at once and its stream ends, so
//! the client's half-sent stream is reset and its place on the connection is freed. Until its
//! body is there a request holds no admission ticket (issue 13: a thousand streams with
//! half-sent bodies used to fill the global cap and lock every caller out). The body is read
//! here, up to the message size limit plus the gRPC frame prefix. Deadline refusals are not
//! audited: nothing was authenticated and no key was touched; they are logged at debug level.
//!
//! **Oversize bodies.** A body whose gRPC prefix announces more than the message limit, or
//! that grows past it, is refused at once with RESOURCE_EXHAUSTED, without reading the rest,
//! and counted in the aggregated refusal audit (`refusals`; issue 13: such requests used to
//! be refused by tonic with no audit record at all).
//!
//! **Requests waiting for their body, across connections.** At most `max_awaiting_body`
//! requests may wait for their bodies at once, server-wide (the per-connection stream limit
//! alone lets many connections hold many each). A request that finds the count full is given
//! [`FULL_GRACE`] for its body, since a complete request's body has normally arrived with its
//! headers; if the body is not there by then it is refused with RESOURCE_EXHAUSTED and its
//! stream ends. A caller sending complete requests is therefore served while an attacker's
//! half-sent streams hold every place.
//!
//! **Concurrency cap.** Counted by [`Admission`] once the caller is authenticated (in
//! `call::Call`), with fair shares per caller; a request that finds no place is answered at
//! once with RESOURCE_EXHAUSTED and retry info. We refuse rather than queue (as tower's
//! `ConcurrencyLimit` would): a queue hides overload, lets latency grow past every caller's
//! deadline and holds memory for requests that will time out anyway, while a fast refusal
//! lets clients back off and retry elsewhere. Health checks and reflection are not guarded,
//! so an overloaded server still answers its orchestrator truthfully.
//!
//! **Requests received, for the audit writer.** From the moment its body is whole until its
//! answer is made, each request is counted in the audit writer's
//! [`Arrivals`]: under load the writer waits a bounded while for their
//! records, so that one commit carries them (`crate::audit::arrivals`). A request whose body
//! has not arrived does not count.
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

use http_body_util::BodyExt;
use hyper::body::Bytes;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http;

use super::admission::Admission;
use super::refusals::{RefusalKind, RefusalsHandle, peer_ip};
use super::status;
use crate::audit::arrivals::Arrivals;
use crate::error::Error;

/// How much earlier than the caller's deadline ours fires (see the module docs).
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// Path prefix of the guarded services.
const GUARDED_PREFIX: &str = "/tenantkms.v1.";

/// The instant a request's deadline passes, put into its extensions by the guard.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub Instant);

/// The server's admission counter, put into every guarded request's extensions so the
/// handler can take a ticket once it has authenticated the caller.
#[derive(Clone)]
pub struct AdmissionHandle(pub Arc<Admission>);

/// How long a request that finds every body-waiting place taken may still wait for its body.
pub const FULL_GRACE: Duration = Duration::from_millis(200);

/// Builds [`Guard`]s.
#[derive(Clone)]
pub struct GuardLayer {
    admission: Arc<Admission>,
    refusals: Arc<super::refusals::Refusals>,
    awaiting_body: Arc<tokio::sync::Semaphore>,
    max_timeout: Duration,
    body_timeout: Duration,
    max_message_bytes: usize,
    arrivals: Arrivals,
}

/// The gRPC length-prefixed message header: a compression flag and a 4-byte length.
const GRPC_PREFIX_BYTES: usize = 5;

impl GuardLayer {
    /// A guard admitting up to `max_concurrent` authenticated requests (at least 1), with
    /// deadlines of at most `max_timeout`, bodies received within `body_timeout` by at most
    /// `max_awaiting_body` requests at once (at least 1), bodies buffered up to one message of
    /// `max_message_bytes`, refusals before authentication counted in `refusals`, and each
    /// request counted in `arrivals` from its whole body to its answer (the audit writer
    /// waits for their records under load: [`crate::audit::arrivals`]).
    pub fn new(
        max_concurrent: usize,
        max_timeout: Duration,
        body_timeout: Duration,
        max_message_bytes: usize,
        max_awaiting_body: usize,
        refusals: Arc<super::refusals::Refusals>,
        arrivals: Arrivals,
    ) -> Self {
        Self {
            admission: Admission::new(max_concurrent),
            refusals,
            awaiting_body: Arc::new(tokio::sync::Semaphore::new(
                max_awaiting_body.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            max_timeout,
            body_timeout,
            max_message_bytes,
            arrivals,
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

impl<S, R> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<R>> + Clone + Send + 'static,
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !request.uri().path().starts_with(GUARDED_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let timeout = grpc_timeout(request.headers())
            .map_or(self.layer.max_timeout, |t| t.min(self.layer.max_timeout));
        let deadline = Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN);
        let body_deadline = deadline.min(Instant::now() + self.layer.body_timeout);
        // The service was made ready for this call; a clone takes its place for the next one
        // (tower's documented pattern), because the call itself waits for the body first.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(RequestDeadline(deadline));
        parts
            .extensions
            .insert(AdmissionHandle(Arc::clone(&self.layer.admission)));
        parts
            .extensions
            .insert(RefusalsHandle(Arc::clone(&self.layer.refusals)));
        let layer = self.layer.clone();
        Box::pin(async move {
            // A place among the requests waiting for their bodies; without one, a short grace
            // (see the module docs). The place is held only while the body is received.
            let place = Arc::clone(&layer.awaiting_body).try_acquire_owned().ok();
            let receive_by = if place.is_some() {
                body_deadline
            } else {
                body_deadline.min(Instant::now() + FULL_GRACE)
            };
            let received =
                tokio::time::timeout_at(receive_by, receive(body, layer.max_message_bytes)).await;
            drop(place);
            let body = match received {
                Ok(Ok(body)) => body,
                Ok(Err(Refusal::Stream(refusal))) => {
                    tracing::debug!(reason = %refusal.message(), "request body refused");
                    return Ok(refusal.into_http());
                }
                Ok(Err(Refusal::Oversize)) => {
                    tracing::debug!("request refused: its body is over the message limit");
                    let request_id = super::call::new_request_id();
                    // Formatted here only: no other path of the guard names the peer, so an
                    // accepted call does not pay for it.
                    let peer = super::connections::peer_text(super::connections::connection_addr(
                        &parts.extensions,
                    ));
                    if let Err(e) = layer
                        .refusals
                        .record(
                            RefusalKind::Oversize,
                            peer_ip(&peer),
                            "anonymous",
                            parts.uri.path(),
                            &request_id,
                        )
                        .await
                    {
                        return Ok(status::to_status(&e, &request_id).into_http());
                    }
                    let refusal = tonic::Status::resource_exhausted(format!(
                        "the request is larger than the server's message limit of {} bytes \
                         (request id {request_id})",
                        layer.max_message_bytes
                    ));
                    return Ok(refusal.into_http());
                }
                Err(_) if receive_by < body_deadline => {
                    tracing::debug!("request refused: every body-waiting place is taken");
                    let refusal = tonic::Status::resource_exhausted(
                        "the server has too many requests waiting for their bodies; retry with \
                         the whole request",
                    );
                    return Ok(refusal.into_http());
                }
                Err(_) => {
                    tracing::debug!("request refused: its body did not arrive in time");
                    let refusal = tonic::Status::deadline_exceeded(
                        "the request body did not arrive before the server's body deadline",
                    );
                    return Ok(refusal.into_http());
                }
            };
            // Whole now: from here to its answer the request may append a record soon.
            let _arrival = layer.arrivals.arrive();
            let work = inner.call(http::Request::from_parts(parts, body));
            match tokio::time::timeout_at(deadline, work).await {
                Ok(result) => result,
                Err(_) => Ok(status::to_status(&Error::DeadlineExceeded, "").into_http()),
            }
        })
    }
}

/// Why a body was not received.
enum Refusal {
    /// The stream failed (answered CANCELLED).
    Stream(tonic::Status),
    /// The body announced or reached more than the message limit.
    Oversize,
}

/// Reads `body` until its end; returns a body that replays what was read. A body whose
/// first gRPC prefix announces a message over `max_message` bytes, or that grows past one
/// such message and its prefix, is refused at once without reading the rest. A transport
/// error while reading is the caller's stream failing: it is answered CANCELLED.
async fn receive(mut body: Body, max_message: usize) -> Result<Body, Refusal> {
    let limit = max_message.saturating_add(GRPC_PREFIX_BYTES);
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::Stream(tonic::Status::cancelled(format!(
                "the request stream failed: {}",
                e.message()
            )))
        })?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                let announced = data
                    .get(1..GRPC_PREFIX_BYTES)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes);
                if data.len() > limit
                    || announced
                        .is_some_and(|n| usize::try_from(n).unwrap_or(usize::MAX) > max_message)
                {
                    return Err(Refusal::Oversize);
                }
            }
            // gRPC requests carry no trailers; any that come are dropped with the stream's end.
            Err(_) => break,
        }
    }
    Ok(Body::new(
        http_body_util::Full::new(Bytes::from(data)).map_err(|never| match never {}),
    ))
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
