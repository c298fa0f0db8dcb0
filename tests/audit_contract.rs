//! The `AuditLog` contract suite (`tenant_kms::audit::contract`) run against the SQLite log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tenant_kms::audit::contract::{auditlog_contract, auditlog_snapshot_contract};
use tenant_kms::audit::sqlite::DEFAULT_BUSY_TIMEOUT;
use tenant_kms::audit::{ChainKeys, Durability, SqliteAuditLog};
use tenant_kms::crypto::secret::SecretKey;

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
