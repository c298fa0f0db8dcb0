//! Runs the key-store conformance suite (`tenant_kms::store::contract`) against both
//! backends: the SQLite store (a fresh `keys.db` per check) and the PostgreSQL store (a fresh
//! database per check on the test binary's private cluster, `tests/common/postgres.rs`). One
//! macro generates each check for both, so neither can skip a promise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use tenant_kms::store::SqliteKeyStore;
use tenant_kms::store::contract;
use tenant_kms::store::postgres::{PgOptions, PgPool, PostgresKeyStore};

/// A fresh store in its own directory, kept alive as long as the store.
struct Fresh {
    _dir: tempfile::TempDir,
    store: SqliteKeyStore,
}

fn fresh() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteKeyStore::open(&dir.path().join("keys.db")).unwrap();
    contract::install_test_row_key(&store);
    Fresh { _dir: dir, store }
}

/// A PostgreSQL store handle on the database at `url`.
fn open_postgres(url: &str) -> PostgresKeyStore {
    let pool = PgPool::connect(&PgOptions::new(url)).unwrap();
    PostgresKeyStore::open(pool, "contract", Duration::from_secs(5)).unwrap()
}

/// A PostgreSQL store on a new empty database, its row key installed.
fn fresh_postgres() -> PostgresKeyStore {
    let store = open_postgres(&common::postgres::fresh_database());
    contract::install_test_row_key(&store);
    store
}

macro_rules! contract_tests {
    ($($check:ident),* $(,)?) => {
        mod on_sqlite {
            use super::*;
            $(
                #[test]
                fn $check() {
                    contract::$check(&fresh().store);
                }
            )*
        }
        mod on_postgres {
            use super::*;
            $(
                #[test]
                fn $check() {
                    contract::$check(&fresh_postgres());
                }
            )*
        }
    };
}

contract_tests!(
    check_create_tenants_is_all_or_nothing,
    check_replace_tenant_is_all_or_nothing,
    check_replace_tenant_never_moves_a_counter_back,
    check_compare_and_set_conflicts,
    check_ordering,
    check_shredding,
    check_shred_ledger_reapplication,
    check_tokens,
    check_master_versions,
    check_reserve_encryptions,
    check_concurrent_rotations_have_one_winner,
    check_concurrent_reservations_add_up,
    check_own_writes_are_not_changes_elsewhere,
    check_edited_rows_are_refused,
    check_moved_and_forged_rows_are_refused,
    check_rolled_back_rows_are_detected,
    check_upgrade_macs_existing_rows_once,
    check_index_definitions,
);

#[test]
fn check_rows_need_the_row_key() {
    let dir = tempfile::tempdir().unwrap();
    contract::check_rows_need_the_row_key(&|| {
        let store = SqliteKeyStore::open(&dir.path().join("keys.db")).unwrap();
        contract::install_test_row_key(&store);
        store
    });
}

#[test]
fn postgres_check_rows_need_the_row_key() {
    // Every handle on one database, as several nodes are.
    let url = common::postgres::fresh_database();
    contract::check_rows_need_the_row_key(&|| {
        let store = open_postgres(&url);
        contract::install_test_row_key(&store);
        store
    });
}

/// The tamper checks through their one entry point, on PostgreSQL: the database
/// administrator is the writer without the master key there (issue 13, item 5).
#[test]
fn postgres_passes_the_tamper_contract() {
    contract::tamper_contract(|| open_postgres(&common::postgres::fresh_database()));
}

/// The tamper checks through their one entry point.
#[test]
fn sqlite_passes_the_tamper_contract() {
    let dir = tempfile::tempdir().unwrap();
    let made = std::sync::atomic::AtomicUsize::new(0);
    contract::tamper_contract(|| {
        let n = made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        SqliteKeyStore::open(&dir.path().join(format!("keys-{n}.db"))).unwrap()
    });
}

