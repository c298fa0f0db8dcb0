//! Backup, restore, per-tenant export/import and the shred ledger (issue 8), end to end: an
//! in-process server serves the data directory while the real binary backs it up, exports,
//! imports and restores it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use tenant_kms::crypto::{envelope, labels};
use tenant_kms::domain::lifecycle::TenantTransition;
use tenant_kms::domain::{KeyVersionState, TenantId};
use tenant_kms::keys::{MasterKeySource, MasterKeyring};
use tenant_kms::pb;
use tenant_kms::service::ServiceOptions;
use tenant_kms::service::state::DataDir;
use tenant_kms::store::{BackupStore, SqliteKeyStore};
use tonic::Code;

/// A deployment as operators should lay it out: the keyring (and with it the shred ledger)
/// apart from the data directory, so wiping the data directory keeps them.
struct Site {
    _temp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    keyring: PathBuf,
}

impl Site {
    fn new() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().to_path_buf();
        let keys = root.join("keys");
        std::fs::create_dir(&keys).unwrap();
        Self {
            data: root.join("data"),
            keyring: keys.join("master.keyring"),
            root,
            _temp: temp,
        }
    }

    fn options(&self) -> ServiceOptions {
        let mut options = test_options(&self.data);
        options.master_keys = MasterKeySource::File(self.keyring.clone());
        options
    }

    fn ledger(&self) -> PathBuf {
        PathBuf::from(format!("{}.shred-ledger", self.keyring.display()))
    }

    /// `tenant-kms <args> --data-dir D --keyring K`.
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        let data = self.data.to_str().unwrap();
        let keyring = self.keyring.to_str().unwrap();
        all.extend(["--data-dir", data, "--keyring", keyring]);
        run_cli(&all)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "tenant-kms {args:?} failed:\n{out}\n{err}");
        out
    }

    /// Runs a command that must be refused; returns its stderr.
    fn cli_refused(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(
            code, 1,
            "tenant-kms {args:?} should be refused:\n{out}\n{err}"
        );
        err
    }

    async fn start(&self) -> TestServer {
        TestServer::start_with(self.options()).await
    }

    /// Starts a server on the site, asserts that tenant `id` is in `state`, and stops it.
    async fn assert_state_after_start(&self, id: &str, state: pb::TenantState) {
        let server = self.start().await;
        let (_, mut tenants, _) = server.clients().await;
        assert_eq!(get(&mut tenants, id).await.state, state as i32, "{id}");
        drop(tenants);
        server.stop().await;
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_owned()
    }
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A tenant's row. GetTenant refuses a destroyed tenant ("tenant destroyed"); its tombstone
/// is read from ListTenants then.
async fn get(tenants: &mut Tenants, id: &str) -> pb::Tenant {
    match get_tenant(tenants, id).await {
        Ok(t) => t,
        Err(status) => {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(status.message(), "tenant destroyed");
            list_tenants(tenants)
                .await
                .into_iter()
                .find(|t| t.tenant_id == id)
                .expect("a destroyed tenant keeps its tombstone")
        }
    }
}

/// (version, state, primary) of every key version.
async fn versions(tenants: &mut Tenants, id: &str) -> Vec<(u32, i32, bool)> {
    key_versions(tenants, id)
        .await
        .iter()
        .map(|v| (v.version, v.state, v.primary))
        .collect()
}

async fn destroy_now(tenants: &mut Tenants, id: &str) {
    let t = schedule_deletion(tenants, id, Some(0)).await.unwrap();
    assert_eq!(t.state, pb::TenantState::Destroyed as i32);
}

