//! The key hierarchy at run time: master-key providers, the manager that creates, wraps,
//! unwraps and rotates tenant keys, the bounded cache of unwrapped keys, and the sealing of
//! the keyring file under a root of trust.

pub mod cache;
pub mod manager;
pub mod master;
pub mod seal;
pub mod shred;

pub use manager::{EncryptGrant, KeyManager, KeyPolicy, RewrapProgress, RewrapSummary};
pub use master::{MasterKeySource, MasterKeyring, SealedKeyring};
pub use shred::ShredRecorder;
