//! The webhook's signature, so the alerting endpoint can tell our POSTs from anyone else's
//! and refuse a replayed one.
//!
//! Each attempt carries `X-Tenant-KMS-Timestamp: <unix seconds>` and
//! `X-Tenant-KMS-Signature: sha256=<lowercase hex>`, the HMAC-SHA256 (RFC 2104 with SHA-256,
//! FIPS 198-1; computed by ring) keyed with the operator's shared secret over
//!
//! ```text
//! <timestamp as sent, ASCII decimal> "." <the exact body bytes>
//! ```
//!
//! The timestamp is inside the MAC, so a receiver that rejects timestamps more than a few
//! minutes from its own clock rejects replays of a captured POST; the body is signed exactly
//! as sent, so the receiver verifies the raw bytes before parsing them. Retries are signed
//! again with their own time. docs/OPERATIONS.md §13 has a verification snippet.

use std::path::Path;

use ring::hmac;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-tenant-kms-signature";
/// Header carrying the signing time (unix seconds), covered by the signature.
pub const TIMESTAMP_HEADER: &str = "x-tenant-kms-timestamp";
/// Header carrying the delivery id, the same on every attempt of one alert (for dedup).
pub const DELIVERY_HEADER: &str = "x-tenant-kms-delivery";
/// Shortest secret accepted: 32 bytes (`openssl rand -hex 32` gives 64).
pub const MIN_SECRET_BYTES: usize = 32;

/// The signing key. Deliberately no `Debug` and no `Clone`: it is the shared secret.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    /// A signer keyed with `secret` (the bytes as the receiver holds them).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The secret from the first line of `path` (surrounding whitespace ignored). The file
    /// must not be readable by group or others, like every secret file of the service, and the
    /// secret must be at least [`MIN_SECRET_BYTES`] long. Errors name the file, never its
    /// contents.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::fsutil::check_private(path)?;
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
            Error::FailedPrecondition(format!(
                "cannot read the webhook secret file {}: {e}",
                path.display()
            ))
        })?);
        let line = text
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if line.len() < MIN_SECRET_BYTES {
            return Err(Error::FailedPrecondition(format!(
                "the webhook secret in {} is shorter than {MIN_SECRET_BYTES} bytes (make one \
                 with `openssl rand -hex 32`)",
                path.display()
            )));
        }
        Ok(Self::new(line))
    }

    /// The `X-Tenant-KMS-Signature` value for `body` sent at `timestamp` (unix seconds).
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        let mut mac = hmac::Context::with_key(&self.key);
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.sign().as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-webhook-test";

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Known answer from an independent implementation (Python's hmac module):
        // hmac.new(SECRET, b'1900000000.{"detector":"probing"}', hashlib.sha256).hexdigest()
        let signer = Signer::new(SECRET);
        assert_eq!(
            signer.sign(1_900_000_000, br#"{"detector":"probing"}"#),
            "sha256=18c4770395426fb893e4016d9cd2302c5222bc91c590b49c6f1daee8bbf2cad8"
        );
        // The timestamp is covered: another time, another signature.
        assert_ne!(
            signer.sign(1_900_000_001, br#"{"detector":"probing"}"#),
            signer.sign(1_900_000_000, br#"{"detector":"probing"}"#)
        );
    }

    #[test]
    fn the_secret_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhook.secret");
        std::fs::write(&path, [SECRET, b"\nignored second line\n"].concat()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Signer::from_file(&path).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let signer = Signer::from_file(&path).unwrap();
        assert_eq!(signer.sign(7, b"x"), Signer::new(SECRET).sign(7, b"x"));
        std::fs::write(&path, "too short\n").unwrap();
        let err = Signer::from_file(&path).err().unwrap().to_string();
        assert!(err.contains("shorter than 32 bytes"), "{err}");
        assert!(
            !err.contains("too short"),
            "the secret is never in a message: {err}"
        );
    }
}
