//! The key-store conformance suite: the contract of the [`KeyStore`] traits written once, as
//! generic checks that every backend runs against itself (as tikv's `engine_traits_tests`
//! verify every engine). `tests/integration/store_contract.rs` runs it for [`super::SqliteKeyStore`]; a
//! PostgreSQL backend's tests call the same functions.
//!
//! Each `check_*` function takes a fresh, empty store (no master version, no tenant) with the
//! contract's row key installed ([`install_test_row_key`]) and panics, naming the broken
//! promise, when the store breaks it. [`keystore_contract`] runs them all (and installs the
//! key); the tamper checks ([`tamper_contract`]) also need the [`RowTamper`] seam. Built only
//! for tests and behind the `test-seams` feature.

// A test suite: a panic is how it reports a broken contract. `err().expect()` because the
// records a refused call would return (`KeyVersionRecord`) hold wrapped keys and so have no
// `Debug`, which `expect_err` needs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::err_expect)]

use std::sync::atomic::{AtomicUsize, Ordering};

use super::row_auth::RowKey;
use super::{
    KeyStore, KeyVersionRecord, MasterVersionRecord, RawValue, Rewrapping, RowRef, RowTamper,
    ShredItem, TenantRecord, TokenRecord, WrappedTenantKey,
};
use crate::crypto::secret::SecretKey;
use crate::domain::lifecycle::{TenantTransition, VersionTransition};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::Error;

/// Runs every check of the contract, each on a store from `make` (which must return a new,
/// empty store each time).
pub fn keystore_contract<S: KeyStore>(make: impl Fn() -> S) {
    let make = || {
        let store = make();
        install_test_row_key(&store);
        store
    };
    check_create_tenants_is_all_or_nothing(&make());
    check_replace_tenant_is_all_or_nothing(&make());
    check_replace_tenant_never_moves_a_counter_back(&make());
    check_compare_and_set_conflicts(&make());
    check_ordering(&make());
    check_shredding(&make());
    check_shred_ledger_reapplication(&make());
    check_tokens(&make());
    check_master_versions(&make());
    check_reserve_encryptions(&make());
    check_concurrent_rotations_have_one_winner(&make());
    check_concurrent_reservations_add_up(&make());
    check_own_writes_are_not_changes_elsewhere(&make());
    check_index_definitions(&make());
}

fn id(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

/// A tenant row as a key manager would create it.
fn tenant(name: &str) -> TenantRecord {
    TenantRecord {
        tenant_id: id(name),
        state: TenantState::Active,
        primary_version: 1,
        created_at: 10,
        rotation_period_seconds: 0,
        max_encryptions: 1000,
        deletion_time: None,
        destroyed_at: None,
    }
}

/// Distinct bytes per (version, master), so a swapped or stale key is noticed.
fn wrapped(version: u32, master: u32) -> WrappedTenantKey {
    WrappedTenantKey {
        master_version: master,
        bytes: [version as u8, master as u8]
            .into_iter()
            .cycle()
            .take(60)
            .collect(),
    }
}

fn version(v: u32, master: u32) -> KeyVersionRecord {
    KeyVersionRecord {
        version: v,
        state: KeyVersionState::Enabled,
        created_at: 10,
        encryptions: 0,
        wrapped: Some(wrapped(v, master)),
    }
}

/// Master versions 1 and 2, as a keyring check records them.
fn with_masters<S: KeyStore>(store: &S) {
    for version in [1, 2] {
        store
            .insert_master_version(&MasterVersionRecord {
                version,
                check_value: vec![version as u8; 32],
                created_at: 0,
                retired_at: None,
            })
            .unwrap();
    }
}

/// Tenant `name`, active, with version 1 under master version 1.
fn create<S: KeyStore>(store: &S, name: &str) {
    store.create_tenant(&tenant(name), &version(1, 1)).unwrap();
}

/// Adds the next version of `name` as primary.
fn rotate<S: KeyStore>(store: &S, name: &str) -> TenantRecord {
    let current = store.tenant(&id(name)).unwrap().unwrap();
    let next = current.primary_version + 1;
    store
        .add_key_version(&id(name), current.primary_version, &version(next, 1))
        .unwrap()
}

fn versions_of<S: KeyStore>(store: &S, name: &str) -> Vec<(u32, KeyVersionState, bool)> {
    store
        .key_versions(&id(name))
        .unwrap()
        .iter()
        .map(|v| (v.version, v.state, v.wrapped.is_some()))
        .collect()
}

fn wrapped_keys_of<S: KeyStore>(store: &S, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    store
        .for_each_wrapped_key(&mut |tenant, version, _| {
            if tenant.as_str() == name {
                found.push(version);
            }
            Ok(())
        })
        .unwrap();
    found
}

/// `create_tenants` commits every tenant or none; `create_tenant` refuses a used id.
pub fn check_create_tenants_is_all_or_nothing<S: KeyStore>(store: &S) {
    with_masters(store);
    store
        .create_tenants(&[(tenant("a"), version(1, 1)), (tenant("b"), version(1, 1))])
        .unwrap();
    assert!(store.tenant(&id("a")).unwrap().is_some());
    assert!(store.tenant(&id("b")).unwrap().is_some());
    // The conflict comes last: the tenants before it must not stay.
    let err = store
        .create_tenants(&[
            (tenant("c"), version(1, 1)),
            (tenant("d"), version(1, 1)),
            (tenant("a"), version(1, 1)),
        ])
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::AlreadyExists("tenant")), "{err:?}");
    assert!(store.tenant(&id("c")).unwrap().is_none(), "c was created");
    assert!(store.tenant(&id("d")).unwrap().is_none(), "d was created");
    assert!(wrapped_keys_of(store, "c").is_empty());
    // The same id twice in one batch.
    assert!(
        store
            .create_tenants(&[(tenant("e"), version(1, 1)), (tenant("e"), version(1, 1))])
            .is_err()
    );
    assert!(store.tenant(&id("e")).unwrap().is_none());
    let err = store
        .create_tenant(&tenant("a"), &version(1, 1))
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::AlreadyExists("tenant")), "{err:?}");
    assert_eq!(store.counts().unwrap().tenants, 2);
}

