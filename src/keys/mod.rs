//! The key hierarchy at run time: master-key providers, the manager that creates, wraps,
//! unwraps and rotates tenant keys, the one tenant-key wrapping and unwrapping
//! (`wrapping`), and the bounded cache of unwrapped keys.

pub mod cache;
mod manager;
pub mod master;
mod shred;
// Crate-private: backup and the manager unwrap through it; nothing outside needs it.
pub(crate) mod wrapping;

pub use manager::{EncryptGrant, KeyManager, KeyPolicy, RewrapProgress, RewrapSummary};
pub use master::{MasterKeySource, MasterKeyring};
pub use shred::ShredRecorder;
