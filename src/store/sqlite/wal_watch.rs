//! Whether anything was committed to keys.db since the last full change check, answered
//! without the connection.
//!
//! Every commit, by any connection of any process, rewrites the WAL-index header at the start
//! of the `-shm` file (its change counter, last frame and salts; sqlite.org/walformat.html
//! §2.2.1). Both copies equal to the header read just before the last full check
//! (`PRAGMA data_version`) mean nothing was committed since, so that check's generation still
//! holds. The read is one `pread` of 96 bytes and the comparison needs only a short lock of
//! its own, never the connection's: a call that checks while another thread holds the
//! connection (another call's check, a nonce reservation, an fsync) is not sent to the
//! blocking pool for an answer it can read itself.
//!
//! The descriptor it reads through is never closed while the file exists (see
//! [`crate::sqlite_shm`]): closing any descriptor of a file drops every POSIX lock the process
//! holds on it, SQLite's among them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::sqlite_shm::{self, shm_file};

/// Both copies of the WAL-index header, as read at one moment.
pub(super) type WalIndexHeader = sqlite_shm::WalIndexHeaders;

/// The `-shm` file of one database and the generation its last full check published.
pub(super) struct WalWatch {
    path: PathBuf,
    /// Found or opened on first use (the file exists only once the connection is in WAL
    /// mode); the process's one descriptor of it ([`shm_file`]), which decides when it is
    /// closed.
    file: OnceLock<Arc<File>>,
    seen: Mutex<Seen>,
}

/// What the last full change check saw.
#[derive(Default)]
struct Seen {
    /// The header read just before that check; `None` before the first one.
    header: Option<WalIndexHeader>,
    /// The generation that check found (see `ChangeDetection::change_generation`).
    generation: u64,
}

impl WalWatch {
    /// Watches `<database>-shm`.
    pub(super) fn new(database: &Path) -> Self {
        let mut path = database.as_os_str().to_owned();
        path.push("-shm");
        Self {
            path: path.into(),
            file: OnceLock::new(),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Both copies of the WAL-index header if they agree (no commit is half-published);
    /// `None` if the file cannot be read, in which case the caller does a full check.
    pub(super) fn header(&self) -> Option<WalIndexHeader> {
        let file = match self.file.get() {
            Some(file) => file,
            None => {
                // Two threads may both get here; both get the process's one descriptor.
                let _ = self.file.set(shm_file(&self.path)?);
                self.file.get()?
            }
        };
        sqlite_shm::read_headers(file)
    }

    /// The last full check's generation if `header` (read after the caller began) is the one
    /// that check saw: nothing was committed since, by anyone.
    pub(super) fn unchanged_since(&self, header: Option<WalIndexHeader>) -> Option<u64> {
        let header = header?;
        let seen = self.lock();
        (seen.header == Some(header)).then_some(seen.generation)
    }

    /// The generation as of the last full check, whatever was committed since.
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Publishes a full check: `header` was read before its `PRAGMA data_version`, so a
    /// commit after that read shows as a different header next time.
    pub(super) fn publish(&self, header: Option<WalIndexHeader>, generation: u64) {
        let mut seen = self.lock();
        seen.header = header;
        seen.generation = generation;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Two plain values, written together: a panic cannot leave them half-updated.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::sqlite_shm::WAL_INDEX_HEADERS;

    #[test]
    fn a_header_is_unchanged_only_while_the_file_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keys.db");
        let watch = WalWatch::new(&db);
        assert_eq!(watch.header(), None, "no -shm file yet");
        assert_eq!(watch.unchanged_since(watch.header()), None);

        let mut bytes = [7u8; WAL_INDEX_HEADERS];
        std::fs::write(dir.path().join("keys.db-shm"), bytes).unwrap();
        let first = watch.header();
        assert!(first.is_some());
        assert_eq!(watch.unchanged_since(first), None, "nothing published yet");
        watch.publish(first, 3);
        assert_eq!(watch.unchanged_since(watch.header()), Some(3));

        // A commit rewrites both copies: the generation no longer holds.
        bytes = [8u8; WAL_INDEX_HEADERS];
        std::fs::write(dir.path().join("keys.db-shm"), bytes).unwrap();
        assert_eq!(watch.unchanged_since(watch.header()), None);
        assert_eq!(watch.generation(), 3);

        // A half-written header (copies differ) is no answer.
        bytes[0] = 9;
        std::fs::write(dir.path().join("keys.db-shm"), bytes).unwrap();
        assert_eq!(watch.header(), None);
    }

    /// Every watch of one `-shm` file reads through the process's one descriptor of it, so
    /// none of them closes a descriptor while another database connection holds locks on the
    /// file; a new file at the path (a new inode) gets a descriptor of its own.
    #[test]
    fn watches_of_one_file_share_the_process_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("keys.db");
        let shm = dir.path().join("keys.db-shm");
        std::fs::write(&shm, [1u8; WAL_INDEX_HEADERS]).unwrap();
        let (a, b) = (WalWatch::new(&db), WalWatch::new(&db));
        assert!(a.header().is_some() && b.header().is_some());
        let (fa, fb) = (a.file.get().unwrap(), b.file.get().unwrap());
        assert!(
            Arc::ptr_eq(fa, fb),
            "one descriptor per file in the process"
        );
        drop(a);
        assert!(b.header().is_some(), "the other watch still reads");

        std::fs::remove_file(&shm).unwrap();
        std::fs::write(&shm, [2u8; WAL_INDEX_HEADERS]).unwrap();
        let c = WalWatch::new(&db);
        assert_eq!(
            c.header(),
            Some([2u8; WAL_INDEX_HEADERS]),
            "the new file is read"
        );
        assert!(!Arc::ptr_eq(c.file.get().unwrap(), b.file.get().unwrap()));
        assert!(
            !sqlite_shm::is_registered(b.file.get().unwrap()),
            "the unlinked file's descriptor left the registry"
        );
    }
}
