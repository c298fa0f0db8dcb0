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
//! The descriptor it reads through is never closed while the file exists (see [`SHM_FILES`]):
//! closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
//! among them.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Bytes at the start of the `-shm` file: two copies of the 48-byte WAL-index header, which
/// SQLite writes one after the other on every commit (and readers compare to detect a torn
/// read).
const WAL_INDEX_HEADERS: usize = 96;

/// Both copies of the WAL-index header, as read at one moment.
pub(super) type WalIndexHeader = [u8; WAL_INDEX_HEADERS];

/// The `-shm` files this process has opened for reading, one descriptor per file, kept open
/// until the file is unlinked.
///
/// Why not closed with the [`WalWatch`] that opened it: POSIX record locks belong to the
/// process, and closing *any* descriptor of a file releases all of the process's locks on it
/// (fcntl(2), "Advisory record locking"). SQLite holds such locks on the `-shm` file through
/// its own descriptor for as long as a connection is open: the lock that tells other processes
/// the WAL index is in use (a process that finds it free rebuilds the index, truncating the
/// file under the mapping of a connection still using it), and the WAL's read and write
/// locks. A descriptor of ours closed while any connection of this process to that database
/// is open (another store on the same file, or the copy a race between two first reads
/// opened) would drop them. An unlinked `-shm` file is one SQLite removed after its last
/// connection anywhere closed (or a removed directory's): nobody can open it again, so its
/// descriptor is closed at the next open.
static SHM_FILES: Mutex<Vec<Arc<File>>> = Mutex::new(Vec::new());

/// The process's descriptor of the `-shm` file at `path`, opened if it has none; `None` if
/// the file does not exist (yet) or cannot be opened.
fn shm_file(path: &Path) -> Option<Arc<File>> {
    let wanted = std::fs::metadata(path).ok()?;
    let mut files = SHM_FILES.lock().unwrap_or_else(PoisonError::into_inner);
    files.retain(|file| file.metadata().is_ok_and(|m| m.nlink() > 0));
    let same_file = |file: &&Arc<File>| {
        file.metadata()
            .is_ok_and(|m| (m.dev(), m.ino()) == (wanted.dev(), wanted.ino()))
    };
    if let Some(file) = files.iter().find(same_file) {
        return Some(Arc::clone(file));
    }
    // Opened under the lock, so two first reads never open the file twice and close one.
    let file = Arc::new(File::open(path).ok()?);
    files.push(Arc::clone(&file));
    Some(file)
}

/// The `-shm` file of one database and the generation its last full check published.
pub(super) struct WalWatch {
    path: PathBuf,
    /// Found or opened on first use (the file exists only once the connection is in WAL
    /// mode); shared with [`SHM_FILES`], which decides when it is closed.
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
        let mut buf = [0u8; WAL_INDEX_HEADERS];
        file.read_exact_at(&mut buf, 0).ok()?;
        let (first, second) = buf.split_at(WAL_INDEX_HEADERS / 2);
        (first == second).then_some(buf)
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
        let open = SHM_FILES.lock().unwrap();
        assert!(
            !open.iter().any(|f| Arc::ptr_eq(f, b.file.get().unwrap())),
            "the unlinked file's descriptor left the registry"
        );
    }
}
