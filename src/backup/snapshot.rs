//! Full backups: taking one while the server runs, checking one, and putting one in place.
//!
//! A backup directory holds `keys.db` and `audit.db` (each a consistent snapshot taken with
//! SQLite's online backup API, self-contained: no `-wal` beside it) and the MAC'd manifest
//! ([`super::manifest`]). It holds only wrapped keys: useless without the master keyring,
//! which is never part of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifest::{
    self, AuditHead, FileDigest, LedgerInfo, Manifest, MasterCheck, check_keyring,
};
use crate::audit::{AuditLog, ChainKeys, SqliteAuditLog};
use crate::domain::unix_now;
use crate::error::{Error, Result};
use crate::keys::MasterKeyring;
use crate::keys::wrapping::{self, TenantKeyWrapping, UnwrapFailure};
use crate::store::{BackupStore, KeyStore, LedgerHead, MasterKeyStore, SqliteKeyStore};

/// The key store file, in a backup and in a data directory.
pub const KEYS_DB: &str = "keys.db";
/// The audit log file, in a backup and in a data directory.
pub const AUDIT_DB: &str = "audit.db";
/// The data files a backup holds, in the order they are snapshotted: keys first, so the
/// audit copy (taken after) records at least every change the key copy holds.
pub const DATA_FILES: [&str; 2] = [KEYS_DB, AUDIT_DB];

/// Refuses an output directory that exists and is not empty; creates it (0700) otherwise.
fn prepare_out_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| {
            Error::FailedPrecondition(format!("cannot read {}: {e}", out.display()))
        })?;
        if entries.next().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "{} is not empty: a backup goes into a new or empty directory",
                out.display()
            )));
        }
        Ok(())
    } else {
        crate::fsutil::create_private_dir(out)
    }
}

fn random_id() -> Result<String> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| Error::internal("CSPRNG failed"))?;
    Ok(hex::encode(id))
}

/// Takes a full backup into `out` (new or empty): snapshots of the key store and of the audit
/// log `audit`, then the manifest, MAC'd under the keyring's primary version.
pub fn create(
    out: &Path,
    store: &dyn KeyStore,
    audit: &dyn AuditLog,
    ring: &MasterKeyring,
    ledger: Option<LedgerHead>,
) -> Result<Manifest> {
    prepare_out_dir(out)?;
    store.snapshot_to(&out.join(KEYS_DB))?;
    let head = audit.snapshot_to(&out.join(AUDIT_DB))?;
    let copy = SqliteKeyStore::open_read_only(&out.join(KEYS_DB))?;
    let master_keys: Vec<MasterCheck> = copy
        .master_versions()?
        .iter()
        .map(MasterCheck::from_record)
        .collect();
    check_keyring(&master_keys, ring, "the snapshot of keys.db")?;
    let counts = copy.counts()?;
    drop(copy);
    let mut files = Vec::new();
    for name in DATA_FILES {
        let (bytes, sha256) = manifest::digest_file(&out.join(name))?;
        files.push(FileDigest {
            name: name.to_owned(),
            bytes,
            sha256,
        });
    }
    let manifest = Manifest {
        format: manifest::FORMAT.to_owned(),
        backup_id: random_id()?,
        created_at: unix_now(),
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        mac_master_version: ring.primary_version(),
        master_keys,
        files,
        audit_head: AuditHead {
            seq: head.seq,
            mac: hex::encode(head.mac),
        },
        counts,
        shred_ledger: ledger.map(|h| LedgerInfo {
            entries: h.entries,
            head_mac: hex::encode(h.head_mac),
        }),
    };
    manifest.write(out, ring)?;
    crate::fsutil::sync_dir(out)?;
    Ok(manifest)
}

/// What a verification found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// The backup's id.
    pub backup_id: String,
    /// When it was taken (unix seconds).
    pub created_at: i64,
    /// Tenants in it.
    pub tenants: u64,
    /// Wrapped tenant keys that unwrapped with the keyring at hand (all of them).
    pub wrapped_keys_unwrapped: u64,
    /// Audit records whose chain verified.
    pub audit_records: u64,
    /// The audit chain head (as the manifest names it).
    pub audit_head_seq: u64,
}

