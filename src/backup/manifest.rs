//! The backup manifest: what a full backup holds (file names, sizes and SHA-256 digests), the
//! master-key check values its keys need, the audit chain head it ends at, and its MAC.
//!
//! On disk: `manifest.json` (pretty JSON, exactly the bytes MAC'd) and `manifest.mac` (the
//! lower-case hex HMAC-SHA256 of `lp(label) ‖ manifest.json` under a key derived from master
//! version `mac_master_version`, label [`labels::BACKUP_MANIFEST`]; see [`super::mac`]). Any
//! byte changed in either file fails verification.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::mac::MacKey;
use crate::crypto::envelope;
use crate::crypto::labels;
use crate::error::{Error, Result};
use crate::keys::MasterKeyring;
use crate::store::{MasterVersionRecord, StoreCounts};

/// The manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The file holding the manifest's MAC.
pub const MANIFEST_MAC_FILE: &str = "manifest.mac";
/// The format name and version written into every manifest.
pub const FORMAT: &str = "tenant-kms-backup/1";

/// A master-key version's check value (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterCheck {
    /// Version number.
    pub version: u32,
    /// Hex `envelope::key_check_value`.
    pub check_value: String,
    /// True once no key is wrapped under it (the keyring may have dropped it).
    pub retired: bool,
}

impl MasterCheck {
    /// From the store's record.
    pub fn from_record(record: &MasterVersionRecord) -> Self {
        Self {
            version: record.version,
            check_value: hex::encode(&record.check_value),
            retired: record.retired_at.is_some(),
        }
    }
}

/// Refuses check values that do not match the keyring at hand: a version the keyring holds
/// with another key, or a version still in use that the keyring lacks.
pub fn check_keyring(checks: &[MasterCheck], ring: &MasterKeyring, what: &str) -> Result<()> {
    for check in checks {
        match ring.get(check.version) {
            Some(key) => {
                let expected = envelope::key_check_value(key, check.version)
                    .map_err(|_| Error::internal("key check derivation failed"))?;
                let stored = hex::decode(&check.check_value).unwrap_or_default();
                if !envelope::constant_time_eq(&expected, &stored) {
                    return Err(Error::FailedPrecondition(format!(
                        "{what} does not match the master keyring at hand: master key version \
                         {} has another key check value (wrong keyring?); refused",
                        check.version
                    )));
                }
            }
            None if check.retired => {}
            None => {
                return Err(Error::FailedPrecondition(format!(
                    "{what} needs master key version {}, which the keyring at hand does not \
                     hold (wrong keyring, or the version was removed after a master rotation); \
                     refused",
                    check.version
                )));
            }
        }
    }
    Ok(())
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// File name inside the backup directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 (FIPS 180-4) of the contents.
    pub sha256: String,
}

/// The audit chain head a backup's `audit.db` ends at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// Sequence number of the last record.
    pub seq: u64,
    /// Hex MAC of the last record.
    pub mac: String,
}

/// The shred ledger's head when the backup was taken (information for operators).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerInfo {
    /// Entries in the ledger.
    pub entries: u64,
    /// Hex MAC of the last entry.
    pub head_mac: String,
}

/// A full backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Random id, named in the audit records of the backup and of a restore.
    pub backup_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The tenant-kms version that wrote it.
    pub tool_version: String,
    /// The master version whose derived key MACs the manifest.
    pub mac_master_version: u32,
    /// Check values of every master version the backed-up `keys.db` knows.
    pub master_keys: Vec<MasterCheck>,
    /// Every file of the backup but the manifest itself.
    pub files: Vec<FileDigest>,
    /// The head of the backed-up audit chain.
    pub audit_head: AuditHead,
    /// Tenants and wrapped keys in the backed-up `keys.db`.
    pub counts: StoreCounts,
    /// The shred ledger head at backup time.
    pub shred_ledger: Option<LedgerInfo>,
}

impl Manifest {
    /// Writes `manifest.json` and `manifest.mac` into `dir` (mode 0600, synced).
    pub fn write(&self, dir: &Path, ring: &MasterKeyring) -> Result<()> {
        let mut body = serde_json::to_vec_pretty(self).map_err(Error::internal)?;
        body.push(b'\n');
        let key =
            MacKey::from_keyring(ring, labels::BACKUP_MANIFEST, self.mac_master_version, b"")?;
        let mac = format!(
            "{}\n",
            hex::encode(key.sign(labels::BACKUP_MANIFEST, &body))
        );
        crate::fsutil::write_private_file(&dir.join(MANIFEST_FILE), &body)?;
        crate::fsutil::write_private_file(&dir.join(MANIFEST_MAC_FILE), mac.as_bytes())
    }

    /// Reads the manifest of the backup in `dir` and checks its MAC with the keyring at hand.
    pub fn read_verified(dir: &Path, ring: &MasterKeyring) -> Result<Self> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "{} is not a tenant-kms backup: cannot read {name}: {e}",
                    dir.display()
                ))
            })
        };
        let body = read(MANIFEST_FILE)?;
        let mac = read(MANIFEST_MAC_FILE)?;
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|_| {
            Error::FailedPrecondition(format!(
                "the manifest of {} is not valid (altered or truncated); refused",
                dir.display()
            ))
        })?;
        if manifest.format != FORMAT {
            return Err(Error::FailedPrecondition(format!(
                "the backup format {} is not {FORMAT}; refused",
                manifest.format
            )));
        }
        let key = MacKey::from_keyring(
            ring,
            labels::BACKUP_MANIFEST,
            manifest.mac_master_version,
            b"",
        )?;
        let mac = std::str::from_utf8(&mac)
            .ok()
            .and_then(|m| m.strip_suffix('\n'))
            .unwrap_or("");
        if !key.verify_hex(labels::BACKUP_MANIFEST, &body, mac) {
            return Err(Error::FailedPrecondition(format!(
                "the manifest MAC of {} does not verify: the manifest was altered, or the \
                 backup was made with another master key; refused",
                dir.display()
            )));
        }
        Ok(manifest)
    }

    /// The digest entry of a file, if listed.
    pub fn file(&self, name: &str) -> Option<&FileDigest> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Size and hex SHA-256 of a file, read in 1 MiB blocks.
pub fn digest_file(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((total, hex::encode(ctx.finish().as_ref())))
}

/// Copies `from` to the new file `to` (mode 0600, synced) and returns the copy's size and
/// hex SHA-256, computed from the bytes written.
pub fn copy_with_digest(from: &Path, to: &Path) -> Result<(u64, String)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut input = std::fs::File::open(from)
        .map_err(|e| Error::FailedPrecondition(format!("cannot read {}: {e}", from.display())))?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", to.display())))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| Error::Internal(format!("cannot read {}: {e}", from.display())))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ctx.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", to.display())))?;
    }
    output
        .sync_all()
        .map_err(|e| Error::Internal(format!("cannot sync {}: {e}", to.display())))?;
    Ok((total, hex::encode(ctx.finish().as_ref())))
}