/// `replace_tenant` replaces the row and every version at once, or changes nothing.
pub fn check_replace_tenant_is_all_or_nothing<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    rotate(store, "a");
    store
        .set_key_version_state(&id("a"), 1, VersionTransition::Destroy)
        .unwrap();
    let before = store.tenant_snapshot(&id("a")).unwrap().unwrap();
    // Version 1 would come back with a key: refused, nothing changes.
    let mut row = tenant("a");
    row.primary_version = 3;
    let revived = [version(1, 2), version(2, 2), version(3, 2)];
    assert!(store.replace_tenant(&row, &revived).is_err());
    let after = store.tenant_snapshot(&id("a")).unwrap().unwrap();
    assert_eq!(after.0, before.0);
    assert_eq!(
        versions_of(store, "a"),
        vec![
            (1, KeyVersionState::Destroyed, false),
            (2, KeyVersionState::Enabled, true)
        ]
    );
    // A valid import replaces everything in one go.
    let mut destroyed = version(1, 2);
    destroyed.state = KeyVersionState::Destroyed;
    destroyed.wrapped = None;
    store
        .replace_tenant(&row, &[destroyed, version(2, 2), version(3, 2)])
        .unwrap();
    let (record, versions) = store.tenant_snapshot(&id("a")).unwrap().unwrap();
    assert_eq!(record.primary_version, 3);
    assert_eq!(versions.len(), 3);
    assert!(
        versions
            .iter()
            .skip(1)
            .all(|v| v.wrapped.as_ref().is_some_and(|w| w.master_version == 2))
    );
    // A new tenant can be imported; a destroyed one cannot.
    store
        .replace_tenant(&tenant("n"), &[version(1, 1)])
        .unwrap();
    assert_eq!(versions_of(store, "n").len(), 1);
    store
        .set_tenant_state(
            &id("n"),
            TenantTransition::ScheduleDeletion { deletion_time: 0 },
            0,
        )
        .unwrap();
    store
        .set_tenant_state(&id("n"), TenantTransition::Destroy, 0)
        .unwrap();
    let err = store
        .replace_tenant(&tenant("n"), &[version(1, 1)])
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::Destroyed)),
        "{err:?}"
    );
    assert!(wrapped_keys_of(store, "n").is_empty());
}

/// An import planned while a server reserved more encryptions under a version keeps the
/// store's higher counter, and still takes its own where that is higher.
pub fn check_replace_tenant_never_moves_a_counter_back<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    rotate(store, "a");
    let mut row = tenant("a");
    row.primary_version = 2;
    // Planned with counters of 0 and 40; the server reserves 100 under version 1 meanwhile.
    let (mut first, mut second) = (version(1, 2), version(2, 2));
    first.encryptions = 0;
    second.encryptions = 40;
    assert_eq!(store.reserve_encryptions(&id("a"), 1, 100).unwrap(), 100);
    store.replace_tenant(&row, &[first, second]).unwrap();
    let counters: Vec<(u32, u64)> = store
        .key_versions(&id("a"))
        .unwrap()
        .iter()
        .map(|v| (v.version, v.encryptions))
        .collect();
    assert_eq!(counters, [(1, 100), (2, 40)]);
    assert_eq!(store.reserve_encryptions(&id("a"), 1, 1).unwrap(), 101);
}

