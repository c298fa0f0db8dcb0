//! The PostgreSQL backend (issue 14): several stateless service nodes sharing one replicated
//! PostgreSQL.
//!
//! - [`connect`](PgPool): options, a bounded pool of blocking connections with start-up retry,
//!   TLS with certificate verification, and the one mapping of database errors to ours;
//!   shared by every part that lives in the database (the key store, the audit log).
//! - `schema`: versioned migrations, applied by one node at a time.
//! - `rows`: the MAC'd rows (the same encodings and anchor as keys.db).
//! - `changes`: the change log every node follows, and the fail-closed staleness bound.
//! - [`PostgresKeyStore`]: the key-store traits.
//! - [`staging`]: the staging schema `migrate-store` fills and publishes in one transaction.

mod changes;
mod connect;
mod index;
mod rows;
mod schema;
pub mod staging;
mod store;
#[cfg(any(test, feature = "test-seams"))]
mod tamper;

pub use connect::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_POOL_SIZE, PASSWORD_ENV, PgConnection, PgOptions, PgPool,
    has_password, map_error, off_runtime, on_blocking_pool,
};
pub use schema::current_version as schema_version;
pub use store::PostgresKeyStore;
