//! The gRPC error model over HTTP: a status becomes the HTTP status Google's `google.rpc.Code`
//! mapping gives it, with the body `{"code", "message", "details"}` (the canonical JSON of a
//! `google.rpc.Status`, as Google's HTTP APIs and grpc-gateway answer). The `retry-after-ms`
//! and `x-request-id` metadata stay headers, and a retry hint is also given as the standard
//! `Retry-After` (whole seconds, rounded up).

use std::time::Duration;

use hyper::body::Bytes;
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderValue, StatusCode, header};
use tonic_types::StatusExt;

use crate::service::status::RETRY_AFTER_MS;

/// The HTTP status of a gRPC code, as `google/rpc/code.proto` documents each code's
/// "HTTP Mapping".
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 "Client Closed Request" has no constant; it is a valid status code.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON error answer for `status`, under its mapped HTTP status.
pub fn error_response(status: &tonic::Status) -> http::Response<Body> {
    error_response_as(http_status(status.code()), status)
}

/// The JSON error answer for `status` under the HTTP status `http`: for refusals HTTP has a
/// more precise status for than the code's mapping (404 for an unknown path, 405, 413).
pub fn error_response_as(http: StatusCode, status: &tonic::Status) -> http::Response<Body> {
    let mut details = Vec::new();
    let mut retry_after_ms = status
        .metadata()
        .get(RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(delay) = status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
    {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": duration_json(delay),
        }));
        retry_after_ms.get_or_insert(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
    }
    let body = serde_json::json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": details,
    });
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from(
        body.to_string(),
    ))));
    *response.status_mut() = http;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(ms) = retry_after_ms {
        headers.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
        headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
    }
    if let Some(id) = status.metadata().get("x-request-id")
        && let Ok(value) = HeaderValue::from_bytes(id.as_bytes())
    {
        headers.insert("x-request-id", value);
    }
    response
}

/// A `google.protobuf.Duration` in its canonical JSON: seconds with 0, 3, 6 or 9 fractional
/// digits and an `s`.
fn duration_json(delay: Duration) -> String {
    let (secs, nanos) = (delay.as_secs(), delay.subsec_nanos());
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos % 1_000_000 == 0 {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_as_google_rpc_code_documents() {
        assert_eq!(http_status(Code::InvalidArgument), 400);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::AlreadyExists), 409);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Cancelled), 499);
        assert_eq!(http_status(Code::Internal), 500);
        assert_eq!(http_status(Code::Unimplemented), 501);
        assert_eq!(http_status(Code::Unavailable), 503);
        assert_eq!(http_status(Code::DeadlineExceeded), 504);
    }

    #[test]
    fn durations_render_canonically() {
        assert_eq!(duration_json(Duration::from_secs(2)), "2s");
        assert_eq!(duration_json(Duration::from_millis(1500)), "1.500s");
        assert_eq!(duration_json(Duration::from_micros(1)), "0.000001s");
        assert_eq!(duration_json(Duration::from_nanos(5)), "0.000000005s");
    }
}
