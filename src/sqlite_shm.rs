//! The WAL index (`-shm` file) of a SQLite database, read without a connection: the one
//! descriptor per file this process reads it through, and its header.
//!
//! The key store's change check ([`crate::store`]) compares the header to see whether anything
//! was committed; the audit log's WAL rewrite ([`crate::audit::sqlite`]) reads the last
//! committed frame and its checksum from it.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

/// Bytes of one copy of the WAL-index header (sqlite.org/walformat.html §2.2.1).
pub(crate) const WAL_INDEX_HEADER: usize = 48;

/// Bytes at the start of the `-shm` file: two copies of the WAL-index header, which SQLite
/// writes one after the other on every commit (and readers compare to detect a torn read).
pub(crate) const WAL_INDEX_HEADERS: usize = 2 * WAL_INDEX_HEADER;

/// Both copies of the WAL-index header, as read at one moment.
pub(crate) type WalIndexHeaders = [u8; WAL_INDEX_HEADERS];

/// The `-shm` files this process has opened for reading, one descriptor per file, kept open
/// until the file is unlinked.
///
/// Why not closed by whoever opened it: POSIX record locks belong to the process, and closing
/// *any* descriptor of a file releases all of the process's locks on it (fcntl(2), "Advisory
/// record locking"). SQLite holds such locks on the `-shm` file through its own descriptor for
/// as long as a connection is open: the lock that tells other processes the WAL index is in
/// use (a process that finds it free rebuilds the index, truncating the file under the
/// mapping of a connection still using it), and the WAL's read and write locks. A descriptor
/// of ours closed while any connection of this process to that database is open (another
/// store on the same file, or the copy a race between two first reads opened) would drop
/// them. An unlinked `-shm` file is one SQLite removed after its last connection anywhere
/// closed (or a removed directory's): nobody can open it again, so its descriptor is closed
/// at the next open.
static SHM_FILES: Mutex<Vec<Arc<File>>> = Mutex::new(Vec::new());

/// The process's descriptor of the `-shm` file at `path`, opened if it has none; `None` if
/// the file does not exist (yet) or cannot be opened.
pub(crate) fn shm_file(path: &Path) -> Option<Arc<File>> {
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

/// Both copies of the WAL-index header of `file` if they agree (no commit is half-published);
/// `None` if the file cannot be read.
pub(crate) fn read_headers(file: &File) -> Option<WalIndexHeaders> {
    let mut buf = [0u8; WAL_INDEX_HEADERS];
    file.read_exact_at(&mut buf, 0).ok()?;
    let (first, second) = buf.split_at(WAL_INDEX_HEADER);
    (first == second).then_some(buf)
}

/// Whether `file` is a descriptor the process keeps in its registry.
#[cfg(test)]
pub(crate) fn is_registered(file: &Arc<File>) -> bool {
    SHM_FILES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|f| Arc::ptr_eq(f, file))
}