/// Every conditional update refuses a stale expectation with the typed error and changes
/// nothing.
pub fn check_compare_and_set_conflicts<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    rotate(store, "a");
    // A stale expected primary.
    let err = store
        .add_key_version(&id("a"), 1, &version(3, 1))
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::ConcurrentChange), "{err:?}");
    assert_eq!(
        versions_of(store, "a").len(),
        2,
        "the losing version stayed"
    );
    assert_eq!(store.tenant(&id("a")).unwrap().unwrap().primary_version, 2);
    // A transition from the wrong state.
    let err = store
        .set_tenant_state(&id("a"), TenantTransition::Resume, 0)
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::Active)),
        "{err:?}"
    );
    let err = store
        .set_tenant_state(&id("a"), TenantTransition::CancelDeletion, 0)
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::Active)),
        "{err:?}"
    );
    assert_eq!(
        store.tenant(&id("a")).unwrap().unwrap().state,
        TenantState::Active
    );
    let suspended = store
        .set_tenant_state(&id("a"), TenantTransition::Suspend, 0)
        .unwrap();
    assert_eq!(suspended.state, TenantState::Suspended);
    // A suspended tenant still rotates.
    assert_eq!(rotate(store, "a").primary_version, 3);
    // Versions: the primary cannot go, a state cannot be left twice.
    let err = store
        .set_key_version_state(&id("a"), 3, VersionTransition::Disable)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::PrimaryKeyVersion), "{err:?}");
    store
        .set_key_version_state(&id("a"), 1, VersionTransition::Disable)
        .unwrap();
    let err = store
        .set_key_version_state(&id("a"), 1, VersionTransition::Disable)
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(
            err,
            Error::KeyVersionState {
                version: 1,
                state: KeyVersionState::Disabled
            }
        ),
        "{err:?}"
    );
    let err = store
        .set_key_version_state(&id("a"), 9, VersionTransition::Enable)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::NotFound("key version")), "{err:?}");
    // Deletion windows, both ways.
    store
        .set_tenant_state(
            &id("a"),
            TenantTransition::ScheduleDeletion { deletion_time: 100 },
            0,
        )
        .unwrap();
    let err = store
        .add_key_version(&id("a"), 3, &version(4, 1))
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::PendingDeletion)),
        "{err:?}"
    );
    let err = store
        .set_tenant_state(&id("a"), TenantTransition::Destroy, 99)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::DeletionWindowOpen), "{err:?}");
    assert_eq!(wrapped_keys_of(store, "a"), vec![1, 2, 3]);
    let err = store
        .set_tenant_state(&id("a"), TenantTransition::CancelDeletion, 100)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::DeletionWindowPassed), "{err:?}");
    let back = store
        .set_tenant_state(&id("a"), TenantTransition::CancelDeletion, 99)
        .unwrap();
    assert_eq!(
        (back.state, back.deletion_time),
        (TenantState::Active, None)
    );
    let err = store
        .set_tenant_state(&id("missing"), TenantTransition::Suspend, 0)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::NotFound("tenant")), "{err:?}");
}

/// Tenants list in id order, page after page; versions come oldest first.
pub fn check_ordering<S: KeyStore>(store: &S) {
    with_masters(store);
    for name in ["t05", "t01", "t03", "t02", "t04"] {
        create(store, name);
    }
    let mut seen = Vec::new();
    let mut after: Option<TenantId> = None;
    loop {
        let page = store.list_tenants(after.as_ref(), 2).unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.tenant_id.clone());
        seen.extend(page.iter().map(|t| t.tenant_id.as_str().to_owned()));
    }
    assert_eq!(seen, ["t01", "t02", "t03", "t04", "t05"]);
    assert_eq!(store.list_tenants(Some(&id("t05")), 10).unwrap().len(), 0);
    for _ in 0..3 {
        rotate(store, "t03");
    }
    let order: Vec<u32> = versions_of(store, "t03").iter().map(|v| v.0).collect();
    assert_eq!(order, [1, 2, 3, 4]);
    let (record, versions) = store.tenant_snapshot(&id("t03")).unwrap().unwrap();
    assert_eq!(record.primary_version, 4);
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(store.tenant_snapshot(&id("none")).unwrap().is_none());
    assert!(store.key_versions(&id("none")).unwrap().is_empty());
}

/// Destroying a version or a tenant leaves no wrapped key of it, and a destroyed id never
/// comes back.
pub fn check_shredding<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    create(store, "b");
    rotate(store, "a");
    let destroyed = store
        .set_key_version_state(&id("a"), 1, VersionTransition::Destroy)
        .unwrap();
    assert_eq!(destroyed.state, KeyVersionState::Destroyed);
    assert!(destroyed.wrapped.is_none());
    assert_eq!(wrapped_keys_of(store, "a"), vec![2]);
    // Destroyed is final for a version.
    let err = store
        .set_key_version_state(&id("a"), 1, VersionTransition::Enable)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::KeyVersionState { .. }), "{err:?}");
    store
        .set_tenant_state(
            &id("a"),
            TenantTransition::ScheduleDeletion { deletion_time: 50 },
            0,
        )
        .unwrap();
    let gone = store
        .set_tenant_state(&id("a"), TenantTransition::Destroy, 50)
        .unwrap();
    assert_eq!(gone.state, TenantState::Destroyed);
    assert_eq!(gone.destroyed_at, Some(50));
    assert!(wrapped_keys_of(store, "a").is_empty());
    assert!(
        versions_of(store, "a")
            .iter()
            .all(|(_, state, has_key)| *state == KeyVersionState::Destroyed && !has_key)
    );
    assert_eq!(
        store.counts().unwrap().wrapped_keys,
        1,
        "only b's key stays"
    );
    // The tombstone stays, and the id is never reused, alone or in bulk.
    assert!(store.tenant(&id("a")).unwrap().is_some());
    let err = store
        .create_tenant(&tenant("a"), &version(1, 1))
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::Destroyed)),
        "{err:?}"
    );
    assert!(
        store
            .create_tenants(&[(tenant("z"), version(1, 1)), (tenant("a"), version(1, 1))])
            .is_err()
    );
    assert!(store.tenant(&id("z")).unwrap().is_none());
    for transition in [
        TenantTransition::CancelDeletion,
        TenantTransition::Destroy,
        TenantTransition::Resume,
    ] {
        let err = store
            .set_tenant_state(&id("a"), transition, 1000)
            .err()
            .expect("the store must refuse this");
        assert!(
            matches!(err, Error::TenantState(TenantState::Destroyed)),
            "{err:?}"
        );
    }
    let err = store
        .set_rotation_policy(&id("a"), 5, 5)
        .err()
        .expect("the store must refuse this");
    assert!(
        matches!(err, Error::TenantState(TenantState::Destroyed)),
        "{err:?}"
    );
    let mut items = store.destroyed_items().unwrap();
    items.sort();
    assert_eq!(
        items,
        vec![ShredItem {
            tenant_id: id("a"),
            version: None
        }]
    );
}

