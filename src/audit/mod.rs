//! The audit log (DESIGN §5): one record per key access, refusals included, made durable
//! before the caller gets an answer, and chained with HMAC-SHA256 under a key wrapped by the
//! master key so that editing, deleting, inserting or reordering records is detected.
//!
//! - [`record`]: what a record holds and its canonical encoding;
//! - [`chain`]: the chain keys and MAC computation;
//! - [`sqlite`]: `audit.db`, its schema, appends, queries and the verifier;
//! - [`writer`]: the group-commit writer thread that owns the connection.

pub mod chain;
pub mod record;
pub mod sqlite;
pub mod writer;

pub use chain::ChainKeys;
pub use record::{AuditRecord, Outcome};
pub use writer::{AuditWriter, Durability};
