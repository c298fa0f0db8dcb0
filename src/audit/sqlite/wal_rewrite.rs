//! Makes every committed frame of audit.db's WAL dirty again after the disk may have lost
//! some: the frames as this process reads them, checked against SQLite's own checksums and
//! written back in place, for the caller's next sync to write.
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

use std::fs::File;
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

/// What [`write_back_committed`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Rewrite {
    /// The committed frames, all as SQLite wrote them, were written back (not synced).
    WrittenBack {
        /// How many (0: the WAL holds no committed frame, everything is in audit.db).
        frames: u32,
    },
    /// A committed frame no longer reads as SQLite wrote it; the message says which. Frames
    /// before it may have been written back (the same bytes: harmless).
    Lost(String),
}

/// Frames read, checked and written back at a time: the WAL may be many mebibytes.
const FRAMES_PER_CHUNK: u32 = 256;

/// Checks the committed frames of `wal` (`<database>-wal`, open for reading and writing) and
/// writes them back in place, for the caller to sync. Fails with UNAVAILABLE when a file
/// cannot be read or written, or the WAL index is not one this build reads (worth trying
/// again, or a reason to stop); a frame that does not check is [`Rewrite::Lost`], which no
/// retry changes. The caller holds the WAL write lock.
pub(super) fn write_back_committed(database: &Path, wal: &File) -> Result<Rewrite> {
    let shm_path = sibling(database, "-shm");
    let wal_path = sibling(database, "-wal");
    let unavailable = |what: String| Error::Unavailable(format!("audit store: {what}"));
    let io = |what: &str, e: std::io::Error| {
        unavailable(format!("cannot {what} {}: {e}", wal_path.display()))
    };
    let shm = sqlite_shm::shm_file(&shm_path)
        .ok_or_else(|| unavailable(format!("cannot read the WAL index {}", shm_path.display())))?;
    let headers = sqlite_shm::read_headers(&shm).ok_or_else(|| {
        unavailable(format!(
            "the WAL index {} does not read whole",
            shm_path.display()
        ))
    })?;
    let index = IndexHeader::parse(&headers[..WAL_INDEX_HEADER]).map_err(unavailable)?;
    if index.last_frame == 0 {
        return Ok(Rewrite::WrittenBack { frames: 0 });
    }
    let lost = |why: String| Ok(Rewrite::Lost(format!("{}: {why}", wal_path.display())));
    let len = wal.metadata().map_err(|e| io("read", e))?.len();
    if len < WAL_HEADER as u64 {
        return lost("shorter than its header".into());
    }
    let mut header = [0u8; WAL_HEADER];
    wal.read_exact_at(&mut header, 0)
        .map_err(|e| io("read", e))?;
    let mut walk = match FrameWalk::start(&header, &index) {
        Ok(walk) => walk,
        Err(why) => return lost(why),
    };
    let frame_len = (FRAME_HEADER + walk.page) as u64;
    if len < WAL_HEADER as u64 + u64::from(index.last_frame) * frame_len {
        return lost(format!(
            "shorter than its {} committed frames",
            index.last_frame
        ));
    }
    wal.write_all_at(&header, 0).map_err(|e| io("write", e))?;
    let mut chunk = Vec::new();
    let mut first = 1u32;
    while first <= index.last_frame {
        let count = FRAMES_PER_CHUNK.min(index.last_frame - first + 1);
        let offset = WAL_HEADER as u64 + u64::from(first - 1) * frame_len;
        chunk.resize(count as usize * (FRAME_HEADER + walk.page), 0);
        wal.read_exact_at(&mut chunk, offset)
            .map_err(|e| io("read", e))?;
        if let Err(why) = walk.check(&chunk, first) {
            return lost(why);
        }
        // The same bytes at the same offsets: a reader meanwhile (a checkpoint of another
        // process) reads what it would have read anyway.
        wal.write_all_at(&chunk, offset)
            .map_err(|e| io("write", e))?;
        first += count;
    }
    if walk.sum != index.last_checksum {
        return lost(format!(
            "frame {}'s checksum is not the one the WAL index holds",
            index.last_frame
        ));
    }
    Ok(Rewrite::WrittenBack {
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
                "the WAL index is not one this build reads (version {}, initialised {}): \
                 cannot check the WAL's frames",
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

/// SQLite's recovery walk over the WAL's frames: the cumulative checksum from the WAL header
/// on, each frame's salt and checksum checked as it comes.
struct FrameWalk {
    big_endian: bool,
    page: usize,
    salt: [u8; 8],
    /// The checksum after the last frame checked.
    sum: (u32, u32),
}

impl FrameWalk {
    /// Checks the WAL header against itself and the WAL index.
    fn start(header: &[u8; WAL_HEADER], index: &IndexHeader) -> std::result::Result<Self, String> {
        let magic = be_word(&header[0..4]);
        if magic & !1 != WAL_MAGIC {
            return Err("the WAL header's magic number is wrong".into());
        }
        let big_endian = magic & 1 == 1;
        let page = be_word(&header[8..12]) as usize;
        if !page.is_power_of_two() || !(512..=65536).contains(&page) {
            return Err(format!(
                "the WAL header's page size {page} is not one SQLite writes"
            ));
        }
        let sum = checksum(big_endian, &header[..24], (0, 0));
        if sum != (be_word(&header[24..28]), be_word(&header[28..32])) {
            return Err("the WAL header's checksum does not match".into());
        }
        if header[16..24] != index.salt {
            return Err("the WAL header's salt is not the WAL index's".into());
        }
        Ok(Self {
            big_endian,
            page,
            salt: index.salt,
            sum,
        })
    }

    /// Checks the whole frames of `frames`, the first of which is frame `first`, continuing
    /// the sum.
    fn check(&mut self, frames: &[u8], first: u32) -> std::result::Result<(), String> {
        for (n, frame) in (first..).zip(frames.chunks_exact(FRAME_HEADER + self.page)) {
            let (frame_header, content) = frame.split_at(FRAME_HEADER);
            if frame_header[8..16] != self.salt {
                return Err(format!("frame {n}'s salt is not the WAL header's"));
            }
            let sum = checksum(self.big_endian, &frame_header[..8], self.sum);
            let sum = checksum(self.big_endian, content, sum);
            if sum
                != (
                    be_word(&frame_header[16..20]),
                    be_word(&frame_header[20..24]),
                )
            {
                return Err(format!("frame {n}'s checksum does not match"));
            }
            self.sum = sum;
        }
        Ok(())
    }
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

    use std::fs::OpenOptions;

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
        insert_rows(&conn, rows);
        (dir, db, conn)
    }

    fn insert_rows(conn: &Connection, rows: u32) {
        for i in 0..rows {
            conn.execute("INSERT INTO t VALUES (?1)", [vec![i as u8; 300]])
                .unwrap();
        }
    }

    fn open_wal(db: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(sibling(db, "-wal"))
            .unwrap()
    }

    /// Runs the write-back as the audit log does: inside a write transaction.
    fn write_back_locked(conn: &Connection, db: &Path) -> Rewrite {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let rewrite = write_back_committed(db, &open_wal(db)).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        rewrite
    }

    fn frame_offset(n: u64) -> u64 {
        WAL_HEADER as u64 + (n - 1) * (FRAME_HEADER as u64 + 1024)
    }

    /// Whether `why` names frame `n` (not frame `n`0…).
    fn names_frame(why: &str, n: u32) -> bool {
        why.contains(&format!("frame {n}'s"))
    }

    /// SQLite's own WAL, checked by this module's reading of its checksums: the sum over every
    /// committed frame equals the one SQLite keeps in the WAL index (more frames than one
    /// chunk, so the sum carries across chunks), and the write-back leaves the file byte for
    /// byte as it was.
    #[test]
    fn a_wal_as_sqlite_wrote_it_checks_and_is_written_back_unchanged() {
        let (_dir, db, conn) = wal_with_commits(FRAMES_PER_CHUNK + 40);
        let wal = sibling(&db, "-wal");
        let before = std::fs::read(&wal).unwrap();
        let Rewrite::WrittenBack { frames } = write_back_locked(&conn, &db) else {
            panic!("a WAL as SQLite wrote it checks");
        };
        assert!(
            frames > FRAMES_PER_CHUNK,
            "one frame or more per commit: {frames}"
        );
        assert_eq!(std::fs::read(&wal).unwrap(), before);
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, i64::from(FRAMES_PER_CHUNK + 40));
    }

    /// A committed frame whose bytes changed (what a read returns when the page cache dropped a
    /// page the disk never got) is named, and nothing from it on is written back.
    #[test]
    fn a_changed_committed_frame_is_lost_and_not_written_back() {
        let (_dir, db, conn) = wal_with_commits(20);
        let wal = open_wal(&db);
        // A byte inside frame 5's page.
        wal.write_all_at(&[0xA5], frame_offset(5) + FRAME_HEADER as u64 + 700)
            .unwrap();
        let before = std::fs::read(sibling(&db, "-wal")).unwrap();
        match write_back_locked(&conn, &db) {
            Rewrite::Lost(why) => assert!(names_frame(&why, 5), "{why}"),
            other => panic!("a changed frame was taken for committed: {other:?}"),
        }
        assert_eq!(std::fs::read(sibling(&db, "-wal")).unwrap(), before);
    }

    /// A frame the disk returns as zeros (never written) and a WAL cut short are lost too.
    #[test]
    fn a_zeroed_frame_or_a_short_wal_is_lost() {
        let (_dir, db, conn) = wal_with_commits(10);
        let wal = open_wal(&db);
        wal.write_all_at(&[0u8; FRAME_HEADER + 1024], frame_offset(3))
            .unwrap();
        assert!(
            matches!(write_back_locked(&conn, &db), Rewrite::Lost(why) if names_frame(&why, 3))
        );
        wal.set_len(frame_offset(2)).unwrap();
        assert!(
            matches!(write_back_locked(&conn, &db), Rewrite::Lost(why) if why.contains("shorter"))
        );
    }

    /// After a checkpoint copied the whole WAL, the next commit starts it again from its first
    /// frame with new salts, over the old frames: only the new generation's committed frames
    /// are checked, and the old ones after them are neither checked nor needed.
    #[test]
    fn a_restarted_wal_is_checked_up_to_its_last_commit_only() {
        let (_dir, db, conn) = wal_with_commits(30);
        let old_len = std::fs::metadata(sibling(&db, "-wal")).unwrap().len();
        conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")
            .unwrap();
        insert_rows(&conn, 2);
        let Rewrite::WrittenBack { frames } = write_back_locked(&conn, &db) else {
            panic!("the new generation checks");
        };
        assert!(
            frames > 0 && frame_offset(u64::from(frames) + 1) < old_len,
            "the WAL restarted over older frames: {frames} frames, {old_len} bytes"
        );
        // An old frame past the new last commit, changed: still nobody's business.
        open_wal(&db)
            .write_all_at(&[0x5A; 100], frame_offset(u64::from(frames) + 1))
            .unwrap();
        assert_eq!(
            write_back_locked(&conn, &db),
            Rewrite::WrittenBack { frames }
        );
    }

    /// A WAL truncated by a checkpoint holds no committed frame: nothing to write back.
    #[test]
    fn a_checkpointed_wal_has_nothing_to_write_back() {
        let (_dir, db, conn) = wal_with_commits(5);
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        assert_eq!(
            write_back_locked(&conn, &db),
            Rewrite::WrittenBack { frames: 0 }
        );
    }
}