/// The whole suite through its one entry point, as a new backend would first run it.
#[test]
fn sqlite_passes_the_whole_contract() {
    let dir = tempfile::tempdir().unwrap();
    let made = std::sync::atomic::AtomicUsize::new(0);
    contract::keystore_contract(|| {
        let n = made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        SqliteKeyStore::open(&dir.path().join(format!("keys-{n}.db"))).unwrap()
    });
    assert!(made.into_inner() >= 12, "every check ran on its own store");
}

/// The upgrade to row MACs (keys.db schema 5): rows written without MACs (a store from
/// before them: emulated by clearing every MAC and the anchor and marking the upgrade
/// pending, which is what migration 5 leaves) are MAC'd once when the key is installed, then
/// load and verify like any other; a second install does not re-MAC anything.
#[test]
fn sqlite_upgrade_macs_existing_rows_once() {
    use tenant_kms::store::{MasterKeyStore, TenantStore, TokenStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    {
        // A store at the current schema, upgraded already (its anchor made).
        let store = SqliteKeyStore::open(&path).unwrap();
        contract::install_test_row_key(&store);
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "INSERT INTO tenants (tenant_id, state, primary_version, created_at, \
         rotation_period_seconds, max_encryptions) VALUES ('old', 2, 1, 5, 0, 100);
         INSERT INTO key_versions (tenant_id, version, state, created_at, encryptions) \
         VALUES ('old', 1, 1, 5, 42);
         INSERT INTO tokens (id, name, hash, role, tenants, operations, created_at) \
         VALUES ('tok', 'n', zeroblob(32), 'service', 'old', '*', 5);
         UPDATE tenants SET mac = NULL; UPDATE key_versions SET mac = NULL;
         UPDATE tokens SET mac = NULL; DELETE FROM row_anchor;",
    )
    .unwrap();
    // Without the pending mark, rows without MACs are refused.
    let store = SqliteKeyStore::open(&path).unwrap();
    assert!(!store.row_mac_upgrade_due().unwrap());
    assert!(matches!(
        store.set_row_key(contract::test_row_key(), true),
        Err(tenant_kms::error::Error::StoreIntegrity(_))
    ));
    drop(store);
    conn.execute("INSERT INTO row_mac_upgrade (id) VALUES (1)", [])
        .unwrap();
    drop(conn);
    // A caller whose record says the upgrade happened already refuses it.
    let store = SqliteKeyStore::open(&path).unwrap();
    assert!(store.row_mac_upgrade_due().unwrap());
    assert!(store.set_row_key(contract::test_row_key(), false).is_err());
    drop(store);
    let store = SqliteKeyStore::open(&path).unwrap();
    assert_eq!(
        store.set_row_key(contract::test_row_key(), true).unwrap(),
        Some(3),
        "three rows MAC'd once"
    );
    let old = tenant_kms::domain::TenantId::parse("old").unwrap();
    let tenant = store.tenant(&old).unwrap().unwrap();
    assert_eq!(tenant.state.code(), 2, "the row as it stood");
    assert_eq!(store.key_versions(&old).unwrap()[0].encryptions, 42);
    assert_eq!(store.token_by_hash(&[0; 32]).unwrap().unwrap().id, "tok");
    assert_eq!(store.reserve_encryptions(&old, 1, 8).unwrap(), 50);
    assert!(
        !store.row_mac_upgrade_due().unwrap(),
        "done once, never due again"
    );
    drop(store);
    // The mark is gone: installing again checks, it does not re-MAC.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE key_versions SET encryptions = 0", [])
        .unwrap();
    drop(conn);
    let store = SqliteKeyStore::open(&path).unwrap();
    assert!(store.set_row_key(contract::test_row_key(), true).is_err());
    drop(store);
    // Nor does a mark put back beside the anchor.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "UPDATE key_versions SET encryptions = 50; INSERT INTO row_mac_upgrade (id) VALUES (1);",
    )
    .unwrap();
    drop(conn);
    let store = SqliteKeyStore::open(&path).unwrap();
    assert!(
        !store.row_mac_upgrade_due().unwrap(),
        "a mark beside the anchor is a rewrite, not an upgrade due"
    );
    assert!(store.set_row_key(contract::test_row_key(), true).is_err());
}
