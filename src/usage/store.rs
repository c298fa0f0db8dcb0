//! Where per-minute usage is kept: the [`UsageStore`] trait and its SQLite implementation
//! (`usage.db` in the data directory, apart from `keys.db` and `audit.db` so that a flush
//! never waits for, nor holds, the locks of the key store or the audit writer).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use super::{UsageCounts, UsageRow};
use crate::error::{Error, Result};

/// File name of the usage store inside a data directory.
pub const USAGE_DB: &str = "usage.db";

/// Storage of per-minute usage cells. A backend adds counts (never overwrites them), so two
/// flushes of the same minute sum, and answers range queries by tenant.
pub trait UsageStore: Send + Sync {
    /// Adds every row's counts to the stored cell of its (minute, tenant, caller,
    /// operation, outcome), creating missing cells; all rows or none (one transaction).
    fn add(&self, rows: &[UsageRow]) -> Result<()>;

    /// The stored cells of `tenant` whose minute starts in `[since, until)` (Unix seconds).
    fn query(&self, tenant: &str, since: i64, until: i64) -> Result<Vec<UsageRow>>;
}

/// [`UsageStore`] on a SQLite file (WAL, created 0600).
pub struct SqliteUsageStore {
    conn: Mutex<Connection>,
}

fn usage_error(e: rusqlite::Error) -> Error {
    Error::Internal(format!("usage store: {e}"))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl SqliteUsageStore {
    /// Opens (creating if needed, with mode 0600) the usage store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::create_private_file(path)?;
        let conn = Connection::open(path).map_err(usage_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(usage_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(usage_error)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS usage (
                 tenant TEXT NOT NULL,
                 minute INTEGER NOT NULL,
                 caller TEXT NOT NULL,
                 operation TEXT NOT NULL,
                 outcome TEXT NOT NULL,
                 calls INTEGER NOT NULL,
                 items INTEGER NOT NULL,
                 failed_items INTEGER NOT NULL,
                 request_bytes INTEGER NOT NULL,
                 response_bytes INTEGER NOT NULL,
                 PRIMARY KEY (tenant, minute, caller, operation, outcome)
             ) WITHOUT ROWID;",
        )
        .map_err(usage_error)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }
}

impl UsageStore for SqliteUsageStore {
    fn add(&self, rows: &[UsageRow]) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(usage_error)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO usage (tenant, minute, caller, operation, outcome, calls, items,
                                        failed_items, request_bytes, response_bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (tenant, minute, caller, operation, outcome) DO UPDATE SET
                         calls = calls + excluded.calls,
                         items = items + excluded.items,
                         failed_items = failed_items + excluded.failed_items,
                         request_bytes = request_bytes + excluded.request_bytes,
                         response_bytes = response_bytes + excluded.response_bytes",
                )
                .map_err(usage_error)?;
            for row in rows {
                let c = &row.counts;
                insert
                    .execute(params![
                        row.tenant,
                        row.minute,
                        row.caller,
                        row.operation,
                        row.outcome,
                        to_i64(c.calls),
                        to_i64(c.items),
                        to_i64(c.failed_items),
                        to_i64(c.request_bytes),
                        to_i64(c.response_bytes),
                    ])
                    .map_err(usage_error)?;
            }
        }
        tx.commit().map_err(usage_error)
    }

    fn query(&self, tenant: &str, since: i64, until: i64) -> Result<Vec<UsageRow>> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut select = conn
            .prepare_cached(
                "SELECT minute, caller, operation, outcome, calls, items, failed_items,
                        request_bytes, response_bytes
                 FROM usage WHERE tenant = ?1 AND minute >= ?2 AND minute < ?3
                 ORDER BY minute, caller, operation, outcome",
            )
            .map_err(usage_error)?;
        let rows = select
            .query_map(params![tenant, since, until], |r| {
                Ok(UsageRow {
                    minute: r.get(0)?,
                    tenant: tenant.to_owned(),
                    caller: r.get(1)?,
                    operation: r.get(2)?,
                    outcome: r.get(3)?,
                    counts: UsageCounts {
                        calls: to_u64(r.get(4)?),
                        items: to_u64(r.get(5)?),
                        failed_items: to_u64(r.get(6)?),
                        request_bytes: to_u64(r.get(7)?),
                        response_bytes: to_u64(r.get(8)?),
                    },
                })
            })
            .map_err(usage_error)?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(usage_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_sum_and_queries_are_by_tenant_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(USAGE_DB);
        let store = SqliteUsageStore::open(&path).unwrap();
        let row = |minute, tenant: &str, calls| UsageRow {
            minute,
            tenant: tenant.into(),
            caller: "token:a".into(),
            operation: "Encrypt".into(),
            outcome: "ok".into(),
            counts: UsageCounts {
                calls,
                ..Default::default()
            },
        };
        store
            .add(&[row(60, "t", 1), row(120, "t", 2), row(60, "u", 9)])
            .unwrap();
        store.add(&[row(60, "t", 4)]).unwrap();
        let got = store.query("t", 0, 120).unwrap();
        assert_eq!(got, vec![row(60, "t", 5)]);
        assert_eq!(store.query("t", 0, 180).unwrap().len(), 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
