//! Makes every committed frame of audit.db's WAL durable again after the disk may have lost
//! some: the frames as this process reads them, checked against SQLite's own checksums and
//! written back in place, then synced.
//!
//! Why: a failed `fdatasync` does not say which pages the disk did not take, and Linux
//! reports a writeback error once: it marks the failed pages clean (usually keeping their
//! content in the page cache), so a later sync of the same file succeeds without writing them.
//! A power loss then cuts the WAL at the first of them (SQLite's recovery stops at the first
//! frame whose checksum does not chain) and takes every record committed after it, answered
//! or not. Writing the frames back makes them dirty again, so the next sync writes them or
//! fails. A process that starts knows no better what its page cache holds that the disk does
//! not, so its first sync does the same (docs/AUDIT.md, "Pipelined fsync").
//!
//! The frames read must be the ones SQLite committed: each frame's salt and checksum (the
//! WAL's cumulative checksum, sqlite.org/walformat.html §1.2) and, at the last committed frame,
//! the checksum the WAL index holds for it. A frame that fails is one the page cache no longer
//! holds and the disk never got (or an intruder's edit): the records from there on are gone
//! from disk whatever is written after them, and the log refuses to count anything durable
//! again (the caller's part).
//!
//! The caller holds SQLite's WAL write lock (an open `BEGIN IMMEDIATE`): no connection of any
//! process writes a frame or restarts the WAL while the frames are read and written back, and
//! the WAL index's header, which only a writer changes, names exactly the committed frames.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sqlite_shm::{self, WAL_INDEX_HEADER};

/// Bytes of the WAL file's header.
const WAL_HEADER: usize = 32;
/// Bytes of a frame's header, before its page.
const FRAME_HEADER: usize = 24;
/// The WAL file's magic number; its last bit says in which byte order its checksums read words.
const WAL_MAGIC: u32 = 0x377f_0682;
/// The WAL index's format version (`iVersion`).
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// What [`rewrite_committed`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Rewrite {
    /// The committed frames, all as SQLite wrote them, were written back and synced.
    Synced {
        /// How many (0: the WAL holds no committed frame, everything is in audit.db).
        frames: u32,
    },
    /// A committed frame no longer reads as SQLite wrote it; the message says which.
    Lost(String),
}

/// Checks and writes back the committed frames of `<database>-wal`, then syncs it. Fails with
/// UNAVAILABLE when a file cannot be read, written or synced (worth trying again); a frame
/// that does not check is [`Rewrite::Lost`], which no retry changes. The caller holds the WAL
/// write lock.
pub(super) fn rewrite_committed(database: &Path) -> Result<Rewrite> {
    let (shm_path, wal_path) = (sibling(database, "-shm"), sibling(database, "-wal"));
    let failed = |what: &str, e: std::io::Error| {
        Error::Unavailable(format!(
            "audit store: cannot {what} {}: {e}",
            wal_path.display()
        ))
    };
    let Some(shm) = sqlite_shm::shm_file(&shm_path) else {
        return Err(Error::Unavailable(format!(
            "audit store: cannot read the WAL index {}",
            shm_path.display()
        )));
    };
    let headers = sqlite_shm::read_headers(&shm).ok_or_else(|| {
        Error::Unavailable(format!(
            "audit store: the WAL index {} does not read whole",
            shm_path.display()
        ))
    })?;
    let index = match IndexHeader::parse(&headers[..WAL_INDEX_HEADER]) {
        Ok(index) => index,
        Err(why) => return Ok(Rewrite::Lost(why)),
    };
    if index.last_frame == 0 {
        return Ok(Rewrite::Synced { frames: 0 });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&wal_path)
        .map_err(|e| failed("open", e))?;
    let bytes = match read_committed(&file, &index).map_err(|e| failed("read", e))? {
        Some(bytes) => bytes,
        None => {
            return Ok(Rewrite::Lost(format!(
                "{} is shorter than its {} committed frames",
                wal_path.display(),
                index.last_frame
            )));
        }
    };
    if let Err(why) = check_frames(&bytes, &index) {
        return Ok(Rewrite::Lost(format!("{}: {why}", wal_path.display())));
    }
    // The same bytes at the same offsets: a reader meanwhile (a checkpoint of another
    // process) reads what it would have read anyway.
    file.write_all_at(&bytes, 0)
        .map_err(|e| failed("write", e))?;
    file.sync_data().map_err(|e| failed("sync", e))?;
    Ok(Rewrite::Synced {
        frames: index.last_frame,
    })
}

