//! The integration tests, as one test binary: each module starts the real server (in process,
//! or the binary where a test kills it) and talks to it over loopback.
//!
//! One binary rather than one per file: every test binary links the whole service, and on a
//! 2-core machine those links were a large share of CI's time. Run one area with its module
//! path as the filter, e.g. `cargo test --release --test integration postgres::`.

// Tests may panic on a broken invariant: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The harness shared with benches/ and clients/rust (one way to start a server).
#[path = "../common/mod.rs"]
mod common;

/// Network abuse (issue 13).
mod abuse;

/// The audit store end to end.
mod audit;

/// The AuditLog contract on both backends.
mod audit_contract;

/// The PostgreSQL audit log, one chain per node.
mod audit_postgres;

/// The PostgreSQL audit log's one-statement append and its fallback to the full path.
mod audit_postgres_append;

/// The PostgreSQL audit log under faults.
mod audit_postgres_nodes;

/// Backup, restore, per-tenant export/import, the shred ledger.
mod backup;

/// The command line.
mod cli;

/// The crypto conformance suite.
mod conformance;

/// Anomaly detectors.
mod detect;

/// Crashes and environment faults through the binary.
mod faults;

/// Operator mistakes and absurd input.
mod hardening;

/// Nothing secret in what detection hands on.
mod leaks;

/// Rotation tied to the tenant lifecycle.
mod lifecycle;

/// Moving to PostgreSQL (`migrate-store`), checking a restored database, and the
/// data-directory commands on `--store`.
mod migrate_store;

/// The monitoring kit.
mod monitoring;

/// The metrics endpoint and hot-path mechanisms.
mod perf;

/// The PostgreSQL key store and several nodes.
mod postgres;
mod postgres_failover;
mod postgres_shred;

/// The HTTP/JSON API.
mod rest;

/// The master keyring under a root of trust.
mod root_of_trust;

/// Searchable encrypted columns.
mod searchable;

/// Known answers for searchable columns.
mod searchable_vectors;

/// Authorization and transport security.
mod security;

/// Core service behaviour over gRPC.
mod service;

/// The KeyStore contract on both backends.
mod store_contract;

/// Audit streaming to a SIEM.
mod stream;

/// A writer of keys.db without the master key.
mod tamper;

/// Stock gRPC tooling, health, reflection, logs.
mod tools;

/// Usage accounting.
mod usage;

/// The anomaly webhook.
mod webhook;
