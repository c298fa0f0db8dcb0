//! The one error type of the service, mapped to a gRPC status in exactly one place
//! (`service::status`). Variants carry only text that is safe for a client to read; internal
//! detail (SQL errors, paths) travels in [`Error::Internal`] and reaches only the log.

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input failed validation; the message names the field and the rule, never a secret value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A ciphertext or wrapped key did not open. One error whatever the cause, so it is no
    /// oracle.
    #[error("ciphertext is invalid or does not match the tenant, context and aad")]
    DecryptFailed,
    /// The named thing does not exist (e.g. "tenant").
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The named thing exists already.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The lifecycle state forbids the call; the message names the state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No valid credentials.
    #[error("missing, invalid, expired or revoked token")]
    Unauthenticated,
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit (size, count, rate).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A per-caller rate limit or the server's concurrency cap: try again after the hint.
    #[error("{reason}; retry after {retry_after_ms} ms")]
    RetryLater {
        /// Which limit, in words safe for the client.
        reason: String,
        /// When a retry can succeed, in milliseconds.
        retry_after_ms: u64,
    },
    /// The caller's deadline (`grpc-timeout`, capped by the server's request timeout) passed
    /// before the answer was ready; no result is returned.
    #[error("deadline exceeded before the answer was ready")]
    DeadlineExceeded,
    /// The service cannot answer safely now (the audit store cannot write): fail closed.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an environment fault. The text goes to the log only; the client gets a generic
    /// message with the request id.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An internal error from any displayable cause (logged, never sent).
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Error::Internal(cause.to_string())
    }
}

impl From<crate::crypto::CryptoError> for Error {
    fn from(_: crate::crypto::CryptoError) -> Self {
        Error::DecryptFailed
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