/// Reads the manifest in `dir`, verifies its MAC and check values against `ring`, and
/// requires it to list exactly the data files, in order: the part of a backup's verification
/// that needs only the manifest.
fn read_checked_manifest(dir: &Path, ring: &MasterKeyring) -> Result<Manifest> {
    let manifest = Manifest::read_verified(dir, ring)?;
    check_keyring(&manifest.master_keys, ring, "the backup")?;
    let listed: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if listed != DATA_FILES {
        return Err(Error::FailedPrecondition(format!(
            "the manifest lists {listed:?}, not {DATA_FILES:?}; refused"
        )));
    }
    Ok(manifest)
}

/// Checks the manifest (MAC, check values) and that every file is listed with its size and
/// digest, nothing missing and nothing more.
pub fn verify_manifest_and_files(dir: &Path, ring: &MasterKeyring) -> Result<Manifest> {
    let manifest = read_checked_manifest(dir, ring)?;
    for file in &manifest.files {
        let (bytes, sha256) = manifest::digest_file(&dir.join(&file.name)).map_err(|_| {
            Error::FailedPrecondition(format!("{} is missing or unreadable", file.name))
        })?;
        if bytes != file.bytes || sha256 != file.sha256 {
            return Err(Error::FailedPrecondition(format!(
                "{} does not match its checksum in the manifest (corrupted or altered); refused",
                file.name
            )));
        }
    }
    Ok(manifest)
}

/// Checks that every wrapped tenant key of `store` unwraps with `ring` (the key-store half of
/// `backup verify`, for a backup's keys.db or a restored PostgreSQL database); returns how many
/// did. A key under a master version the keyring lacks, or one that does not open (a changed
/// row, another keyring), fails naming the tenant, the version and the master version.
pub fn check_wrapped_keys<S: BackupStore + ?Sized>(store: &S, ring: &MasterKeyring) -> Result<u64> {
    let wrapping = TenantKeyWrapping::new(ring)?;
    let mut failed: Option<String> = None;
    let unwrapped = store.for_each_wrapped_key(&mut |id, version, wrapped| {
        let m = wrapped.master_version;
        match wrapping.unwrap(id, version, wrapped) {
            Ok(_) => {}
            Err(UnwrapFailure::MasterVersionMissing(_)) => {
                return Err(Error::FailedPrecondition(format!(
                    "tenant {id} v{version} is wrapped under master version {m}, which the \
                     keyring at hand does not hold"
                )));
            }
            Err(UnwrapFailure::DoesNotOpen) => {
                if failed.is_none() {
                    failed = Some(format!("tenant {id} v{version} (master version {m})"));
                }
            }
        }
        Ok(())
    })?;
    if let Some(what) = failed {
        return Err(Error::FailedPrecondition(format!(
            "a wrapped key does not unwrap with the keyring at hand: {what}; refused"
        )));
    }
    Ok(unwrapped)
}

/// Checks the backup's contents, found in `files_dir` (the backup itself, or a restore's
/// staged copy already checked against the manifest): every wrapped tenant key unwraps with
/// the keyring at hand, the audit secret unwraps, the audit chain verifies and ends at the
/// manifest's head.
pub fn verify_contents(
    files_dir: &Path,
    manifest: &Manifest,
    ring: &MasterKeyring,
) -> Result<VerifyReport> {
    let store = SqliteKeyStore::open_read_only(&files_dir.join(KEYS_DB))?;
    let unwrapped = check_wrapped_keys(&store, ring)?;
    if unwrapped != manifest.counts.wrapped_keys {
        return Err(Error::FailedPrecondition(format!(
            "keys.db holds {unwrapped} wrapped keys, the manifest says {}; refused",
            manifest.counts.wrapped_keys
        )));
    }
    let audit_wrapped = store
        .audit_key()?
        .ok_or_else(|| Error::FailedPrecondition("the backup holds no audit key".into()))?;
    let audit_secret =
        wrapping::unwrap_audit_secret(ring, &audit_wrapped).map_err(|failure| match failure {
            UnwrapFailure::MasterVersionMissing(m) => Error::FailedPrecondition(format!(
                "the audit key is wrapped under master version {m}, which the keyring lacks"
            )),
            UnwrapFailure::DoesNotOpen => Error::FailedPrecondition(
                "the backup's audit key does not unwrap with the keyring at hand".into(),
            ),
        })?;
    let chain_keys = Arc::new(
        ChainKeys::derive(&audit_secret)
            .map_err(|_| Error::internal("audit key derivation failed"))?,
    );
    let tenants = store.counts()?.tenants;
    drop(store);
    let log: &dyn AuditLog =
        &SqliteAuditLog::open_read_only(&files_dir.join(AUDIT_DB), chain_keys)?;
    let report = log.verify()?;
    if !report.ok {
        return Err(Error::FailedPrecondition(format!(
            "the backup's audit chain does not verify: record {}: {}",
            report.first_bad_seq, report.reason
        )));
    }
    let head = log.head()?;
    if head.seq != manifest.audit_head.seq || hex::encode(head.mac) != manifest.audit_head.mac {
        return Err(Error::FailedPrecondition(
            "the backup's audit chain does not end at the head the manifest names; refused".into(),
        ));
    }
    Ok(VerifyReport {
        backup_id: manifest.backup_id.clone(),
        created_at: manifest.created_at,
        tenants,
        wrapped_keys_unwrapped: unwrapped,
        audit_records: report.records_checked,
        audit_head_seq: head.seq,
    })
}

