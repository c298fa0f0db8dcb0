//! Pure cryptography for tenant-kms: secret types, AES-256-GCM, HKDF-SHA256, the domain
//! separation labels and the v1 wire format.
//!
//! Nothing here does I/O, spawns tasks or knows about tenants as more than byte strings, so the
//! same functions serve the service, the command-line tools, the self-test and the conformance
//! suites (which therefore test exactly what runs in production).

pub mod aead;
pub mod blind_index;
pub mod envelope;
pub mod format;
pub mod kdf;
pub mod labels;
pub mod secret;
pub mod siv;

/// The one error every cryptographic failure becomes.
///
/// Like ring's `Unspecified`, it carries no detail on purpose: telling a caller *which* check
/// failed (a header byte, the length, the tag) would hand an attacker an oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cryptographic operation failed")]
pub struct CryptoError;
