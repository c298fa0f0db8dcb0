//! The audit log (DESIGN §5): one record per key access, refusals included, made durable
//! before the caller gets an answer, and chained with HMAC-SHA256 under a key wrapped by the
//! master key so that editing, deleting, inserting, reordering or cutting records is detected.
//!
//! - [`record`]: what a record holds and its canonical encoding;
//! - [`chain`]: the chain keys and MAC computation;
//! - [`anchor`]: the signed head and retention checkpoint;
//! - [`sqlite`]: `audit.db`, its schema, appends, queries and pruning;
//! - [`verify`]: the verifier, the start-up tail check and the audited recovery step;
//! - [`writer`]: the group-commit writer thread that owns the append connection.
//!
//! docs/AUDIT.md describes the format and the guarantees.

pub mod anchor;
pub mod chain;
pub mod record;
pub mod sqlite;
pub mod verify;
pub mod writer;

pub use chain::ChainKeys;
pub use record::{AuditRecord, Outcome};
pub use verify::VerifyReport;
pub use writer::{AuditWriter, Durability};
