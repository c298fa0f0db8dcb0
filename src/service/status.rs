//! The one place where errors become gRPC statuses. Client-facing messages come only from
//! variants whose text is safe; internal detail is logged with the request id and replaced by
//! a generic message.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::Outcome;
use crate::error::Error;

/// The gRPC code of an error. It always agrees with [`outcome`]: both come from one match.
pub fn code(error: &Error) -> Code {
    classify(error).0
}

/// The audit outcome of an error. It always agrees with [`code`]: both come from one match.
pub fn outcome(error: &Error) -> Outcome {
    classify(error).1
}

/// The one place an error variant is classified, so the code a client sees and the outcome
/// the audit log records cannot drift apart.
fn classify(error: &Error) -> (Code, Outcome) {
    match error {
        Error::InvalidArgument(_) | Error::DecryptFailed => {
            (Code::InvalidArgument, Outcome::Invalid)
        }
        Error::NotFound(_) => (Code::NotFound, Outcome::NotFound),
        Error::AlreadyExists(_) => (Code::AlreadyExists, Outcome::AlreadyExists),
        Error::FailedPrecondition(_)
        | Error::TenantState(_)
        | Error::KeyVersionState { .. }
        | Error::PrimaryKeyVersion
        | Error::DeletionWindowPassed
        | Error::DeletionWindowOpen
        | Error::ConcurrentChange
        | Error::RetiredMasterVersion(_) => (Code::FailedPrecondition, Outcome::FailedPrecondition),
        Error::Unauthenticated => (Code::Unauthenticated, Outcome::Unauthenticated),
        Error::PermissionDenied(_) => (Code::PermissionDenied, Outcome::Denied),
        Error::ResourceExhausted(_) | Error::RetryLater { .. } => {
            (Code::ResourceExhausted, Outcome::Exhausted)
        }
        Error::DeadlineExceeded => (Code::DeadlineExceeded, Outcome::DeadlineExceeded),
        Error::Unavailable(_) | Error::StoreUnavailable(_) => {
            (Code::Unavailable, Outcome::Unavailable)
        }
        Error::Internal(_) => (Code::Internal, Outcome::Internal),
        // DATA_LOSS, not INTERNAL: the store's content is corrupt or was tampered with (a row
        // MAC failed), which no retry or code fix cures; the operator must restore keys.db.
        // gRPC reserves DATA_LOSS for "unrecoverable data loss or corruption".
        Error::StoreIntegrity(_) => (Code::DataLoss, Outcome::Internal),
    }
}

/// The message a client may read: the error's own text for every variant whose text is
/// safe (the lifecycle variants' texts name states and versions, never a secret), a generic
/// one with the request id otherwise.
pub fn client_message(error: &Error, request_id: &str) -> String {
    match error {
        Error::Internal(_) => format!("internal error (request id {request_id})"),
        Error::StoreIntegrity(_) => format!(
            "the key store failed an integrity check; nothing was served (request id \
             {request_id})"
        ),
        Error::Unavailable(_) => format!(
            "service unavailable: the audit store cannot record this call, so no result was \
             returned (request id {request_id})"
        ),
        other => other.to_string(),
    }
}

/// Metadata key carrying the retry hint of a RESOURCE_EXHAUSTED answer, in milliseconds (the
/// same hint is in the status details as a `google.rpc.RetryInfo`).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// `id` as the value of the `x-request-id` metadata every answer carries, sent never-indexed.
/// Each id is unique, so entering it in HPACK's dynamic table (h2 enters every other value)
/// buys nothing: it costs each answer a comparison with the ids already there and evicts the
/// headers that do repeat (`content-type`, `grpc-status`), which then travel in full again.
pub fn request_id_value<T>(id: T) -> Option<MetadataValue<Ascii>>
where
    T: TryInto<MetadataValue<Ascii>>,
{
    let mut value = id.try_into().ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The status for an error. Internal errors are logged here, with the request id. A
/// [`Error::RetryLater`] carries its hint twice: as `retry-after-ms` metadata (easy to read
/// from any client) and as `google.rpc.RetryInfo` in the details (what gRPC client libraries
/// with retry support understand).
pub fn to_status(error: &Error, request_id: &str) -> Status {
    if let Error::Internal(detail) | Error::Unavailable(detail) | Error::StoreIntegrity(detail) =
        error
    {
        tracing::error!(request_id, detail = %detail, "request failed");
    }
    let mut status = match error {
        Error::RetryLater { retry_after_ms, .. } => {
            let mut status = Status::with_error_details(
                code(error),
                client_message(error, request_id),
                ErrorDetails::with_retry_info(Some(Duration::from_millis(*retry_after_ms))),
            );
            if let Ok(value) = retry_after_ms.to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_MS, value);
            }
            status
        }
        _ => Status::new(code(error), client_message(error, request_id)),
    };
    if !request_id.is_empty()
        && let Some(value) = request_id_value(request_id)
    {
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
        let id = status.metadata().get("x-request-id").unwrap();
        assert_eq!(id, "abc123");
        assert!(id.is_sensitive(), "a unique id is sent never-indexed");
    }

    #[test]
    fn integrity_failures_are_data_loss_without_detail() {
        let error = Error::StoreIntegrity("tokens row tok-1: MAC mismatch".into());
        let status = to_status(&error, "r9");
        assert_eq!(status.code(), Code::DataLoss);
        assert_eq!(outcome(&error), Outcome::Internal);
        assert!(!status.message().contains("tok-1"));
        assert!(status.message().contains("r9"));
    }

    #[test]
    fn lifecycle_errors_read_as_before() {
        use crate::domain::{KeyVersionState, TenantState};
        let cases = [
            (
                Error::TenantState(TenantState::Destroyed),
                "tenant destroyed",
            ),
            (
                Error::TenantState(TenantState::PendingDeletion),
                "tenant is PENDING_DELETION",
            ),
            (
                Error::KeyVersionState {
                    version: 1,
                    state: KeyVersionState::Disabled,
                },
                "key version 1 is DISABLED",
            ),
            (
                Error::ConcurrentChange,
                "the tenant's key was rotated concurrently; retry",
            ),
            (
                Error::RetiredMasterVersion(3),
                "master key version 3 is retired; reload the keyring",
            ),
        ];
        for (error, text) in cases {
            let status = to_status(&error, "r1");
            assert_eq!(status.code(), Code::FailedPrecondition, "{text}");
            assert_eq!(status.message(), text);
            assert_eq!(outcome(&error), Outcome::FailedPrecondition);
        }
    }
}
