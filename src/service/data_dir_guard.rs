//! Guards of a data directory against operator mistakes (issue 13): the lock a server holds
//! for its lifetime, the refusal of a directory others may write, and the refusal to take a
//! directory that lost its `keys.db` for a first start.
//!
//! # The serve lock
//!
//! `serve` holds an exclusive advisory lock (`flock(2)`, through `std::fs::File::try_lock`)
//! on `<data-dir>/serve.lock` from before it opens anything until the process exits, and
//! writes its pid into the file. Commands that *replace the directory's files* (`restore`)
//! take the same lock for their whole run, so they refuse while a server serves the directory
//! (a server would keep writing into the files moved aside, and acknowledged writes would be
//! lost), and a server cannot start in the middle of a restore. A second `serve` on the same
//! directory is refused the same way. Both refusals name the holder's pid.
//!
//! Commands that change the directory only through SQLite transactions (`rotate`, `tenant
//! import`, `token`, `audit prune`, `backup`) do not take the lock: the server notices their
//! committed changes (`PRAGMA data_version`) and sharing the directory with it is by design.
//!
//! The kernel drops the lock when the holder exits, however it exits (kill -9 included), so a
//! stale `serve.lock` file never blocks anything; its pid text is only a hint for the message.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file inside a data directory.
pub const SERVE_LOCK_FILE: &str = "serve.lock";

/// An exclusive lock on a data directory, held until dropped (or the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    /// Kept open: closing the file releases the lock.
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock of `data_dir` for `purpose` (a command name, for the refusal message of
    /// whoever comes next), or fails with FAILED_PRECONDITION naming the process that holds it.
    /// The directory must exist.
    pub fn acquire(data_dir: &Path, purpose: &str) -> Result<Self> {
        let path = data_dir.join(SERVE_LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                // The holder wrote "pid purpose" after taking the lock; the text is read only
                // for the message (it may be empty if the holder has not written it yet).
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim();
                let holder = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("process {holder}")
                };
                return Err(Error::FailedPrecondition(format!(
                    "the data directory {} is in use by {holder} (it holds {}): stop that \
                     process first",
                    data_dir.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::Internal(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| file.write_all(format!("{pid} ({purpose})\n").as_bytes()))
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Refuses a data directory that group or others may write (e.g. mode 0777: anyone on the
/// machine could swap `keys.db` or `audit.db`), and warns when they may read or list it. A
/// missing directory passes (it is created 0700).
pub fn check_dir_mode(data_dir: &Path) -> Result<()> {
    let meta = match std::fs::metadata(data_dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::FailedPrecondition(format!(
                "cannot read {}: {e}",
                data_dir.display()
            )));
        }
    };
    if !meta.is_dir() {
        return Err(Error::FailedPrecondition(format!(
            "{} is not a directory",
            data_dir.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(Error::FailedPrecondition(format!(
            "the data directory {} has mode {mode:o}: group or others may replace or delete \
             its files (keys.db, audit.db); chmod 700 it",
            data_dir.display()
        )));
    }
    if mode & 0o077 != 0 {
        tracing::warn!(
            data_dir = %data_dir.display(),
            mode = format!("{mode:o}"),
            "the data directory is readable by group or others (its files are 0600); chmod 700 \
             it"
        );
    }
    Ok(())
}

/// Before a first start (no `keys.db`): refuses when the directory shows an earlier life,
/// so that a lost `keys.db` is never replaced by an empty one (which would overwrite
/// `admin.token` and append to the old audit log under a new audit key). `signs` are the
/// files whose presence means the directory served before; the message names the ones found
/// and how to recover.
pub fn refuse_lost_key_store(data_dir: &Path, signs: &[PathBuf]) -> Result<()> {
    let found: Vec<String> = signs
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "{} has no keys.db, but it has served before ({} exist): keys.db is missing, and \
         starting afresh would lose every tenant key and break the audit chain. Restore it \
         from a backup (`tenant-kms restore --from BACKUP --force`, see docs/OPERATIONS.md, \
         \"A data file is missing\"); to really start a new service, use a new, empty data \
         directory",
        data_dir.display(),
        found.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let temp = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(temp.path(), "serve").unwrap();
        let err = DataDirLock::acquire(temp.path(), "restore").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("process {} (serve)", std::process::id())),
            "{text}"
        );
        assert!(matches!(err, Error::FailedPrecondition(_)));
        drop(first);
        let again = DataDirLock::acquire(temp.path(), "restore").unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(text, format!("{} (restore)\n", std::process::id()));
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        assert!(check_dir_mode(&dir).is_ok(), "missing: created later");
        std::fs::create_dir(&dir).unwrap();
        for (mode, ok) in [(0o700, true), (0o750, true), (0o770, false), (0o777, false)] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(check_dir_mode(&dir).is_ok(), ok, "{mode:o}");
        }
    }

    #[test]
    fn signs_of_an_earlier_life_refuse_a_first_start() {
        let temp = tempfile::tempdir().unwrap();
        let sign = temp.path().join("audit.db");
        assert!(refuse_lost_key_store(temp.path(), std::slice::from_ref(&sign)).is_ok());
        std::fs::write(&sign, b"").unwrap();
        let text = refuse_lost_key_store(temp.path(), &[sign])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("keys.db is missing") && text.contains("audit.db"),
            "{text}"
        );
    }
}
