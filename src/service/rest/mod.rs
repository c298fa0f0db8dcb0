//! The HTTP/JSON API: a tower layer in front of the gRPC services, on the same port, that
//! turns each HTTP/JSON request into the very gRPC request a gRPC client would send and
//! passes it down the same stack (size refusals, the request guard with its deadlines and
//! admission, then the tonic services themselves, where authentication, authorization and
//! the audit record happen). No rule exists twice: an HTTP call is a gRPC call in another
//! encoding, audited as one.
//!
//! **Routing by content type.** A request whose `content-type` is `application/grpc…` goes to
//! gRPC untouched; every other request is HTTP/JSON: [`OPENAPI_PATH`], a route of
//! [`routes::ROUTES`], or 404. The server accepts HTTP/1.1 as well as HTTP/2 for this, over
//! TLS too (ALPN offers both, `service::tls`). gRPC needs HTTP/2 (its status travels in
//! trailers): a gRPC request over HTTP/1.1 is refused with [`GRPC_OVER_HTTP1`].
//!
//! - [`routes`]: the one table of HTTP bindings (router and OpenAPI both read it);
//! - [`transcode`]: canonical JSON ↔ protobuf through the descriptor set;
//! - [`errors`]: gRPC statuses as HTTP statuses and JSON error bodies;
//! - [`openapi`]: the OpenAPI 3 document.

pub mod errors;
pub mod openapi;
pub mod routes;
pub mod transcode;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Bytes;
use prost_reflect::DescriptorPool;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderValue, StatusCode, header};
use tower::ServiceExt;

use crate::error::{Error, Result};

/// Where the OpenAPI document is served (GET, no token needed: it holds no secret and a
/// client needs it before it has one).
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Request headers passed from an HTTP call to its gRPC call: the bearer token and the W3C
/// trace context (everything else about the caller is in the request's extensions: the peer
/// address and its client certificate).
const FORWARDED_HEADERS: [&str; 2] = ["authorization", "traceparent"];

/// The descriptor pool of our protos, decoded once.
pub fn descriptor_pool() -> Result<&'static DescriptorPool> {
    static POOL: OnceLock<std::result::Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(super::server::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| Error::Internal(format!("descriptor set: {e}")))
}

/// The OpenAPI document this build serves, as served.
pub fn openapi_document() -> Result<String> {
    openapi::document_text(descriptor_pool()?)
}

/// What every [`Gateway`] shares.
struct Shared {
    pool: &'static DescriptorPool,
    openapi: Bytes,
    /// The largest JSON body read: twice the message limit (base64 and field names make JSON
    /// larger than protobuf); the protobuf it becomes is then held to the message limit.
    max_body_bytes: usize,
    /// How long a body may take to arrive whole (the guard's body deadline for gRPC).
    body_timeout: Duration,
}

/// Builds [`Gateway`]s.
#[derive(Clone)]
pub struct GatewayLayer(Arc<Shared>);

impl GatewayLayer {
    /// A gateway reading JSON bodies of up to twice `max_message_bytes`, each within
    /// `body_timeout`.
    pub fn new(max_message_bytes: usize, body_timeout: Duration) -> Result<Self> {
        let pool = descriptor_pool()?;
        Ok(Self(Arc::new(Shared {
            pool,
            openapi: Bytes::from(openapi::document_text(pool)?),
            max_body_bytes: max_message_bytes.saturating_mul(2),
            body_timeout,
        })))
    }
}

impl<S> tower::Layer<S> for GatewayLayer {
    type Service = Gateway<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gateway {
            inner,
            shared: Arc::clone(&self.0),
        }
    }
}

/// The gateway in front of one gRPC stack (see the module docs).
#[derive(Clone)]
pub struct Gateway<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for Gateway<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let grpc = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc && request.version() < http::Version::HTTP_2 {
            return Box::pin(std::future::ready(Ok(grpc_over_http1())));
        }
        if grpc {
            return Box::pin(self.inner.call(request));
        }
        // The ready service serves this call; a clone takes its place (tower's pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(shared.serve(request, inner).await) })
    }
}

