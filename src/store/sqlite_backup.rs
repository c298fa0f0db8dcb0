//! SQLite's online backup, shared by the two SQLite files (`keys.db` here, `audit.db` in
//! `crate::audit::sqlite`): the one copy of the page-copy loop. It lives in `store/` because
//! the store is below the audit log's callers and the audit module may use it without any
//! dependency pointing up.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::backup::{Backup, StepResult};

use crate::error::{Error, Result};

/// Copies the database `source` into the new file `dest` (mode 0600) with SQLite's online
/// backup API and makes the copy self-contained (rollback journal mode, no `-wal` beside it,
/// so its checksum is its whole state) and durable. One backup step copies every page inside
/// one read transaction, so the copy is the database as of one commit, and in WAL mode writers
/// (the server) go on meanwhile. `sql_error` maps SQLite's errors as the caller's store does.
pub(crate) fn copy_database(
    source: &Connection,
    dest: &Path,
    sql_error: fn(rusqlite::Error) -> Error,
) -> Result<()> {
    crate::fsutil::create_private_file(dest)?;
    let mut out = Connection::open(dest).map_err(sql_error)?;
    {
        let backup = Backup::new(source, &mut out).map_err(sql_error)?;
        copy_all_pages(&backup, sql_error)?;
    }
    out.pragma_update(None, "journal_mode", "DELETE")
        .map_err(sql_error)?;
    out.close().map_err(|(_, e)| sql_error(e))?;
    crate::fsutil::sync_file(dest)
}

/// Runs an online backup as one step (-1: every page), retrying while another connection
/// holds a lock that keeps the step from starting (bounded: about ten seconds).
fn copy_all_pages(backup: &Backup<'_, '_>, sql_error: fn(rusqlite::Error) -> Error) -> Result<()> {
    for attempt in 0..100u64 {
        match backup.step(-1).map_err(sql_error)? {
            StepResult::Done => return Ok(()),
            StepResult::More | StepResult::Busy | StepResult::Locked => {
                std::thread::sleep(Duration::from_millis(10 * (attempt + 1).min(10)));
            }
            _ => {}
        }
    }
    Err(Error::internal("online backup: the database stayed busy"))
}