/// `shred` destroys whatever the state and reports only what it destroyed; a destroyed tenant
/// the store never knew becomes a tombstone (its id can never be created), a version of an
/// unknown tenant is skipped.
pub fn check_shred_ledger_reapplication<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    create(store, "b");
    rotate(store, "b");
    let items = [
        ShredItem {
            tenant_id: id("a"),
            version: None,
        },
        ShredItem {
            tenant_id: id("b"),
            version: Some(1),
        },
        ShredItem {
            tenant_id: id("nobody"),
            version: None,
        },
        ShredItem {
            tenant_id: id("unknown"),
            version: Some(1),
        },
    ];
    let done = store.shred(&items, 70).unwrap();
    assert_eq!(done, items[..3].to_vec());
    assert_eq!(
        store.tenant(&id("a")).unwrap().unwrap().state,
        TenantState::Destroyed
    );
    assert!(wrapped_keys_of(store, "a").is_empty());
    assert_eq!(wrapped_keys_of(store, "b"), vec![2]);
    // The tenant the store never knew is a tombstone now: its id is never created again.
    assert_eq!(
        store.tenant(&id("nobody")).unwrap().unwrap().state,
        TenantState::Destroyed
    );
    let err = store
        .create_tenant(&tenant("nobody"), &version(1, 1))
        .err()
        .expect("a tombstone id must not be created again");
    assert!(
        matches!(err, Error::TenantState(TenantState::Destroyed)),
        "{err:?}"
    );
    assert!(store.tenant(&id("unknown")).unwrap().is_none());
    assert!(store.shred(&items, 80).unwrap().is_empty(), "nothing new");
    let mut destroyed = store.destroyed_items().unwrap();
    destroyed.sort();
    let mut expected = items[..3].to_vec();
    expected.sort();
    assert_eq!(destroyed, expected);
}

/// Tokens: insert, find by hash, list oldest first, revoke once, quarantine and release.
pub fn check_tokens<S: KeyStore>(store: &S) {
    let token = |id: &str, created_at: i64, byte: u8| TokenRecord {
        id: id.into(),
        name: format!("name-{id}"),
        hash: [byte; 32],
        role: "service".into(),
        tenants: "*".into(),
        operations: "*".into(),
        created_at,
        expires_at: Some(1_000),
        revoked_at: None,
        quarantined_at: None,
    };
    store.insert_token(&token("t2", 20, 2)).unwrap();
    store.insert_token(&token("t1", 10, 1)).unwrap();
    let found = store.token_by_hash(&[2; 32]).unwrap().unwrap();
    assert_eq!(
        (found.id.as_str(), found.name.as_str(), found.expires_at),
        ("t2", "name-t2", Some(1_000))
    );
    assert!(store.token_by_hash(&[3; 32]).unwrap().is_none());
    let ids: Vec<String> = store
        .list_tokens()
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["t1", "t2"]);
    assert!(store.revoke_token("t2", 30).unwrap());
    assert!(!store.revoke_token("t2", 40).unwrap(), "revoked twice");
    assert!(!store.revoke_token("none", 40).unwrap());
    let revoked = store.token_by_hash(&[2; 32]).unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(30), "the first revocation stays");
    assert_eq!(
        store.token_by_hash(&[1; 32]).unwrap().unwrap().revoked_at,
        None
    );
    // Quarantine (issue 16): set once (the first time stays), read back through the row MAC,
    // released once.
    assert!(store.set_token_quarantine("t1", Some(50)).unwrap());
    assert!(
        !store.set_token_quarantine("t1", Some(60)).unwrap(),
        "twice"
    );
    assert!(!store.set_token_quarantine("none", Some(60)).unwrap());
    let quarantined = store.token_by_hash(&[1; 32]).unwrap().unwrap();
    assert_eq!(quarantined.quarantined_at, Some(50));
    assert_eq!(store.list_tokens().unwrap()[0].quarantined_at, Some(50));
    assert!(store.set_token_quarantine("t1", None).unwrap());
    assert!(
        !store.set_token_quarantine("t1", None).unwrap(),
        "released twice"
    );
    assert_eq!(
        store
            .token_by_hash(&[1; 32])
            .unwrap()
            .unwrap()
            .quarantined_at,
        None
    );
}