fn sibling(database: &Path, suffix: &str) -> PathBuf {
    let mut path = database.as_os_str().to_owned();
    path.push(suffix);
    path.into()
}

/// The fields of the WAL index's header this module reads (the header's first copy; both
/// copies agree, [`sqlite_shm::read_headers`]). Native byte order, as SQLite writes it.
#[derive(Debug)]
struct IndexHeader {
    /// The last committed frame (`mxFrame`), counted from 1.
    last_frame: u32,
    /// The cumulative checksum after that frame (`aFrameCksum`).
    last_checksum: (u32, u32),
    /// The WAL header's salts, as bytes (`aSalt`).
    salt: [u8; 8],
}

impl IndexHeader {
    fn parse(header: &[u8]) -> std::result::Result<Self, String> {
        let word = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        if word(0) != WAL_INDEX_VERSION || header[12] != 1 {
            return Err(format!(
                "the WAL index is not one this build reads (version {}, initialised {})",
                word(0),
                header[12]
            ));
        }
        let mut salt = [0u8; 8];
        salt.copy_from_slice(&header[32..40]);
        Ok(Self {
            last_frame: word(16),
            last_checksum: (word(24), word(28)),
            salt,
        })
    }
}

/// The WAL file's header and its first `index.last_frame` frames, or `None` if the file ends
/// before them.
fn read_committed(file: &File, index: &IndexHeader) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; WAL_HEADER];
    if file.metadata()?.len() < WAL_HEADER as u64 {
        return Ok(None);
    }
    file.read_exact_at(&mut header, 0)?;
    let page = be_word(&header[8..12]) as usize;
    let len = WAL_HEADER as u64 + u64::from(index.last_frame) * (FRAME_HEADER + page) as u64;
    if file.metadata()?.len() < len {
        return Ok(None);
    }
    let mut bytes = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(Some(bytes))
}

/// Checks the WAL header and every frame of `bytes` (the header and the committed frames) as
/// SQLite's recovery does, and the last frame's checksum against the WAL index's.
fn check_frames(bytes: &[u8], index: &IndexHeader) -> std::result::Result<(), String> {
    let (header, frames) = bytes.split_at(WAL_HEADER);
    let magic = be_word(&header[0..4]);
    if magic & !1 != WAL_MAGIC {
        return Err("the WAL header's magic number is wrong".into());
    }
    let big_endian = magic & 1 == 1;
    let page = be_word(&header[8..12]) as usize;
    let stored = (be_word(&header[24..28]), be_word(&header[28..32]));
    let mut sum = checksum(big_endian, &header[..24], (0, 0));
    if sum != stored {
        return Err("the WAL header's checksum does not match".into());
    }
    if header[16..24] != index.salt {
        return Err("the WAL header's salt is not the WAL index's".into());
    }
    for (n, frame) in (1u32..).zip(frames.chunks_exact(FRAME_HEADER + page)) {
        let (frame_header, content) = frame.split_at(FRAME_HEADER);
        if frame_header[8..16] != index.salt {
            return Err(format!("frame {n}'s salt is not the WAL header's"));
        }
        sum = checksum(big_endian, &frame_header[..8], sum);
        sum = checksum(big_endian, content, sum);
        let stored = (
            be_word(&frame_header[16..20]),
            be_word(&frame_header[20..24]),
        );
        if sum != stored {
            return Err(format!("frame {n} does not match its checksum"));
        }
    }
    if sum != index.last_checksum {
        return Err(format!(
            "frame {}'s checksum is not the one the WAL index holds",
            index.last_frame
        ));
    }
    Ok(())
}