impl Shared {
    async fn serve<S>(&self, request: http::Request<Body>, inner: S) -> http::Response<Body>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        if path == OPENAPI_PATH {
            return if parts.method == http::Method::GET {
                json_response(StatusCode::OK, self.openapi.clone())
            } else {
                not_allowed(&["GET"])
            };
        }
        let matched = match routes::find(parts.method.as_str(), path) {
            Ok(matched) => matched,
            Err(routes::NoRoute::NotFound) => {
                return errors::error_response_as(
                    StatusCode::NOT_FOUND,
                    &tonic::Status::not_found(format!(
                        "no HTTP route {} {path} (see {OPENAPI_PATH})",
                        parts.method
                    )),
                );
            }
            Err(routes::NoRoute::MethodNotAllowed(allowed)) => return not_allowed(&allowed),
        };
        let Some((input, output)) = transcode::messages(self.pool, matched.route) else {
            return errors::error_response(&tonic::Status::internal("a route names no RPC"));
        };
        let body = match self.receive(body).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let message = match transcode::request(&input, &matched, parts.uri.query(), &body) {
            Ok(message) => message,
            Err(transcode::BadRequest(why)) => {
                return errors::error_response(&tonic::Status::invalid_argument(why));
            }
        };
        let Some(framed) = transcode::frame(&message) else {
            return too_large(self.max_body_bytes);
        };
        let mut call =
            http::Request::new(Body::new(http_body_util::Full::new(Bytes::from(framed))));
        *call.method_mut() = http::Method::POST;
        *call.version_mut() = http::Version::HTTP_2;
        let uri = format!("/{}/{}", matched.route.service, matched.route.rpc);
        match uri.parse() {
            Ok(uri) => *call.uri_mut() = uri,
            Err(_) => return errors::error_response(&tonic::Status::internal("a route's path")),
        }
        let headers = call.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        for name in FORWARDED_HEADERS {
            if let Some(value) = parts.headers.get(name) {
                headers.insert(name, value.clone());
            }
        }
        *call.extensions_mut() = parts.extensions;
        let Ok(answer) = inner.oneshot(call).await else {
            return errors::error_response(&tonic::Status::internal("the gRPC stack failed"));
        };
        render(&output, answer).await
    }

    /// The request body, whole, within the size and time bounds; or the refusal to send.
    async fn receive(&self, body: Body) -> std::result::Result<Bytes, http::Response<Body>> {
        let limited = http_body_util::Limited::new(body, self.max_body_bytes);
        match tokio::time::timeout(self.body_timeout, limited.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(too_large(self.max_body_bytes))
            }
            Ok(Err(_)) => Err(errors::error_response_as(
                StatusCode::BAD_REQUEST,
                &tonic::Status::cancelled("the request body failed to arrive"),
            )),
            Err(_) => Err(errors::error_response_as(
                StatusCode::REQUEST_TIMEOUT,
                &tonic::Status::deadline_exceeded(
                    "the request body did not arrive before the server's body deadline",
                ),
            )),
        }
    }
}

/// The HTTP answer for a gRPC answer: its message in JSON, or its status as a JSON error.
async fn render(
    output: &prost_reflect::MessageDescriptor,
    answer: http::Response<Body>,
) -> http::Response<Body> {
    let (parts, body) = answer.into_parts();
    let request_id = parts.headers.get("x-request-id").cloned();
    // A trailers-only answer carries its status in the headers; otherwise it is in the
    // trailers after the message.
    let (status, message) = match tonic::Status::from_header_map(&parts.headers) {
        Some(status) => (Some(status), Bytes::new()),
        None => match body.collect().await {
            Ok(collected) => (
                collected
                    .trailers()
                    .and_then(tonic::Status::from_header_map),
                collected.to_bytes(),
            ),
            Err(status) => (Some(status), Bytes::new()),
        },
    };
    let status =
        status.unwrap_or_else(|| tonic::Status::internal("the gRPC answer carried no status"));
    if status.code() != tonic::Code::Ok {
        return errors::error_response(&status);
    }
    match transcode::response(output, &message) {
        Ok(json) => {
            let mut response = json_response(StatusCode::OK, Bytes::from(json));
            if let Some(id) = request_id {
                response.headers_mut().insert("x-request-id", id);
            }
            response
        }
        Err(transcode::BadAnswer(why)) => {
            tracing::error!(reason = %why, "could not render a gRPC answer as JSON");
            errors::error_response(&tonic::Status::internal("the answer could not be rendered"))
        }
    }
}

/// Why a gRPC request over HTTP/1.1 is refused (UNIMPLEMENTED, HTTP 505).
pub const GRPC_OVER_HTTP1: &str = "gRPC needs HTTP/2 and this request came over HTTP/1.1: use \
     HTTP/2 (a gRPC client negotiates it), or the HTTP/JSON API (see /openapi.json)";

/// The refusal of a gRPC request over HTTP/1.1: HTTP 505 with the JSON error body, and the
/// status in `grpc-status`/`grpc-message` headers too, so a gRPC client that reads headers
/// (a trailers-only answer) sees UNIMPLEMENTED and why. Nothing is called.
fn grpc_over_http1() -> http::Response<Body> {
    let mut response = errors::error_response_as(
        StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        &tonic::Status::unimplemented(GRPC_OVER_HTTP1),
    );
    let headers = response.headers_mut();
    headers.insert(
        "grpc-status",
        HeaderValue::from(tonic::Code::Unimplemented as i32),
    );
    headers.insert("grpc-message", HeaderValue::from_static(GRPC_OVER_HTTP1));
    response
}

fn json_response(status: StatusCode, body: Bytes) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn not_allowed(allowed: &[&str]) -> http::Response<Body> {
    let mut response = errors::error_response_as(
        StatusCode::METHOD_NOT_ALLOWED,
        &tonic::Status::unimplemented(format!("this path takes {}", allowed.join(", "))),
    );
    if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

fn too_large(limit: usize) -> http::Response<Body> {
    errors::error_response_as(
        StatusCode::PAYLOAD_TOO_LARGE,
        &tonic::Status::resource_exhausted(format!(
            "the request body is larger than the server's limit of {limit} bytes"
        )),
    )
}
