//! The audit log (DESIGN §5): one record per key access, refusals included, made durable
//! before the caller gets an answer, and chained with HMAC-SHA256 under a key wrapped by the
//! master key so that editing, deleting, inserting, reordering or cutting records is detected.
//!
//! Modules, bottom first; each uses only those above it:
//! - [`operation`]: the names of audited operations;
//! - [`record`]: what a record holds, its one constructor and its canonical encoding;
//! - [`chain`]: the chain keys and MAC computation;
//! - [`anchor`]: the signed head and retention checkpoint, encoded and checked (pure);
//! - [`verify`]: the chain walk, the tail judgement and the recovery record (pure);
//! - [`log`]: the [`AuditLog`] traits a backend implements;
//! - [`registry`]: the registry of chains of a log with one chain per node (pure);
//! - [`sqlite`]: `audit.db`, the SQLite backend;
//! - [`postgres`]: the PostgreSQL backend, one chain per node;
//! - [`writer`]: the group-commit writer thread, over any [`AuditLog`];
//! - [`stream`]: at-least-once streaming of committed records to SIEM sinks (file, syslog);
//! - `contract` (tests and the `test-seams` feature): the suite every backend passes.
//!
//! docs/AUDIT.md describes the format and the guarantees.

pub mod anchor;
pub mod arrivals;
pub mod chain;
#[cfg(any(test, feature = "test-seams"))]
pub mod contract;
pub mod log;
pub mod operation;
pub mod postgres;
pub mod record;
pub mod registry;
pub mod sqlite;
pub mod stream;
pub mod verify;
pub mod writer;

pub use chain::ChainKeys;
pub use log::{
    AppendCost, AuditAppend, AuditLog, AuditMaintenance, AuditQuery, AuditSnapshot, ChainHead,
    Durability, ListFilter, MergeCursor, MergedRecord,
};
pub use operation::Operation;
pub use postgres::PostgresAuditLog;
pub use record::{AuditRecord, Outcome};
pub use sqlite::SqliteAuditLog;
pub use verify::VerifyReport;
pub use writer::AuditWriter;
