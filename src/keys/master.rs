//! Master-key providers. A keyring holds master-key versions 1, 2, …; the highest is primary
//! (it wraps new tenant keys). Two providers:
//!
//! - a keyring **file** (the default, `<data-dir>/master.keyring`): created with mode 0600 on
//!   first start, refused if group or others can access it; `rotate --master` appends versions;
//! - an **environment variable** holding `1:<hex>,2:<hex>` for deployments that inject secrets.
//!
//! A keyring file may be **sealed** under a root of trust (a PKCS#11 token or a passphrase,
//! [`super::seal`]): then it is a [`MasterKeySource::Sealed`], opened into zeroizing memory
//! and re-sealed in memory when `rotate --master` adds a version; its plaintext is never
//! written to a file.
//!
//! File format: one `VERSION HEX` line per version (64 hex digits), `#` comments (sealed:
//! the same text is the encrypted body, docs/FORMAT.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto::secret::{KEY_LEN, SecretKey};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::keys::seal::{self, RootKey};

/// Where the master keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A plain keyring file (created on first start when allowed).
    File(PathBuf),
    /// The name of an environment variable holding `1:<hex>,2:<hex>`.
    Env(String),
    /// A keyring file sealed under a root of trust (created sealed on first start when
    /// allowed).
    Sealed(SealedKeyring),
}

impl MasterKeySource {
    /// The keyring file, sealed or not (`None` for keys from the environment).
    pub fn keyring_file(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::Sealed(sealed) => Some(&sealed.path),
            Self::Env(_) => None,
        }
    }
}

/// A sealed keyring file and the root that opens it. Clones share the root, so a file key
/// opened once serves every later load in the process.
#[derive(Debug, Clone)]
pub struct SealedKeyring {
    /// The sealed keyring file.
    pub path: PathBuf,
    /// The root of trust it is sealed under.
    pub root: Arc<RootKey>,
}

impl PartialEq for SealedKeyring {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.root.config() == other.root.config()
    }
}

impl Eq for SealedKeyring {}

impl SealedKeyring {
    /// Reads the sealed file (refused when others can read it, or when it is not sealed).
    fn read(&self) -> Result<Zeroizing<String>> {
        fsutil::check_private(&self.path)?;
        let text =
            Zeroizing::new(std::fs::read_to_string(&self.path).map_err(|e| {
                Error::Internal(format!("cannot read {}: {e}", self.path.display()))
            })?);
        if !seal::header::is_sealed(text.as_bytes()) {
            return Err(Error::FailedPrecondition(format!(
                "master keyring {} is not sealed, but --seal {} was given: seal it first \
                 (tenant-kms keyring seal) or start without --seal",
                self.path.display(),
                self.root.config().method()
            )));
        }
        Ok(text)
    }

    /// Appends a new random version: opened, extended and re-sealed (same file key) in
    /// memory, then written atomically. Returns the new version.
    pub fn add_version(&self) -> Result<u32> {
        let previous = self.read()?;
        let mut keyring = MasterKeyring::parse_text(&self.root.unseal(&previous)?)?;
        let version = keyring.primary_version() + 1;
        keyring.keys.insert(version, fresh_key()?);
        let sealed = self
            .root
            .reseal(&previous, keyring.to_file_text().as_bytes())?;
        replace_private_file(&self.path, sealed.as_bytes())?;
        Ok(version)
    }
}

/// A new random master-key version.
fn fresh_key() -> Result<SecretKey> {
    SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))
}