/// Master versions: recorded once, retired only when nothing is wrapped under them, and
/// nothing can be wrapped under a retired one; the audit secret counts.
pub fn check_master_versions<S: KeyStore>(store: &S) {
    with_masters(store);
    // A version already known keeps its check value.
    store
        .insert_master_version(&MasterVersionRecord {
            version: 1,
            check_value: vec![9; 32],
            created_at: 5,
            retired_at: None,
        })
        .unwrap();
    let masters = store.master_versions().unwrap();
    assert_eq!(
        masters.iter().map(|m| m.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(masters[0].check_value, vec![1; 32]);
    create(store, "a");
    assert!(store.put_audit_key(&wrapped(0, 1), None).unwrap());
    assert!(
        !store.put_audit_key(&wrapped(0, 2), None).unwrap(),
        "exists"
    );
    assert_eq!(store.count_wrapped_under(1).unwrap(), 2);
    assert!(!store.retire_master_version(1, 5).unwrap());
    let rows = store.wrapped_under(1, 10).unwrap();
    assert_eq!(rows.len(), 1);
    let batch: Vec<Rewrapping> = rows
        .into_iter()
        .map(|(tenant_id, version, _)| Rewrapping {
            tenant_id,
            version,
            from_master: 1,
            wrapped: wrapped(version, 2),
        })
        .collect();
    assert_eq!(store.rewrap(&batch).unwrap(), 1);
    assert_eq!(store.rewrap(&batch).unwrap(), 0, "no longer under 1");
    assert!(!store.retire_master_version(1, 5).unwrap(), "the audit key");
    assert!(!store.put_audit_key(&wrapped(0, 2), Some(2)).unwrap());
    assert!(store.put_audit_key(&wrapped(0, 2), Some(1)).unwrap());
    assert_eq!(store.audit_key().unwrap().unwrap().master_version, 2);
    assert_eq!(store.count_wrapped_under(1).unwrap(), 0);
    assert!(store.retire_master_version(1, 5).unwrap());
    assert_eq!(store.master_versions().unwrap()[0].retired_at, Some(5));
    // Nothing may be wrapped under a retired version any more.
    let err = store
        .create_tenant(&tenant("b"), &version(1, 1))
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::RetiredMasterVersion(1)), "{err:?}");
    assert!(store.tenant(&id("b")).unwrap().is_none());
    let err = store
        .add_key_version(&id("a"), 1, &version(2, 1))
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::RetiredMasterVersion(1)), "{err:?}");
    store.add_key_version(&id("a"), 1, &version(2, 2)).unwrap();
}

/// Reservations add up, never decrease, and need an existing version.
pub fn check_reserve_encryptions<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    assert_eq!(store.reserve_encryptions(&id("a"), 1, 5).unwrap(), 5);
    assert_eq!(store.reserve_encryptions(&id("a"), 1, 3).unwrap(), 8);
    assert_eq!(store.reserve_encryptions(&id("a"), 1, 0).unwrap(), 8);
    assert_eq!(store.key_versions(&id("a")).unwrap()[0].encryptions, 8);
    let err = store
        .reserve_encryptions(&id("a"), 2, 1)
        .err()
        .expect("the store must refuse this");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

/// Of many callers rotating from the same primary at once, exactly one wins; the others get
/// [`Error::ConcurrentChange`].
pub fn check_concurrent_rotations_have_one_winner<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    let wins = AtomicUsize::new(0);
    let conflicts = AtomicUsize::new(0);
    let racers = 8;
    std::thread::scope(|scope| {
        for _ in 0..racers {
            scope.spawn(
                || match store.add_key_version(&id("a"), 1, &version(2, 1)) {
                    Ok(record) => {
                        assert_eq!(record.primary_version, 2);
                        wins.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(Error::ConcurrentChange) => {
                        conflicts.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(other) => panic!("a racing rotation failed otherwise: {other:?}"),
                },
            );
        }
    });
    assert_eq!(wins.load(Ordering::SeqCst), 1);
    assert_eq!(conflicts.load(Ordering::SeqCst), racers - 1);
    assert_eq!(versions_of(store, "a").len(), 2);
}

/// Concurrent reservations are all counted: the total is exact and each caller sees its
/// own totals grow.
pub fn check_concurrent_reservations_add_up<S: KeyStore>(store: &S) {
    with_masters(store);
    create(store, "a");
    let (threads, rounds, each) = (8u64, 25u64, 7u64);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut last = 0;
                for _ in 0..rounds {
                    let total = store.reserve_encryptions(&id("a"), 1, each).unwrap();
                    assert!(total >= last + each, "{total} after {last}");
                    last = total;
                }
            });
        }
    });
    assert_eq!(
        store.key_versions(&id("a")).unwrap()[0].encryptions,
        threads * rounds * each
    );
}

/// A store's own writes are not changes made elsewhere, and the generation never goes back.
pub fn check_own_writes_are_not_changes_elsewhere<S: KeyStore>(store: &S) {
    let before = store.change_generation().unwrap();
    with_masters(store);
    create(store, "a");
    rotate(store, "a");
    assert_eq!(store.change_generation().unwrap(), before);
    if let Some(generation) = store.try_change_generation() {
        assert_eq!(generation.unwrap(), before);
    }
}

