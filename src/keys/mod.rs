//! The key hierarchy at run time: master-key providers, the manager that creates, wraps,
//! unwraps and rotates tenant keys, the one tenant-key wrapping and unwrapping
//! (`wrapping`), the bounded cache of unwrapped keys, and the sealing of the keyring file
//! under a root of trust.

pub mod cache;
mod manager;
pub mod master;
pub mod seal;
mod shred;
// Crate-private: backup and the manager unwrap through it; nothing outside needs it.
pub(crate) mod wrapping;

pub use manager::{EncryptGrant, KeyManager, KeyPolicy, RewrapProgress, RewrapSummary};
pub use master::{MasterKeySource, MasterKeyring, SealedKeyring};
pub use shred::ShredRecorder;
