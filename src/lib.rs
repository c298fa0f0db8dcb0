//! tenant-kms: a per-tenant envelope-encryption and key-management service.
//!
//! Application services call it over gRPC to encrypt column values per tenant, to get data
//! keys for envelope encryption and to manage the keys' lives alongside the tenant's. Every
//! key access is audited durably, in a keyed hash chain, before the caller gets an answer.
//!
//! # Layout
//!
//! Dependencies point down; nothing imports `service` or `cli`.
//!
//! - [`crypto`]: AES-256-GCM, HKDF-SHA256, labels, the v1 wire format, secret types. Pure: no
//!   I/O, no async, nothing else of ours.
//! - [`keys`]: master-key providers, the key manager (hierarchy, rotation, nonce budget) and
//!   the bounded cache of unwrapped keys.
//! - [`store`]: the `KeyStore` trait and its SQLite implementation (`keys.db`).
//! - [`audit`]: audit records, the HMAC chain, the group-commit writer, `audit.db`.
//! - [`auth`]: tokens, roles, tenant scopes and the one authorization check.
//! - [`detect`]: anomaly detectors over finished calls (rate spikes, enumeration, probing,
//!   tampering, new peers): bounded, clock-driven, pure of I/O; the service records findings.
//! - [`backup`]: full backups, per-tenant export/import and the shred ledger that keeps a
//!   restore from resurrecting destroyed keys.
//! - [`service`]: gRPC handlers (thin) and `server::run`.
//! - [`cli`]: one module per subcommand of the `tenant-kms` binary.
//! - [`selftest`]: power-on and full cryptographic self-tests (known answers, Wycheproof, our
//!   vectors), used by `serve` at start and by `tenant-kms selftest`.
//! - [`metrics`]: process-wide counters and histograms and the Prometheus `/metrics` endpoint.
//! - [`usage`]: usage accounting per tenant and caller (in memory, flushed per minute to
//!   `usage.db`), for `/metrics` and `GetUsage`.
//! - [`domain`], [`error`], [`config`], [`fsutil`]: shared types, the error enum, the
//!   configuration file, private-file helpers.
//! - [`clock`]: the injected wall clock (system, manual for tests) that every time-based
//!   decision reads.
//! - [`hardening`]: process hardening at `serve` start (no core dumps, memory locking).
//! - [`telemetry`]: the call span, made only when a log line or the trace exporter needs
//!   it, and the optional OTLP trace exporter (cargo feature `otlp`).
//! - [`webhook`]: the signed anomaly webhook to the operator's alerting endpoint, delivered
//!   by a background task off the data plane.
//! - [`tls_client`]: rustls client configurations (named CA only, ring) for the connections
//!   the service opens itself.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod detect;
pub mod domain;
pub mod error;
pub mod fsutil;
pub mod hardening;
pub mod keys;
pub mod metrics;
pub mod selftest;
pub mod service;
mod sqlite_shm;
pub mod store;
pub mod telemetry;
pub mod tls_client;
pub mod usage;
pub mod webhook;

/// The generated protobuf messages and gRPC stubs of `tenantkms.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tenantkms.v1");
    // Which messages the codec decodes strictly (requests) — written by build.rs.
    include!(concat!(env!("OUT_DIR"), "/strictness.rs"));
}
