//! The gRPC service: thin handlers that parse input into domain types, authenticate and
//! authorize through the one layer in `auth`, call the key manager, and write the audit
//! record before answering.
//!
//! - [`state`]: the shared state and how it is opened from a data directory;
//! - [`data_dir_guard`]: the serve lock and the start-time checks of a data directory;
//! - [`call`]: the per-request frame (request id, caller, audit fields) and its finish;
//! - [`status`]: the one mapping from [`crate::error::Error`] to a gRPC status;
//! - [`guard`]: the concurrency cap and deadlines in front of the services;
//! - [`codec`]: prost encoding with requests' unknown fields refused;
//! - [`key_service`], [`tenant_service`], [`audit_service`]: the three services;
//! - [`server`]: `run(listener, state, shutdown)` and `run_with`, which serves extra
//!   services beside ours (the separate bench crate's echo baseline);
//! - [`budget_metrics`]: nonce-budget gauges for the `/metrics` endpoint;
//! - [`usage_query`]: `GetUsage`, a tenant's usage over a time range;
//! - [`refusals`]: refusals before authentication, audited in aggregate per peer and window;
//! - [`containment`]: quarantine and release a token, suspend every tenant it reaches;
//! - [`connections`]: accepted connections: handshake bound and cap, send timeout.
//! - [`tls`]: the TLS handshake, with ALPN offering `h2` and `http/1.1`.
//! - [`anomaly`]: the detectors' findings as Anomaly audit records, metrics and log lines.
//! - [`traceparent`]: the W3C `traceparent` a caller may send, validated.
//! - [`rest`]: the HTTP/JSON API and its OpenAPI document, on the gRPC port, dispatching into
//!   the same services.

pub mod admission;
pub mod anomaly;
pub mod audit_service;
pub mod budget_metrics;
pub mod call;
pub mod codec;
pub mod connections;
pub mod containment;
pub mod convert;
pub mod data_dir_guard;
pub mod guard;
pub mod key_service;
pub mod node_id;
pub mod reconcile;
pub mod refusals;
pub mod rest;
pub mod server;
pub mod state;
pub mod status;
pub mod tenant_service;
pub mod tls;
pub mod traceparent;
pub mod usage_query;

pub use state::{AppState, Limits, ServiceOptions, TlsFiles};

use crate::error::{Error, Result};

/// Runs blocking work (SQLite, PostgreSQL, large batches) on tokio's blocking pool so it never
/// stalls the async worker threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    // The work runs as part of the caller's call, so its log lines carry the request id. The
    // thread runs no async task, so the PostgreSQL store may block on it in place (no thread
    // per store call).
    let work = crate::telemetry::carry(work);
    tokio::task::spawn_blocking(move || crate::store::postgres::on_blocking_pool(work))
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
