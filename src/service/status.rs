//! The one place where errors become gRPC statuses. Client-facing messages come only from
//! variants whose text is safe; internal detail is logged with the request id and replaced by
//! a generic message.

use tonic::{Code, Status};

use crate::audit::Outcome;
use crate::error::Error;

/// The gRPC code of an error.
pub fn code(error: &Error) -> Code {
    match error {
        Error::InvalidArgument(_) | Error::DecryptFailed => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Unauthenticated => Code::Unauthenticated,
        Error::PermissionDenied(_) => Code::PermissionDenied,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    }
}

/// The audit outcome of an error.
pub fn outcome(error: &Error) -> Outcome {
    match error {
        Error::InvalidArgument(_) | Error::DecryptFailed => Outcome::Invalid,
        Error::NotFound(_) => Outcome::NotFound,
        Error::AlreadyExists(_) => Outcome::AlreadyExists,
        Error::FailedPrecondition(_) => Outcome::FailedPrecondition,
        Error::Unauthenticated => Outcome::Unauthenticated,
        Error::PermissionDenied(_) => Outcome::Denied,
        Error::ResourceExhausted(_) => Outcome::Exhausted,
        Error::Unavailable(_) => Outcome::Unavailable,
        Error::Internal(_) => Outcome::Internal,
    }
}

/// The message a client may read.
pub fn client_message(error: &Error, request_id: &str) -> String {
    match error {
        Error::Internal(_) => format!("internal error (request id {request_id})"),
        Error::Unavailable(_) => format!(
            "service unavailable: the audit store cannot record this call, so no result was \
             returned (request id {request_id})"
        ),
        other => other.to_string(),
    }
}

/// The status for an error. Internal errors are logged here, with the request id.
pub fn to_status(error: &Error, request_id: &str) -> Status {
    if let Error::Internal(detail) | Error::Unavailable(detail) = error {
        tracing::error!(request_id, detail = %detail, "request failed");
    }
    let mut status = Status::new(code(error), client_message(error, request_id));
    if let Ok(value) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", value);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_never_reaches_the_client() {
        let error = Error::Internal("SQL error near /var/lib/secret/keys.db".into());
        let status = to_status(&error, "abc123");
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("SQL"));
        assert!(!status.message().contains("/var"));
        assert!(status.message().contains("abc123"));
    }
}