/// The row key every contract store gets (a fixed audit secret: tests only).
pub fn test_row_key() -> RowKey {
    RowKey::derive(&SecretKey::from_slice(&[0x5a; 32]).unwrap()).unwrap()
}

/// Installs [`test_row_key`] in a fresh store, as `DataDir::open` installs the real one.
pub fn install_test_row_key<S: KeyStore>(store: &S) {
    store.set_row_key(test_row_key(), true).unwrap();
}

/// Runs every tamper check, each on a store from `make` (new, empty, key installed or not).
pub fn tamper_contract<S: KeyStore + RowTamper>(make: impl Fn() -> S) {
    let make = || {
        let store = make();
        install_test_row_key(&store);
        store
    };
    check_rows_need_the_row_key(&make);
    check_edited_rows_are_refused(&make());
    check_moved_and_forged_rows_are_refused(&make());
    check_rolled_back_rows_are_detected(&make());
    check_upgrade_macs_existing_rows_once(&make());
}

fn is_integrity<T>(result: crate::error::Result<T>) -> bool {
    matches!(result, Err(Error::StoreIntegrity(_)))
}

fn column(row: &[(String, RawValue)], name: &str) -> RawValue {
    row.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no column {name}"))
}

fn set(name: &str, value: RawValue) -> Vec<(String, RawValue)> {
    vec![(name.to_owned(), value)]
}

fn service_token(id: &str, byte: u8, tenants: &str, operations: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: format!("name-{id}"),
        hash: [byte; 32],
        role: "service".into(),
        tenants: tenants.into(),
        operations: operations.into(),
        created_at: 10,
        expires_at: None,
        revoked_at: None,
        quarantined_at: None,
    }
}

/// Rows MAC'd under one key fail the full check under another (a wrong audit secret), and
/// after a failed check the store serves no row until a check passes.
pub fn check_rows_need_the_row_key<S: KeyStore>(make: &impl Fn() -> S) {
    let store = make();
    with_masters(&store);
    create(&store, "a");
    store
        .insert_token(&service_token("t1", 1, "a", "*"))
        .unwrap();
    let other = RowKey::derive(&SecretKey::from_slice(&[0x77; 32]).unwrap()).unwrap();
    assert!(
        is_integrity(store.set_row_key(other, false)),
        "a key of another secret must fail the full check"
    );
    assert!(
        is_integrity(store.tenant(&id("a"))),
        "after a failed check nothing is served"
    );
    install_test_row_key(&store);
    assert!(
        store.tenant(&id("a")).unwrap().is_some(),
        "the right key serves again"
    );
}

