//! The one error type of the service, mapped to a gRPC status in exactly one place
//! (`service::status`). Variants carry only text that is safe for a client to read; internal
//! detail (SQL errors, paths) travels in [`Error::Internal`] and reaches only the log.

use crate::domain::{KeyVersionState, TenantState};

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
    /// A precondition that no caller branches on failed (a file, a keyring, a backup);
    /// the message says which.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The tenant's lifecycle state forbids the call (`domain::lifecycle`). Carries the
    /// state, so callers branch on it; the client reads "tenant is STATE" ("tenant
    /// destroyed" for a tombstone).
    #[error("{}", tenant_state_message(*.0))]
    TenantState(TenantState),
    /// The key version's state forbids the change (e.g. disabling a disabled version).
    #[error("key version {version} is {}", .state.name())]
    KeyVersionState {
        /// The version.
        version: u32,
        /// Its state.
        state: KeyVersionState,
    },
    /// The primary version encrypts, so it cannot be disabled or destroyed.
    #[error("the primary key version cannot be disabled or destroyed; rotate first")]
    PrimaryKeyVersion,
    /// A pending deletion is due: it can no longer be cancelled.
    #[error(
        "tenant is PENDING_DELETION and its deletion window has passed: it can no longer be \
         cancelled"
    )]
    DeletionWindowPassed,
    /// A pending deletion's window is still open: it cannot be destroyed yet.
    #[error("tenant deletion window has not passed")]
    DeletionWindowOpen,
    /// A compare-and-set lost: another caller changed what this one read (the tenant's
    /// primary version) between the read and the write. Retrying from a fresh read is safe.
    #[error("the tenant's key was rotated concurrently; retry")]
    ConcurrentChange,
    /// A key was about to be wrapped under a master version that another process retired:
    /// this process's keyring is stale. Reloading it and retrying is safe.
    #[error("master key version {0} is retired; reload the keyring")]
    RetiredMasterVersion(u32),
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
    /// The key store refused a write for a reason of its environment, not of the request: its
    /// disk is full, its file is read-only, or another writer held it past the busy timeout.
    /// Nothing was changed, and the same call can succeed once the operator frees space or the
    /// lock; the fault names the reason only, never a path or SQL text.
    #[error("the key store cannot write now ({0}); nothing was changed, retry later")]
    StoreUnavailable(StoreFault),
    /// A key-store row (or the store's row anchor) failed its MAC check (`store::row_auth`):
    /// someone without the master key edited, inserted, moved, deleted or rolled back a
    /// security-relevant row. The call fails closed and nothing is served from that row. The
    /// text names the table and the row's identity (never a secret) and goes to the log
    /// only; the client reads a generic message with the request id.
    #[error("key store integrity check failed: {0}")]
    StoreIntegrity(String),
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

    /// What a failed open of a caller's ciphertext or wrapped data key becomes: the one
    /// opaque [`Error::DecryptFailed`], whatever the cause. Every other crypto failure (a
    /// CSPRNG, a derivation, a wrap) is mapped explicitly where it happens, never through
    /// this.
    pub fn failed_open(_: crate::crypto::CryptoError) -> Self {
        Error::DecryptFailed
    }
}

/// Why a key-store write could not happen ([`Error::StoreUnavailable`]); each is a state of
/// the environment that can pass, so the client is told to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreFault {
    /// The disk (or the database's size limit) is full.
    Full,
    /// The database file or its directory is read-only.
    ReadOnly,
    /// Another writer held the database past the busy timeout.
    Busy,
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreFault::Full => "storage full",
            StoreFault::ReadOnly => "storage read-only",
            StoreFault::Busy => "storage busy",
        })
    }
}

/// The client text of [`Error::TenantState`]: the state as the API names it.
fn tenant_state_message(state: TenantState) -> String {
    match state {
        TenantState::Destroyed => "tenant destroyed".into(),
        other => format!("tenant is {}", other.name()),
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
