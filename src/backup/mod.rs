//! Backup, restore and per-tenant recovery, and the shred ledger that keeps them from
//! bringing back what crypto-shredding destroyed (docs/OPERATIONS.md).
//!
//! - [`mac`]: MAC keys derived from the master key for manifests, exports and the ledger;
//! - [`manifest`]: the MAC'd manifest of a full backup (checksums, check values, audit head);
//! - [`snapshot`]: taking a full backup online, verifying one, staging and installing one;
//! - [`tenant_export`]: the per-tenant export file and the import plan;
//! - [`ledger`]: the shred ledger, kept with the master keyring, enforced on every open;
//! - [`migrate`]: copying a whole store and audit log into another backend (`migrate-store`).
//!
//! This module knows the key store, the audit log and the keyring; the command-line
//! orchestration (opening the data directory, auditing) is in `cli::backup`.

pub mod ledger;
pub mod mac;
pub mod manifest;
pub mod migrate;
pub mod snapshot;
pub mod tenant_export;