/// A row edited by a database writer (no MAC update) is refused on load, for every
/// security-relevant column: token role, scope, operations, revocation; tenant state,
/// deletion schedule, rotation policy, primary version; key-version state and nonce-budget
/// count. Putting the genuine value back makes the row load again.
pub fn check_edited_rows_are_refused<S: KeyStore + RowTamper>(store: &S) {
    with_masters(store);
    create(store, "a");
    rotate(store, "a");
    store
        .insert_token(&service_token("t1", 1, "a", "encrypt"))
        .unwrap();
    store
        .insert_token(&service_token("t2", 2, "a", "*"))
        .unwrap();
    assert!(store.revoke_token("t2", 20).unwrap());
    store
        .set_key_version_state(&id("a"), 1, VersionTransition::Disable)
        .unwrap();
    store.reserve_encryptions(&id("a"), 2, 500).unwrap();
    store
        .set_tenant_state(&id("a"), TenantTransition::Suspend, 30)
        .unwrap();
    let token = RowRef::Token("t1".into());
    let revoked = RowRef::Token("t2".into());
    let tenant = RowRef::Tenant(id("a"));
    let v1 = RowRef::KeyVersion(id("a"), 1);
    let v2 = RowRef::KeyVersion(id("a"), 2);
    let cases: Vec<(&RowRef, &str, RawValue, &str)> = vec![
        (&token, "role", RawValue::Text("admin".into()), "token role"),
        (&token, "tenants", RawValue::Text("*".into()), "token scope"),
        (
            &token,
            "operations",
            RawValue::Text("*".into()),
            "token operations",
        ),
        (
            &token,
            "expires_at",
            RawValue::Integer(i64::MAX),
            "token expiry",
        ),
        (&revoked, "revoked_at", RawValue::Null, "token revocation"),
        (
            &tenant,
            "state",
            RawValue::Integer(TenantState::Active.code()),
            "tenant state",
        ),
        (
            &tenant,
            "primary_version",
            RawValue::Integer(1),
            "primary version",
        ),
        (
            &tenant,
            "deletion_time",
            RawValue::Integer(1),
            "deletion schedule",
        ),
        (
            &tenant,
            "max_encryptions",
            RawValue::Integer(i64::MAX),
            "nonce budget",
        ),
        (
            &tenant,
            "rotation_period_seconds",
            RawValue::Integer(1),
            "rotation period",
        ),
        (
            &v1,
            "state",
            RawValue::Integer(KeyVersionState::Enabled.code()),
            "version state",
        ),
        (
            &v2,
            "encryptions",
            RawValue::Integer(0),
            "nonce-budget count",
        ),
    ];
    for (row, name, value, what) in cases {
        let genuine = column(&store.raw_row(row).unwrap().unwrap(), name);
        assert_ne!(genuine, value, "{what}: the case must change the row");
        store.raw_update(row, &set(name, value)).unwrap();
        let refused = match row {
            RowRef::Token(_) => {
                let hash = if matches!(row, RowRef::Token(t) if t == "t1") {
                    [1; 32]
                } else {
                    [2; 32]
                };
                is_integrity(store.token_by_hash(&hash))
                    && is_integrity(store.list_tokens())
                    && (matches!(row, RowRef::Token(t) if t == "t2")
                        || is_integrity(store.revoke_token("t1", 40)))
            }
            RowRef::Tenant(_) => {
                is_integrity(store.tenant(&id("a")))
                    && is_integrity(store.tenant_snapshot(&id("a")))
                    && is_integrity(store.list_tenants(None, 10))
                    && is_integrity(store.set_tenant_state(&id("a"), TenantTransition::Resume, 40))
                    && is_integrity(store.add_key_version(&id("a"), 2, &version(3, 1)))
            }
            RowRef::KeyVersion(_, v) => {
                is_integrity(store.key_versions(&id("a")))
                    && is_integrity(store.tenant_snapshot(&id("a")))
                    && is_integrity(store.reserve_encryptions(&id("a"), *v, 1))
            }
        };
        assert!(
            refused,
            "{what}: an edited row must fail its MAC check on every load"
        );
        store.raw_update(row, &set(name, genuine)).unwrap();
    }
    // Genuine again: everything loads, and the untouched writes still work.
    assert_eq!(
        store.tenant(&id("a")).unwrap().unwrap().state,
        TenantState::Suspended
    );
    assert!(
        store
            .token_by_hash(&[2; 32])
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
    assert_eq!(store.reserve_encryptions(&id("a"), 2, 1).unwrap(), 501);
    install_test_row_key(store);
}

/// A MAC moved to another row (of the same or another table) is refused, and so is a row
/// inserted without the key (a forged admin token, with or without a copied MAC).
pub fn check_moved_and_forged_rows_are_refused<S: KeyStore + RowTamper>(store: &S) {
    with_masters(store);
    create(store, "a");
    create(store, "b");
    store
        .set_tenant_state(&id("b"), TenantTransition::Suspend, 30)
        .unwrap();
    store
        .insert_token(&service_token("t1", 1, "a", "*"))
        .unwrap();
    // b's whole authenticated state (columns, generation, MAC) copied onto a: refused, since
    // the identity is inside the MAC.
    let b = store.raw_row(&RowRef::Tenant(id("b"))).unwrap().unwrap();
    let moved: Vec<(String, RawValue)> = b
        .iter()
        .filter(|(n, _)| n != "tenant_id")
        .cloned()
        .collect();
    store.raw_update(&RowRef::Tenant(id("a")), &moved).unwrap();
    assert!(
        is_integrity(store.tenant(&id("a"))),
        "a MAC moved between rows"
    );
    // A key version's MAC on a tenant row (another table): refused.
    let v = store
        .raw_row(&RowRef::KeyVersion(id("b"), 1))
        .unwrap()
        .unwrap();
    store
        .raw_update(
            &RowRef::Tenant(id("b")),
            &[
                ("mac".into(), column(&v, "mac")),
                ("generation".into(), column(&v, "generation")),
            ],
        )
        .unwrap();
    assert!(
        is_integrity(store.tenant(&id("b"))),
        "a MAC moved between tables"
    );
    // A forged admin token carrying t1's MAC and generation.
    let t1 = store.raw_row(&RowRef::Token("t1".into())).unwrap().unwrap();
    let forged: Vec<(String, RawValue)> = t1
        .iter()
        .map(|(n, v)| match n.as_str() {
            "id" => (n.clone(), RawValue::Text("forged".into())),
            "hash" => (n.clone(), RawValue::Blob(vec![9; 32])),
            "role" => (n.clone(), RawValue::Text("admin".into())),
            "tenants" => (n.clone(), RawValue::Text("*".into())),
            _ => (n.clone(), v.clone()),
        })
        .collect();
    store
        .raw_insert(&RowRef::Token("forged".into()), &forged)
        .unwrap();
    assert!(
        is_integrity(store.token_by_hash(&[9; 32])),
        "a forged token row"
    );
    assert!(
        is_integrity(store.set_row_key(test_row_key(), false)),
        "the full check finds the forged and moved rows"
    );
}

/// A row replaced by an earlier genuine copy (its genuine MAC and generation) passes its own
/// MAC check but not the anchor: the full check (at every open, and in a server after every
/// change by another process) refuses the store. Covers an un-revoked token, an un-suspended
/// tenant, an earlier primary and a reset nonce-budget count.
pub fn check_rolled_back_rows_are_detected<S: KeyStore + RowTamper>(store: &S) {
    with_masters(store);
    create(store, "a");
    store
        .insert_token(&service_token("t1", 1, "a", "*"))
        .unwrap();
    store.reserve_encryptions(&id("a"), 1, 100).unwrap();
    let rows = [
        RowRef::Token("t1".into()),
        RowRef::Tenant(id("a")),
        RowRef::KeyVersion(id("a"), 1),
    ];
    let before: Vec<_> = rows
        .iter()
        .map(|r| store.raw_row(r).unwrap().unwrap())
        .collect();
    assert!(store.revoke_token("t1", 50).unwrap());
    store.reserve_encryptions(&id("a"), 1, 100).unwrap();
    rotate(store, "a");
    store
        .set_tenant_state(&id("a"), TenantTransition::Suspend, 60)
        .unwrap();
    install_test_row_key(store);
    for (row, old) in rows.iter().zip(&before) {
        let now = store.raw_row(row).unwrap().unwrap();
        store.raw_update(row, old).unwrap();
        assert!(
            is_integrity(store.set_row_key(test_row_key(), false)),
            "{row:?} rolled back to an earlier genuine copy must fail the full check"
        );
        store.raw_update(row, &now).unwrap();
        install_test_row_key(store);
    }
    // A deleted row (its MAC gone from the set) is caught the same way: emulated by
    // replacing the revoked token's MAC with garbage and generation with another.
    store
        .raw_update(
            &RowRef::Token("t1".into()),
            &set("mac", RawValue::Blob(vec![0; 32])),
        )
        .unwrap();
    assert!(is_integrity(store.set_row_key(test_row_key(), false)));
}

/// Only a pending schema upgrade MACs rows without checking them (once, backend-specific:
/// SQLite's is tested in `store::sqlite`): a row whose MAC a writer cleared afterwards is
/// refused, and installing the key again does not re-MAC it.
pub fn check_upgrade_macs_existing_rows_once<S: KeyStore + RowTamper>(store: &S) {
    with_masters(store);
    create(store, "a");
    store
        .raw_update(&RowRef::Tenant(id("a")), &set("mac", RawValue::Null))
        .unwrap();
    assert!(
        is_integrity(store.tenant(&id("a"))),
        "a cleared MAC is not a missing one"
    );
    assert!(
        is_integrity(store.set_row_key(test_row_key(), false)),
        "installing the key again does not re-MAC a cleared row"
    );
}

/// Blind index definitions: declared, found for the tenants they serve (a tenant's own before
/// the all-tenants one), listed, idempotent when repeated, never changed, and persisted
/// exactly (bits, normalization, scope, time).
pub fn check_index_definitions<S: KeyStore>(store: &S) {
    use crate::domain::index::{IndexDefinition, IndexName, IndexScope};
    let def = |name: &str, bits: u32, norm: &str, scope: IndexScope, at: i64| {
        IndexDefinition::parse(name, bits, norm, scope, at).unwrap()
    };
    let acme = IndexScope::Tenant(id("acme"));
    let email = IndexName::parse("email").unwrap();
    assert_eq!(store.index_definition(&id("acme"), &email).unwrap(), None);
    assert!(store.list_index_definitions(None).unwrap().is_empty());

    let all = def("email", 32, "casefold_trim", IndexScope::AllTenants, 100);
    assert_eq!(
        store.declare_index(&all).unwrap(),
        all,
        "a new definition is stored"
    );
    let again = def("email", 32, "casefold_trim", IndexScope::AllTenants, 200);
    assert_eq!(
        store.declare_index(&again).unwrap(),
        all,
        "repeating a declaration returns the one in force, unchanged"
    );
    assert_eq!(
        store.index_definition(&id("acme"), &email).unwrap(),
        Some(all.clone()),
        "an all-tenants definition serves every tenant, even one created later"
    );
    for changed in [
        def("email", 16, "casefold_trim", IndexScope::AllTenants, 300),
        def("email", 32, "exact", IndexScope::AllTenants, 300),
        def("email", 16, "casefold_trim", acme.clone(), 300),
    ] {
        assert!(
            matches!(store.declare_index(&changed), Err(Error::AlreadyExists(_))),
            "a changed definition under the same name is refused: {changed:?}"
        );
    }
    assert_eq!(
        store.index_definition(&id("acme"), &email).unwrap(),
        Some(all.clone())
    );

    let phone = def("phone", 64, "exact", acme.clone(), 400);
    store.declare_index(&phone).unwrap();
    let phone_name = IndexName::parse("phone").unwrap();
    assert_eq!(
        store.index_definition(&id("acme"), &phone_name).unwrap(),
        Some(phone.clone())
    );
    assert_eq!(
        store.index_definition(&id("other"), &phone_name).unwrap(),
        None,
        "a one-tenant definition serves no other tenant"
    );
    let other_phone = def(
        "phone",
        8,
        "casefold_trim",
        IndexScope::Tenant(id("other")),
        500,
    );
    store.declare_index(&other_phone).unwrap();
    assert!(
        matches!(
            store.declare_index(&def("phone", 64, "exact", IndexScope::AllTenants, 600)),
            Err(Error::AlreadyExists(_))
        ),
        "an all-tenants definition that some tenant's own contradicts is refused"
    );

    assert_eq!(
        store.list_index_definitions(Some(&id("acme"))).unwrap(),
        vec![all.clone(), phone.clone()],
        "a tenant's listing: one definition in force per name, in name order"
    );
    assert_eq!(
        store.list_index_definitions(None).unwrap(),
        vec![all, phone, other_phone],
        "the full listing: every definition"
    );
}