/// Replaces `path` atomically with `contents`: a temporary 0600 file beside it, synced, then
/// renamed over it, and the directory synced.
pub fn replace_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("keyring.new");
    let _ = std::fs::remove_file(&tmp);
    fsutil::write_private_file(&tmp, contents)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::Internal(format!("cannot replace {}: {e}", path.display())))?;
    if let Some(dir) = path.parent() {
        // Make the rename durable.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// The master-key versions in memory. Not `Debug`, not `Clone`; keys zeroize on drop.
pub struct MasterKeyring {
    keys: BTreeMap<u32, SecretKey>,
}

const FILE_HEADER: &str = "# tenant-kms master keyring v1: one 'VERSION HEX-KEY' line per version.\n\
# Keep this file secret (mode 0600) and backed up apart from the data directory:\n\
# without it no key in the data directory can be read.\n";

impl MasterKeyring {
    /// Loads the keyring; with `create_if_missing`, a missing keyring file is created with a
    /// fresh version 1.
    pub fn load(source: &MasterKeySource, create_if_missing: bool) -> Result<Self> {
        match source {
            MasterKeySource::File(path) => {
                if !path.exists() {
                    if !create_if_missing {
                        return Err(Error::FailedPrecondition(format!(
                            "master keyring {} does not exist",
                            path.display()
                        )));
                    }
                    let keyring = Self::single(fresh_key()?);
                    fsutil::write_private_file(path, keyring.to_file_text().as_bytes())?;
                    tracing::info!(path = %path.display(), "created master keyring (version 1)");
                    return Ok(keyring);
                }
                fsutil::check_private(path)?;
                let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
                    Error::Internal(format!("cannot read {}: {e}", path.display()))
                })?);
                if seal::header::is_sealed(&text) {
                    let method = std::str::from_utf8(&text)
                        .ok()
                        .and_then(|t| seal::header::parse(t).ok())
                        .map_or("pkcs11|passphrase", |(h, _, _)| h.root.method());
                    return Err(Error::FailedPrecondition(format!(
                        "master keyring {} is sealed: start with --seal {method} and its \
                         options (docs/OPERATIONS.md, \"Root of trust\")",
                        path.display()
                    )));
                }
                Self::parse_text(&text)
            }
            MasterKeySource::Sealed(sealed) => {
                if !sealed.path.exists() {
                    if !create_if_missing {
                        return Err(Error::FailedPrecondition(format!(
                            "master keyring {} does not exist",
                            sealed.path.display()
                        )));
                    }
                    let keyring = Self::single(fresh_key()?);
                    let text = sealed.root.seal_new(keyring.to_file_text().as_bytes())?;
                    fsutil::write_private_file(&sealed.path, text.as_bytes())?;
                    tracing::info!(
                        path = %sealed.path.display(),
                        method = sealed.root.config().method(),
                        "created sealed master keyring (version 1)"
                    );
                    return Ok(keyring);
                }
                let file = sealed.read()?;
                Self::parse_text(&sealed.root.unseal(&file)?)
            }
            MasterKeySource::Env(var) => {
                let text = Zeroizing::new(std::env::var(var).map_err(|_| {
                    Error::FailedPrecondition(format!(
                        "environment variable {var} (master keys) is not set"
                    ))
                })?);
                Self::parse(text.split(',').map(|item| item.split_once(':')))
            }
        }
    }

    /// Parses keyring file text (plain, or the opened body of a sealed file).
    pub(crate) fn parse_text(text: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(text).map_err(|_| {
            Error::FailedPrecondition("master keyring: the file is not UTF-8 text".into())
        })?;
        Self::parse(
            text.lines()
                .map(|line| line.split_once(char::is_whitespace)),
        )
    }

    fn single(key: SecretKey) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(1, key);
        Self { keys }
    }

    fn parse<'a>(entries: impl Iterator<Item = Option<(&'a str, &'a str)>>) -> Result<Self> {
        let mut keys = BTreeMap::new();
        let bad = |why: &str| Error::FailedPrecondition(format!("master keyring: {why}"));
        for entry in entries {
            let Some((version, hex_key)) = entry else {
                continue;
            };
            let version = version.trim();
            if version.is_empty() || version.starts_with('#') {
                continue;
            }
            let version: u32 = version
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| bad("a version is not a positive number"))?;
            let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
            hex::decode_to_slice(hex_key.trim(), bytes.as_mut())
                .map_err(|_| bad("a key is not 64 hex digits"))?;
            if keys
                .insert(version, SecretKey::from_zeroizing(bytes))
                .is_some()
            {
                return Err(bad("a version appears twice"));
            }
        }
        if keys.is_empty() {
            return Err(bad("no master key versions"));
        }
        Ok(Self { keys })
    }

    /// The keyring as plain file text (for sealing, or an audited `keyring unseal`).
    pub(crate) fn to_file_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::from(FILE_HEADER));
        for (version, key) in &self.keys {
            text.push_str(&format!("{version} "));
            text.push_str(&Zeroizing::new(hex::encode(key.expose_secret())));
            text.push('\n');
        }
        text
    }

    /// Appends a new random version to a keyring file (written to a temporary 0600 file,
    /// synced, then renamed over the old one) and returns its number.
    pub fn add_version_to_file(path: &Path) -> Result<u32> {
        let mut keyring = Self::load(&MasterKeySource::File(path.to_owned()), false)?;
        let version = keyring.primary_version() + 1;
        keyring.keys.insert(version, fresh_key()?);
        replace_private_file(path, keyring.to_file_text().as_bytes())?;
        Ok(version)
    }

    /// The highest version: the one that wraps new keys.
    pub fn primary_version(&self) -> u32 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }

    /// The key of a version.
    pub fn get(&self, version: u32) -> Option<&SecretKey> {
        self.keys.get(&version)
    }

    /// The versions held, ascending.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn file_is_created_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.keyring");
        let source = MasterKeySource::File(path.clone());
        assert!(MasterKeyring::load(&source, false).is_err());
        let created = MasterKeyring::load(&source, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = MasterKeyring::load(&source, false).unwrap();
        assert_eq!(
            created.get(1).unwrap().expose_secret(),
            loaded.get(1).unwrap().expose_secret()
        );
        assert_eq!(MasterKeyring::add_version_to_file(&path).unwrap(), 2);
        let loaded = MasterKeyring::load(&source, false).unwrap();
        assert_eq!(loaded.primary_version(), 2);
        assert_eq!(
            created.get(1).unwrap().expose_secret(),
            loaded.get(1).unwrap().expose_secret()
        );
    }

    #[test]
    fn readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.keyring");
        let source = MasterKeySource::File(path.clone());
        MasterKeyring::load(&source, true).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKeyring::load(&source, false).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn parses_env_format() {
        let k1 = "11".repeat(32);
        let k2 = "22".repeat(32);
        let text = format!("1:{k1},2:{k2}");
        let ring = MasterKeyring::parse(text.split(',').map(|i| i.split_once(':'))).unwrap();
        assert_eq!(ring.primary_version(), 2);
        assert_eq!(ring.get(1).unwrap().expose_secret(), &[0x11; 32]);
        let bad = "1:abc";
        assert!(MasterKeyring::parse(bad.split(',').map(|i| i.split_once(':'))).is_err());
    }
}
