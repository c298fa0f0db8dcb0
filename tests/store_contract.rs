//! Runs the key-store conformance suite (`tenant_kms::store::contract`) against the SQLite
//! store: one test per promise, each on a fresh `keys.db`. A second backend adds a file like
//! this one that builds its own store and calls the same functions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tenant_kms::store::SqliteKeyStore;
use tenant_kms::store::contract;

/// A fresh store in its own directory, kept alive as long as the store.
struct Fresh {
    _dir: tempfile::TempDir,
    store: SqliteKeyStore,
}

fn fresh() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteKeyStore::open(&dir.path().join("keys.db")).unwrap();
    Fresh { _dir: dir, store }
}

macro_rules! contract_tests {
    ($($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                contract::$check(&fresh().store);
            }
        )*
    };
}

contract_tests!(
    check_create_tenants_is_all_or_nothing,
    check_replace_tenant_is_all_or_nothing,
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
    check_index_definitions,
);

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