/// The wrapped bytes and the unwrapped key bytes of every key version of a tenant in the
/// `keys.db` at `path` (opened read-only).
fn key_bytes(path: &Path, keyring: &Path, id: &str) -> Vec<(u32, Vec<u8>, Vec<u8>)> {
    let store = SqliteKeyStore::open_read_only(path).unwrap();
    let ring = MasterKeyring::load(&MasterKeySource::File(keyring.into()), false).unwrap();
    // The wrapped keys only (no row MAC key at hand: the metadata rows are not read).
    let mut wrapped = Vec::new();
    store
        .for_each_wrapped_key(&mut |tenant, version, w| {
            if tenant.as_str() == id {
                wrapped.push((version, w.clone()));
            }
            Ok(())
        })
        .unwrap();
    wrapped
        .into_iter()
        .map(|(version, w)| {
            let m = w.master_version;
            let wrapping =
                envelope::master_wrapping_key(ring.get(m).unwrap(), labels::TENANT_KEY_WRAP, m)
                    .unwrap();
            let key = envelope::unwrap_tenant_key(&wrapping, m, id, version, &w.bytes).unwrap();
            (version, w.bytes, key.expose_secret().to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_full_backup_wipe_restore_decrypts_everything() {
    let site = Site::new();
    let server = site.start().await;
    let token = server.admin_token.clone();
    let (mut keys, mut tenants, _) = server.clients().await;
    let mut values = Vec::new();
    for i in 0..100 {
        let id = format!("tenant-{i:03}");
        create_tenant(&mut tenants, &id).await;
        if i % 10 == 0 {
            rotate_tenant(&mut tenants, &id).await.unwrap();
        }
        let plaintext = format!("secret value {i}").into_bytes();
        let aad = format!("row-{i}").into_bytes();
        let ct = encrypt(&mut keys, &id, "crm.contacts.email", &plaintext, &aad)
            .await
            .ciphertext;
        values.push((id, plaintext, aad, ct));
    }
    // Online: the server keeps running while the backup is taken.
    let backup = site.path("backup-1");
    let out = site.cli_ok(&["backup", "--out", &backup, "--json"]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["tenants"], 100);
    assert_eq!(summary["wrapped_keys"], 110);
    // The server still serves, and its audit records the backup.
    encrypt(&mut keys, "tenant-000", "c", b"after backup", b"").await;
    let out = site.cli_ok(&["backup", "verify", &backup]);
    assert!(out.starts_with("OK: "), "{out}");
    assert!(out.contains("110 wrapped keys unwrap"), "{out}");
    drop((keys, tenants));
    server.stop().await;
    let exported = site.cli_ok(&["audit", "export"]);
    assert!(
        exported.contains("\"operation\":\"Backup\"") && exported.contains("cli:"),
        "the backup is audited as cli:<user>"
    );

    // Disaster: the data directory is gone. The keyring and the ledger live elsewhere.
    std::fs::remove_dir_all(&site.data).unwrap();
    site.cli_ok(&["restore", "--from", &backup]);
    // A restore records itself at the head of the restored chain, and the chain verifies.
    let out = site.cli_ok(&["audit", "verify"]);
    assert!(out.starts_with("OK: "), "{out}");
    let exported = site.cli_ok(&["audit", "export"]);
    let last: serde_json::Value = serde_json::from_str(exported.lines().last().unwrap()).unwrap();
    assert_eq!(last["operation"], "Restore");
    assert!(
        last["detail"].as_str().unwrap().contains("restored backup"),
        "{last}"
    );
    // The operator keeps the admin token apart from backups (it is not in them).
    std::fs::write(site.data.join("admin.token"), format!("{token}\n")).unwrap();
    let server = site.start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    for (id, plaintext, aad, ct) in &values {
        let back = decrypt(&mut keys, id, "crm.contacts.email", ct, aad)
            .await
            .unwrap();
        assert_eq!(&back.plaintext, plaintext, "{id}");
    }
    assert_eq!(get(&mut tenants, "tenant-010").await.primary_version, 2);
    drop((keys, tenants));
    server.stop().await;
    let out = site.cli_ok(&["audit", "verify"]);
    assert!(out.starts_with("OK: "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_verify_and_restore_refuse_bad_backups() {
    let site = Site::new();
    let server = site.start().await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let backup = site.path("backup");
    site.cli_ok(&["backup", "--out", &backup]);
    // A backup never goes into a non-empty directory.
    let err = site.cli_refused(&["backup", "--out", &backup]);
    assert!(err.contains("not empty"), "{err}");
    drop(tenants);
    server.stop().await;

    // A non-empty data directory is not overwritten without --force.
    let err = site.cli_refused(&["restore", "--from", &backup]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );

    let copy = |name: &str| {
        let dir = site.root.join(name);
        std::fs::create_dir(&dir).unwrap();
        for file in ["keys.db", "audit.db", "manifest.json", "manifest.mac"] {
            std::fs::copy(Path::new(&backup).join(file), dir.join(file)).unwrap();
        }
        dir
    };
    let flip = |path: PathBuf, at: usize| {
        let mut bytes = std::fs::read(&path).unwrap();
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
    };
    // One byte of a data file: checksum.
    let bad = copy("bad-data");
    flip(bad.join("keys.db"), 5000);
    let err = site.cli_refused(&["backup", "verify", bad.to_str().unwrap()]);
    assert!(err.contains("keys.db does not match its checksum"), "{err}");
    let err = site.cli_refused(&["restore", "--from", bad.to_str().unwrap(), "--force"]);
    assert!(err.contains("checksum"), "{err}");
    // One byte of the manifest (a digest digit): MAC.
    let bad = copy("bad-manifest");
    let text = std::fs::read_to_string(bad.join("manifest.json")).unwrap();
    let at = text.find("\"sha256\": \"").unwrap() + 12;
    flip(bad.join("manifest.json"), at);
    let err = site.cli_refused(&["backup", "verify", bad.to_str().unwrap()]);
    assert!(err.contains("manifest MAC"), "{err}");
    let bad = copy("bad-mac");
    flip(bad.join("manifest.mac"), 3);
    let err = site.cli_refused(&["backup", "verify", bad.to_str().unwrap()]);
    assert!(err.contains("manifest MAC"), "{err}");

    // Another keyring: refused before anything is touched.
    let other = Site::new();
    std::fs::create_dir_all(&other.data).unwrap();
    MasterKeyring::load(&MasterKeySource::File(other.keyring.clone()), true).unwrap();
    let err = other.cli_refused(&["backup", "verify", &backup]);
    assert!(err.contains("manifest MAC"), "{err}");
    let err = other.cli_refused(&["restore", "--from", &backup]);
    assert!(
        err.contains("manifest MAC") || err.contains("check value"),
        "{err}"
    );
    assert!(!other.data.join("keys.db").exists());

    // The failed restores left the live data directory as it was.
    let out = site.cli_ok(&["audit", "verify"]);
    assert!(out.starts_with("OK: "), "{out}");
    site.assert_state_after_start("acme", pb::TenantState::Active)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_a_keyring_whose_check_values_differ() {
    let site = Site::new();
    let server = site.start().await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    drop(tenants);
    server.stop().await;
    // Master versions 1 (retired after the re-wrap) and 2; the manifest is MAC'd under 2.
    site.cli_ok(&["rotate", "--master"]);
    let backup = site.path("backup");
    site.cli_ok(&["backup", "--out", &backup]);
    let restore_with = |keyring: &Path| {
        let target = site.root.join("target-data");
        let (code, _, err) = run_cli(&[
            "restore",
            "--from",
            &backup,
            "--data-dir",
            target.to_str().unwrap(),
            "--keyring",
            keyring.to_str().unwrap(),
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(!target.join("keys.db").exists());
        err
    };
    let text = std::fs::read_to_string(&site.keyring).unwrap();
    let line = |v: &str| text.lines().find(|l| l.starts_with(v)).unwrap().to_owned();
    // Version 2 right, version 1 another key: the MAC verifies, the check values do not.
    let forged = site.root.join("keys/forged.keyring");
    write_private(
        &forged,
        &text.replace(&line("1 "), &format!("1 {}", "ab".repeat(32))),
    );
    let err = restore_with(&forged);
    assert!(
        err.contains("master key version 1 has another key check value"),
        "{err}"
    );
    // Version 2 missing: nothing to check the manifest with.
    let partial = site.root.join("keys/partial.keyring");
    write_private(&partial, &text.replace(&line("2 "), ""));
    let err = restore_with(&partial);
    assert!(err.contains("has no version 2"), "{err}");
    // The right keyring restores.
    site.cli_ok(&["backup", "verify", &backup]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_export_rotate_import_rolls_back_only_that_tenant() {
    let site = Site::new();
    let server = site.start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "a").await;
    create_tenant(&mut tenants, "b").await;
    let a1 = encrypt(&mut keys, "a", "ctx", b"a under v1", b"")
        .await
        .ciphertext;
    let b1 = encrypt(&mut keys, "b", "ctx", b"b under v1", b"")
        .await
        .ciphertext;
    let file = site.path("a.export");
    site.cli_ok(&["tenant", "export", "a", "--out", &file]);
    // Export never overwrites.
    let err = site.cli_refused(&["tenant", "export", "a", "--out", &file]);
    assert!(err.contains("exists"), "{err}");

    rotate_tenant(&mut tenants, "a").await.unwrap();
    rotate_tenant(&mut tenants, "b").await.unwrap();
    let a2 = encrypt(&mut keys, "a", "ctx", b"a under v2", b"")
        .await
        .ciphertext;
    let b2 = encrypt(&mut keys, "b", "ctx", b"b under v2", b"")
        .await
        .ciphertext;
    let b_before = (
        get(&mut tenants, "b").await,
        versions(&mut tenants, "b").await,
    );

    // Import while the server runs: it notices the change on its next call.
    let out = site.cli_ok(&["tenant", "import", &file]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["result"], "rolled_back");
    assert_eq!(summary["disabled_versions"], serde_json::json!([2]));
    let a = get(&mut tenants, "a").await;
    assert_eq!(a.primary_version, 1);
    assert_eq!(
        versions(&mut tenants, "a").await,
        vec![
            (1, pb::KeyVersionState::Enabled as i32, true),
            (2, pb::KeyVersionState::Disabled as i32, false)
        ]
    );
    let back = decrypt(&mut keys, "a", "ctx", &a1, b"").await.unwrap();
    assert_eq!(back.plaintext, b"a under v1");
    // Rolled back: the newer version is kept but disabled, so its values are refused ...
    let err = decrypt(&mut keys, "a", "ctx", &a2, b"").await.status_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // A new encryption works under the restored primary.
    let again = encrypt(&mut keys, "a", "ctx", b"again", b"").await;
    assert_eq!(again.key_version, 1);
    // ... and not lost: an operator who imported by mistake enables it again. A later
    // rotation never reuses its number.
    enable_key_version(&mut tenants, "a", 2).await.unwrap();
    let back = decrypt(&mut keys, "a", "ctx", &a2, b"").await.unwrap();
    assert_eq!(back.plaintext, b"a under v2");
    disable_key_version(&mut tenants, "a", 2).await.unwrap();
    // B is untouched.
    assert_eq!(
        (
            get(&mut tenants, "b").await,
            versions(&mut tenants, "b").await
        ),
        b_before
    );
    for (ct, pt) in [(&b1, &b"b under v1"[..]), (&b2, b"b under v2")] {
        assert_eq!(
            decrypt(&mut keys, "b", "ctx", ct, b"")
                .await
                .unwrap()
                .plaintext,
            pt
        );
    }

    // Refusals change nothing.
    let snapshot = |t: pb::Tenant, v: Vec<(u32, i32, bool)>| (t, v);
    let a_before = snapshot(
        get(&mut tenants, "a").await,
        versions(&mut tenants, "a").await,
    );
    let b_before = snapshot(
        get(&mut tenants, "b").await,
        versions(&mut tenants, "b").await,
    );
    let original = std::fs::read(&file).unwrap();
    // Altered by one byte: in the state, in a wrapped key, in the MAC, at the very end.
    let text = String::from_utf8(original.clone()).unwrap();
    let positions = [
        text.find("ACTIVE").unwrap() + 1,
        text.find("\"wrapped_key\":\"").unwrap() + 20,
        text.find("\"encryptions\":").unwrap() + 14,
        original.len() - 10,
        original.len() - 1,
        0,
    ];
    for (n, at) in positions.into_iter().enumerate() {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        let altered = site.path(&format!("altered-{n}.export"));
        std::fs::write(&altered, bytes).unwrap();
        let err = site.cli_refused(&["tenant", "import", &altered]);
        assert!(
            err.contains("does not verify") || err.contains("not a valid tenant export"),
            "byte {at}: {err}"
        );
        assert!(err.contains("nothing was changed"), "{err}");
    }
    // Upper-case MAC hex is the same MAC but not the same file: refused too.
    let upper = site.path("upper.export");
    let (body, mac) = text.trim_end().rsplit_once('\n').unwrap();
    std::fs::write(&upper, format!("{body}\n{}\n", mac.to_uppercase())).unwrap();
    let err = site.cli_refused(&["tenant", "import", &upper]);
    assert!(err.contains("does not verify"), "{err}");
    // Bound to another tenant: relabelled, or not the one the operator names.
    let relabelled = site.path("relabelled.export");
    std::fs::write(
        &relabelled,
        text.replace("\"tenant_id\":\"a\"", "\"tenant_id\":\"b\""),
    )
    .unwrap();
    let err = site.cli_refused(&["tenant", "import", &relabelled]);
    assert!(err.contains("does not verify for tenant b"), "{err}");
    let err = site.cli_refused(&["tenant", "import", &file, "--tenant", "b"]);
    assert!(err.contains("bound to tenant a, not b"), "{err}");
    // A destroyed tenant never comes back.
    create_tenant(&mut tenants, "c").await;
    let c_file = site.path("c.export");
    site.cli_ok(&["tenant", "export", "c", "--out", &c_file]);
    destroy_now(&mut tenants, "c").await;
    let err = site.cli_refused(&["tenant", "import", &c_file]);
    assert!(err.contains("tenant c is DESTROYED"), "{err}");
    assert_eq!(
        get(&mut tenants, "c").await.state,
        pb::TenantState::Destroyed as i32
    );
    assert_eq!(
        snapshot(
            get(&mut tenants, "a").await,
            versions(&mut tenants, "a").await
        ),
        a_before
    );
    assert_eq!(
        snapshot(
            get(&mut tenants, "b").await,
            versions(&mut tenants, "b").await
        ),
        b_before
    );
    // The refusals are audited.
    drop((keys, tenants));
    server.stop().await;
    let exported = site.cli_ok(&["audit", "export", "--tenant", "c"]);
    assert!(
        exported.contains("\"operation\":\"TenantImport\"")
            && exported.contains("failed_precondition"),
        "{exported}"
    );

    // Even where the store never knew it (a fresh data directory on the same keyring), the
    // shred ledger refuses the destroyed tenant: opening the directory re-applied the ledger,
    // which left the id as a tombstone there.
    let fresh = Site {
        _temp: tempfile::tempdir().unwrap(),
        root: site.root.clone(),
        data: site.root.join("fresh-data"),
        keyring: site.keyring.clone(),
    };
    DataDir::open(&fresh.options(), true).unwrap();
    let err = fresh.cli_refused(&["tenant", "import", &c_file]);
    assert!(
        err.contains("tenant c is DESTROYED in the key store: a crypto-shredded tenant never"),
        "{err}"
    );
    // ... while a live tenant's export imports into it as a new tenant.
    let out = fresh.cli_ok(&["tenant", "import", &file]);
    assert!(out.contains("\"result\":\"imported\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_rewraps_keys_exported_under_an_older_master_version() {
    let site = Site::new();
    let server = site.start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "a").await;
    let ct = encrypt(&mut keys, "a", "ctx", b"old", b"").await.ciphertext;
    let file = site.path("a.export");
    site.cli_ok(&["tenant", "export", "a", "--out", &file]);
    drop((keys, tenants));
    server.stop().await;
    site.cli_ok(&["rotate", "--master"]);
    site.cli_ok(&["tenant", "import", &file]);
    let dir = DataDir::open(&site.options(), false).unwrap();
    let v = dir
        .store
        .key_versions(&TenantId::parse("a").unwrap())
        .unwrap();
    assert_eq!(v[0].wrapped.as_ref().unwrap().master_version, 2);
    drop(dir);
    let server = site.start().await;
    let (mut keys, _, _) = server.clients().await;
    assert_eq!(
        decrypt(&mut keys, "a", "ctx", &ct, b"")
            .await
            .unwrap()
            .plaintext,
        b"old"
    );
    drop(keys);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_old_backup_never_resurrects_shredded_keys() {
    let site = Site::new();
    let server = site.start().await;
    let token = server.admin_token.clone();
    let (mut keys, mut tenants, _) = server.clients().await;
    for id in ["c", "d", "e"] {
        create_tenant(&mut tenants, id).await;
    }
    let e1 = encrypt(&mut keys, "e", "ctx", b"e survives", b"")
        .await
        .ciphertext;
    rotate_tenant(&mut tenants, "d").await.unwrap();
    let backup = site.path("backup");
    site.cli_ok(&["backup", "--out", &backup]);

    // After the backup: tenant c is crypto-shredded, and d's version 1 destroyed.
    destroy_now(&mut tenants, "c").await;
    rotate_tenant(&mut tenants, "d").await.unwrap();
    destroy_key_version(&mut tenants, "d", 1).await.unwrap();
    drop((keys, tenants));
    server.stop().await;
    let ledger = std::fs::read_to_string(site.ledger()).unwrap();
    assert!(
        ledger.contains("\"kind\":\"tenant\",\"tenant_id\":\"c\""),
        "{ledger}"
    );
    assert!(ledger.contains("\"kind\":\"version\",\"tenant_id\":\"d\",\"version\":1"));

    // The key bytes as the backup holds them (wrapped, and the raw key behind them).
    let c_keys = key_bytes(&Path::new(&backup).join("keys.db"), &site.keyring, "c");
    let d_keys = key_bytes(&Path::new(&backup).join("keys.db"), &site.keyring, "d");
    assert_eq!(c_keys.len(), 1);
    let d_v1: Vec<_> = d_keys.iter().filter(|(v, _, _)| *v == 1).collect();
    assert_eq!(d_v1.len(), 1);
    // backup verify reports the backup fine: it is the restore that shreds.
    site.cli_ok(&["backup", "verify", &backup]);

    // Restore the old backup over the live data directory.
    let out = site.cli_ok(&["restore", "--from", &backup, "--force", "--json"]);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["shredded_again"], 2, "{summary}");
    for (_, wrapped, _) in c_keys.iter().chain(d_v1.iter().copied()) {
        // Positive control: the backup does hold them.
        assert!(!files_containing(Path::new(&backup), wrapped).is_empty());
    }
    for (_, wrapped, raw) in c_keys.iter().chain(d_v1.iter().copied()) {
        assert_eq!(files_containing(&site.data, wrapped), Vec::<PathBuf>::new());
        assert_eq!(files_containing(&site.data, raw), Vec::<PathBuf>::new());
    }
    let out = site.cli_ok(&["audit", "verify"]);
    assert!(out.starts_with("OK: "), "{out}");
    let exported = site.cli_ok(&["audit", "export"]);
    assert!(exported.contains("\"operation\":\"ShredLedgerReapply\""));

    std::fs::write(site.data.join("admin.token"), format!("{token}\n")).unwrap();
    let server = site.start().await;
    let (mut keys, mut tenants, _) = server.clients().await;
    assert_eq!(
        get(&mut tenants, "c").await.state,
        pb::TenantState::Destroyed as i32
    );
    let err = encrypt_err(&mut keys, "c").await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    // d's version 1 was the primary in the backup: destroyed again, and d got a new primary.
    let d = versions(&mut tenants, "d").await;
    assert_eq!(
        d[0],
        (1, pb::KeyVersionState::Destroyed as i32, false),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|(v, s, p)| *v > 1 && *p && *s == pb::KeyVersionState::Enabled as i32)
    );
    encrypt(&mut keys, "d", "ctx", b"d still works", b"").await;
    // Other tenants are as the backup had them.
    assert_eq!(
        decrypt(&mut keys, "e", "ctx", &e1, b"")
            .await
            .unwrap()
            .plaintext,
        b"e survives"
    );
    drop((keys, tenants));
    server.stop().await;
}

async fn encrypt_err(keys: &mut Keys, tenant: &str) -> tonic::Status {
    keys.encrypt(encrypt_request(tenant, "ctx", b"x", b""))
        .await
        .status_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_start_shreds_again_a_backup_copied_in_by_hand() {
    let site = Site::new();
    let server = site.start().await;
    let token = server.admin_token.clone();
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "c").await;
    let backup = site.path("backup");
    site.cli_ok(&["backup", "--out", &backup]);
    destroy_now(&mut tenants, "c").await;
    drop(tenants);
    server.stop().await;
    // Someone bypasses `restore` and copies the files in.
    std::fs::remove_dir_all(&site.data).unwrap();
    std::fs::create_dir(&site.data).unwrap();
    for file in ["keys.db", "audit.db"] {
        std::fs::copy(Path::new(&backup).join(file), site.data.join(file)).unwrap();
    }
    std::fs::write(site.data.join("admin.token"), format!("{token}\n")).unwrap();
    site.assert_state_after_start("c", pb::TenantState::Destroyed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_truncated_or_missing_ledger_stops_the_start() {
    let site = Site::new();
    let server = site.start().await;
    let (_, mut tenants, _) = server.clients().await;
    for id in ["c", "d"] {
        create_tenant(&mut tenants, id).await;
        destroy_now(&mut tenants, id).await;
    }
    drop(tenants);
    server.stop().await;
    let ledger = site.ledger();
    let original = std::fs::read_to_string(&ledger).unwrap();
    assert_eq!(original.lines().count(), 3);
    let open = || {
        DataDir::open(&site.options(), false)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(open(), None);

    // The last entry removed: keys.db has seen 3.
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(&ledger, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let err = open().unwrap();
    assert!(err.contains("truncated"), "{err}");
    // A middle entry removed.
    std::fs::write(&ledger, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    let err = open().unwrap();
    assert!(err.contains("does not verify at entry 1"), "{err}");
    // An entry edited (d → e), with its fields still well formed.
    std::fs::write(
        &ledger,
        original.replace("\"tenant_id\":\"d\"", "\"tenant_id\":\"e\""),
    )
    .unwrap();
    let err = open().unwrap();
    assert!(err.contains("MAC is wrong"), "{err}");
    // The whole file removed.
    std::fs::remove_file(&ledger).unwrap();
    let err = open().unwrap();
    assert!(err.contains("missing"), "{err}");
    // The server refuses to start likewise (the CLI shows the message).
    let (code, _, err) = site.cli(&["audit", "verify"]);
    assert_eq!(code, 1);
    assert!(err.contains("shred ledger"), "{err}");
    // Put back, all is well; a torn last line (a crash mid-append) is cut off.
    std::fs::write(&ledger, format!("{original}{{\"seq\":3,\"ti")).unwrap();
    assert_eq!(open(), None);
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), original);
}

#[test]
fn ledger_records_a_destruction_the_store_made_before_a_crash() {
    // The store destroys first, then the ledger records: a crash in between leaves the store
    // ahead, and the next open records it from the store.
    let site = Site::new();
    let options = site.options();
    let dir = DataDir::open(&options, true).unwrap();
    let id = TenantId::parse("c").unwrap();
    dir.keys.create_tenant(&id).unwrap();
    dir.store
        .set_tenant_state(
            &id,
            TenantTransition::ScheduleDeletion { deletion_time: 0 },
            0,
        )
        .unwrap();
    // Bypasses the manager: no ledger write.
    dir.store
        .set_tenant_state(&id, TenantTransition::Destroy, 1)
        .unwrap();
    drop(dir);
    assert!(
        !std::fs::read_to_string(site.ledger())
            .unwrap()
            .contains("\"c\"")
    );
    let dir = DataDir::open(&options, false).unwrap();
    assert_eq!(dir.shred.recorded_from_store.len(), 1);
    assert!(
        std::fs::read_to_string(site.ledger())
            .unwrap()
            .contains("\"tenant_id\":\"c\"")
    );
    let v = dir.store.key_versions(&id).unwrap();
    assert_eq!(v[0].state, KeyVersionState::Destroyed);
}

/// Measures restore time for many tenants (docs/OPERATIONS.md): bulk-loads N tenants, backs
/// up, destroys some, wipes the data directory, restores (verifying every key and shredding
/// the destroyed ones again). Ignored by default:
/// `TENANT_KMS_RESTORE_TENANTS=1000000 [TENANT_KMS_RESTORE_AUDIT_RECORDS=1000000] cargo test
/// --release --test integration backup:: -- --ignored --nocapture restore_time`.
#[test]
#[ignore]
fn restore_time_for_many_tenants() {
    let count: u64 = std::env::var("TENANT_KMS_RESTORE_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let site = Site::new();
    let options = site.options();
    let started = std::time::Instant::now();
    let dir = DataDir::open(&options, true).unwrap();
    // An audit log of that size too, if asked: restore verifies the whole chain.
    let audit_records: u64 = std::env::var("TENANT_KMS_RESTORE_AUDIT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut conn = tenant_kms::audit::sqlite::open(
        &site.data.join("audit.db"),
        true,
        tenant_kms::audit::sqlite::DEFAULT_BUSY_TIMEOUT,
    )
    .unwrap();
    let mut written = 0;
    while written < audit_records {
        let batch: Vec<_> = (written..audit_records.min(written + 10_000))
            .map(|i| tenant_kms::audit::AuditRecord {
                time_micros: i as i64,
                request_id: format!("{i:016x}"),
                caller: "token:0123456789abcdef".into(),
                peer: "127.0.0.1:50000".into(),
                tenant_id: format!("tenant-{:08}", i % count.max(1)),
                operation: "Encrypt".into(),
                contexts: vec!["crm.contacts.email".into()],
                key_versions: vec![1],
                item_count: 1,
                outcome: tenant_kms::audit::Outcome::Ok,
                aad_fingerprint: String::new(),
                detail: String::new(),
                trace_parent: String::new(),
            })
            .collect();
        written += batch.len() as u64;
        tenant_kms::audit::sqlite::append(&mut conn, &dir.chain_keys, &batch).unwrap();
    }
    drop(conn);
    drop(dir);
    // Bulk load in one transaction (one fsync), with real wrapped keys under master v1.
    let ring = MasterKeyring::load(&options.master_keys, false).unwrap();
    let wrapping =
        envelope::master_wrapping_key(ring.get(1).unwrap(), labels::TENANT_KEY_WRAP, 1).unwrap();
    let mut conn = rusqlite::Connection::open(site.data.join("keys.db")).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut tenant = tx
            .prepare(
                "INSERT INTO tenants (tenant_id, state, primary_version, created_at, \
                 rotation_period_seconds, max_encryptions) VALUES (?1, 1, 1, 0, 0, 1073741824)",
            )
            .unwrap();
        let mut version = tx
            .prepare(
                "INSERT INTO key_versions (tenant_id, version, state, created_at) \
                 VALUES (?1, 1, 1, 0)",
            )
            .unwrap();
        let mut wrapped = tx
            .prepare(
                "INSERT INTO wrapped_keys (tenant_id, version, master_version, wrapped_key) \
                 VALUES (?1, 1, 1, ?2)",
            )
            .unwrap();
        // Rows written behind the store's back carry no row MAC: mark the upgrade pending, so
        // the next open MACs them once, as it does for a store from before row MACs.
        tx.execute("INSERT OR IGNORE INTO row_mac_upgrade (id) VALUES (1)", [])
            .unwrap();
        for i in 0..count {
            let id = format!("tenant-{i:08}");
            let key = tenant_kms::crypto::secret::SecretKey::generate().unwrap();
            let bytes = envelope::wrap_tenant_key(&wrapping, 1, &id, 1, &key).unwrap();
            tenant.execute([&id]).unwrap();
            version.execute([&id]).unwrap();
            wrapped.execute(rusqlite::params![id, bytes]).unwrap();
        }
    }
    tx.commit().unwrap();
    drop(conn);
    eprintln!(
        "loaded {count} tenants in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let timed = |what: &str, args: &[&str]| {
        let started = std::time::Instant::now();
        let out = site.cli_ok(args);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("{what}: {seconds:.2}s  {}", out.trim());
        seconds
    };
    let backup = site.path("backup");
    timed("backup", &["backup", "--out", &backup]);
    let size = std::fs::metadata(Path::new(&backup).join("keys.db"))
        .unwrap()
        .len();
    eprintln!("backup keys.db: {:.1} MiB", size as f64 / (1 << 20) as f64);
    timed("backup verify", &["backup", "verify", &backup]);
    // After the backup, some tenants are crypto-shredded: the restore must shred them again.
    let destroyed: u64 = std::env::var("TENANT_KMS_RESTORE_DESTROYED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .min(count);
    let started = std::time::Instant::now();
    let dir = DataDir::open(&options, false).unwrap();
    for i in 0..destroyed {
        let id = TenantId::parse(&format!("tenant-{:08}", i * (count / destroyed.max(1)))).unwrap();
        dir.keys
            .transition(&id, TenantTransition::ScheduleDeletion { deletion_time: 0 })
            .unwrap();
        dir.keys.destroy_tenant(&id).unwrap();
    }
    drop(dir);
    eprintln!(
        "destroyed {destroyed} tenants after the backup in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&site.data).unwrap();
    let restore = timed(
        "restore (into a wiped data dir)",
        &["restore", "--from", &backup],
    );
    let dir = DataDir::open(&site.options(), false).unwrap();
    let store = &dir.store;
    let shredded = store
        .destroyed_items()
        .unwrap()
        .into_iter()
        .filter(|i| i.version.is_none())
        .count() as u64;
    assert_eq!(shredded, destroyed);
    drop(dir);
    timed("open after restore (audit verify)", &["audit", "verify"]);
    eprintln!(
        "RESULT tenants={count} restore_seconds={restore:.2} per_million={:.1}",
        restore * 1e6 / count as f64
    );
}