/// `backup verify`: the manifest's MAC and check values, every file's checksum, and the
/// contents (see [`verify_contents`]), changing nothing.
pub fn verify(dir: &Path, ring: &MasterKeyring) -> Result<VerifyReport> {
    let manifest = verify_manifest_and_files(dir, ring)?;
    verify_contents(dir, &manifest, ring)
}

/// A staging directory, removed with what it still holds when dropped.
struct StagingDir(PathBuf);

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backup copied into a data directory's staging area and verified there, ready to be put
/// in place. Dropping it without [`Staged::install`] removes the staged copy.
pub struct Staged {
    dir: StagingDir,
    data_dir: PathBuf,
    /// The verified manifest.
    pub manifest: Manifest,
    /// What verification found.
    pub report: VerifyReport,
}

/// Copies the backup in `from` into a staging directory inside `data_dir` and verifies the
/// copy (checksums computed from the bytes written, then [`verify_contents`]), so what is
/// installed is exactly what was verified.
pub fn stage(from: &Path, data_dir: &Path, ring: &MasterKeyring) -> Result<Staged> {
    let manifest = read_checked_manifest(from, ring)?;
    let dir = StagingDir(data_dir.join(format!(".restore-staging-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    crate::fsutil::create_private_dir(&dir.0)?;
    for file in &manifest.files {
        let (bytes, sha256) =
            manifest::copy_with_digest(&from.join(&file.name), &dir.0.join(&file.name))?;
        if bytes != file.bytes || sha256 != file.sha256 {
            return Err(Error::FailedPrecondition(format!(
                "{} does not match its checksum in the manifest (corrupted or altered); refused",
                file.name
            )));
        }
    }
    let report = verify_contents(&dir.0, &manifest, ring)?;
    Ok(Staged {
        dir,
        data_dir: data_dir.to_owned(),
        manifest,
        report,
    })
}

impl Staged {
    /// Puts the staged files in place. Existing data files (and their `-wal`/`-shm`) are
    /// moved, not deleted, into `<data-dir>/replaced-<unix time>/`, whose path is returned:
    /// audit records and keys written after the backup stay available there.
    pub fn install(self) -> Result<Option<PathBuf>> {
        let mut replaced: Option<PathBuf> = None;
        for name in DATA_FILES {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let path = self.data_dir.join(format!("{name}{suffix}"));
                if !path.exists() {
                    continue;
                }
                let dir = match &replaced {
                    Some(dir) => dir.clone(),
                    None => {
                        let dir = unused_dir(&self.data_dir, &format!("replaced-{}", unix_now()));
                        crate::fsutil::create_private_dir(&dir)?;
                        replaced = Some(dir.clone());
                        dir
                    }
                };
                std::fs::rename(&path, dir.join(format!("{name}{suffix}"))).map_err(|e| {
                    Error::Internal(format!("cannot move {} aside: {e}", path.display()))
                })?;
            }
        }
        for name in DATA_FILES {
            std::fs::rename(self.dir.0.join(name), self.data_dir.join(name))
                .map_err(|e| Error::Internal(format!("cannot put {name} in place: {e}")))?;
        }
        crate::fsutil::sync_dir(&self.data_dir)?;
        if let Some(dir) = &replaced {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(replaced)
    }
}

/// `parent/name`, or `parent/name-2`, `-3`, … if taken.
fn unused_dir(parent: &Path, name: &str) -> PathBuf {
    let mut path = parent.join(name);
    let mut n = 2;
    while path.exists() {
        path = parent.join(format!("{name}-{n}"));
        n += 1;
    }
    path
}
