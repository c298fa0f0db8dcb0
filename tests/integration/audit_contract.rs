//! The `AuditLog` contract suite (`tenant_kms::audit::contract`) run against both backends:
//! the SQLite log, and the PostgreSQL log (one node's chain in a fresh database of the test
//! cluster, `tests/common/postgres.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tenant_kms::audit::contract::{auditlog_contract, auditlog_snapshot_contract};
use tenant_kms::audit::sqlite::DEFAULT_BUSY_TIMEOUT;
use tenant_kms::audit::{ChainKeys, Durability, PostgresAuditLog, SqliteAuditLog};
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::store::postgres::{PgOptions, PgPool};

#[test]
fn sqlite_audit_log_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
    let n = AtomicU32::new(0);
    let make = || {
        let path = dir
            .path()
            .join(format!("audit-{}.db", n.fetch_add(1, Ordering::Relaxed)));
        SqliteAuditLog::open(
            &path,
            Durability::Process,
            DEFAULT_BUSY_TIMEOUT,
            Arc::clone(&keys),
        )
        .unwrap()
    };
    auditlog_contract(make);
    auditlog_snapshot_contract(
        make,
        |path| SqliteAuditLog::open_read_only(path, Arc::clone(&keys)).unwrap(),
        scratch.path(),
    );
}

#[test]
fn postgres_audit_log_passes_the_contract() {
    let keys = Arc::new(ChainKeys::derive(&SecretKey::generate().unwrap()).unwrap());
    // Each log a new database: one node's chain, nothing shared between the checks.
    auditlog_contract(|| {
        PostgresAuditLog::open(
            pool(&common::postgres::fresh_database()),
            "node-a",
            Arc::clone(&keys),
        )
        .unwrap()
    });
}

/// A pool on the database at `url`, as a node opens one.
fn pool(url: &str) -> PgPool {
    PgPool::connect(&PgOptions::new(url)).unwrap()
}