fn be_word(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// SQLite's WAL checksum (sqlite.org/walformat.html §1.2): two running sums over the 32-bit
/// words of `bytes` (a multiple of 8 long), read in the byte order the WAL's magic number
/// names, continuing from `sum`.
fn checksum(big_endian: bool, bytes: &[u8], mut sum: (u32, u32)) -> (u32, u32) {
    let word = |b: &[u8]| {
        let b = [b[0], b[1], b[2], b[3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    for pair in bytes.chunks_exact(8) {
        sum.0 = sum.0.wrapping_add(word(&pair[..4])).wrapping_add(sum.1);
        sum.1 = sum.1.wrapping_add(word(&pair[4..])).wrapping_add(sum.0);
    }
    sum
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rusqlite::Connection;

    /// A database in WAL mode with `rows` commits in its WAL (no checkpoint), and the open
    /// connection, which keeps the WAL and its index.
    fn wal_with_commits(rows: u32) -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t (x BLOB);",
        )
        .unwrap();
        for i in 0..rows {
            conn.execute("INSERT INTO t VALUES (?1)", [vec![i as u8; 300]])
                .unwrap();
        }
        (dir, db, conn)
    }

    /// Runs the rewrite as the audit log does: inside a write transaction.
    fn rewrite_locked(conn: &Connection, db: &Path) -> Rewrite {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let rewrite = rewrite_committed(db).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        rewrite
    }

    fn frame_offset(n: u64) -> u64 {
        WAL_HEADER as u64 + (n - 1) * (FRAME_HEADER as u64 + 1024)
    }

    /// SQLite's own WAL, checked by this module's reading of its checksums: the sum over every
    /// committed frame equals the one SQLite keeps in the WAL index, and the rewrite leaves the
    /// file byte for byte as it was.
    #[test]
    fn a_wal_as_sqlite_wrote_it_checks_and_is_written_back_unchanged() {
        let (_dir, db, conn) = wal_with_commits(40);
        let wal = sibling(&db, "-wal");
        let before = std::fs::read(&wal).unwrap();
        let Rewrite::Synced { frames } = rewrite_locked(&conn, &db) else {
            panic!("a WAL as SQLite wrote it checks");
        };
        assert!(frames >= 40, "one frame or more per commit: {frames}");
        assert_eq!(std::fs::read(&wal).unwrap(), before);
        // The database still reads (and SQLite agrees with the frames written back).
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 40);
    }

    /// A committed frame whose bytes changed (what a read returns when the page cache dropped a
    /// page the disk never got) is named, and nothing is written back.
    #[test]
    fn a_changed_committed_frame_is_lost_and_nothing_is_written() {
        let (_dir, db, conn) = wal_with_commits(20);
        let wal_path = sibling(&db, "-wal");
        let wal = OpenOptions::new().write(true).open(&wal_path).unwrap();
        // A byte inside frame 5's page.
        wal.write_all_at(&[0xA5], frame_offset(5) + FRAME_HEADER as u64 + 700)
            .unwrap();
        let before = std::fs::read(&wal_path).unwrap();
        match rewrite_locked(&conn, &db) {
            Rewrite::Lost(why) => assert!(why.contains("frame 5"), "{why}"),
            other => panic!("a changed frame was taken for committed: {other:?}"),
        }
        assert_eq!(std::fs::read(&wal_path).unwrap(), before);
    }

    /// A frame the disk returns as zeros (never written) and a WAL cut short are lost too.
    #[test]
    fn a_zeroed_frame_or_a_short_wal_is_lost() {
        let (_dir, db, conn) = wal_with_commits(10);
        let wal_path = sibling(&db, "-wal");
        let wal = OpenOptions::new().write(true).open(&wal_path).unwrap();
        wal.write_all_at(&[0u8; FRAME_HEADER + 1024], frame_offset(3))
            .unwrap();
        assert!(
            matches!(rewrite_locked(&conn, &db), Rewrite::Lost(why) if why.contains("frame 3"))
        );
        wal.set_len(frame_offset(2)).unwrap();
        assert!(
            matches!(rewrite_locked(&conn, &db), Rewrite::Lost(why) if why.contains("shorter"))
        );
    }

    /// Frames past the last committed one (a rolled-back transaction's, an older WAL
    /// generation's) are SQLite's garbage, not the log's: they are neither checked nor needed.
    #[test]
    fn frames_past_the_last_commit_are_not_checked() {
        let (_dir, db, conn) = wal_with_commits(5);
        let Rewrite::Synced { frames } = rewrite_locked(&conn, &db) else {
            panic!("checks");
        };
        let wal_path = sibling(&db, "-wal");
        let wal = OpenOptions::new().write(true).open(&wal_path).unwrap();
        wal.write_all_at(&[0x5A; 100], frame_offset(u64::from(frames) + 1))
            .unwrap();
        assert_eq!(rewrite_locked(&conn, &db), Rewrite::Synced { frames });
    }

    /// A checkpointed and restarted WAL holds no committed frame: nothing to write back.
    #[test]
    fn a_checkpointed_wal_has_nothing_to_write_back() {
        let (_dir, db, conn) = wal_with_commits(5);
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        assert_eq!(rewrite_locked(&conn, &db), Rewrite::Synced { frames: 0 });
    }
}
