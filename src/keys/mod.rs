//! The key hierarchy at run time: master-key providers, the manager that creates, wraps,
//! unwraps and rotates tenant keys, and the bounded cache of unwrapped keys.

pub mod cache;
pub mod manager;
pub mod master;
pub mod shred;
pub mod wrapping;

pub use manager::{EncryptGrant, KeyManager, KeyPolicy, RewrapProgress, RewrapSummary};
pub use master::{MasterKeySource, MasterKeyring};
pub use shred::ShredRecorder;
