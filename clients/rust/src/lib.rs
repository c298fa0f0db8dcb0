//! tenant-kms-client: what an application needs to use tenant-kms from Rust.
//!
//! ```no_run
//! # async fn example() -> Result<(), tenant_kms_client::Error> {
//! use tenant_kms_client::{ClientConfig, envelope::Envelope};
//! let client = ClientConfig::from_env()?.connect().await?;
//! let envelope = Envelope::new(client);
//! let sealed = envelope.encrypt_value("acme", "crm.files", b"a large value").await?;
//! let opened = envelope.decrypt_value("acme", "crm.files", &sealed).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`pb`]: the messages and tonic stubs generated from the service's protos (`proto/`).
//! - [`config`]: address, TLS (CA file, optional client certificate) and bearer token
//!   (also from `TENANT_KMS_TOKEN`); [`ClientConfig::connect`] makes a [`Client`].
//! - [`client`]: [`Client`], one typed method per RPC, each run under the retry policy, and
//!   [`client::Bearer`], the token header (marked sensitive) for stubs of one's own.
//! - [`retry`]: which failures are retried, and how long to wait (the server's
//!   `retry-after-ms` hint, else capped exponential back-off with full jitter).
//! - [`envelope`]: local encryption of large values and files under data keys from
//!   `GenerateDataKey`, in the streaming format of docs/ENVELOPE.md, with a bounded data-key
//!   cache.
//! - [`error`]: the one error type, with [`ConnectFailure`]: why a connection failed.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod envelope;
pub mod error;
pub mod retry;

/// Messages and client stubs generated from `proto/tenantkms/v1/*.proto` (package
/// `tenantkms.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tenantkms.v1");
}

pub use client::Client;
pub use config::ClientConfig;
pub use error::{ConnectFailure, Error, Result};
pub use retry::RetryPolicy;
