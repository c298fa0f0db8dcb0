//! Bearer tokens: `tkms_` followed by 256 random bits in unpadded base64url. Only their
//! SHA-256 is stored; the token itself is shown once, when issued.

use base64::Engine;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::store::{KeyStore, TokenRecord};

/// Every token starts with this, so secret scanners can recognise a leaked one.
pub const TOKEN_PREFIX: &str = "tkms_";

/// SHA-256 of a token (FIPS 180-4). Tokens carry 256 random bits, so an unsalted fast hash is
/// enough: there is nothing to guess.
pub fn hash_token(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What a new token may do.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Operator-chosen name.
    pub name: String,
    /// `admin`, `service` or `auditor`.
    pub role: super::Role,
    /// `*` or a comma-separated tenant list.
    pub tenants: String,
    /// `*` or a comma-separated list of data-plane permissions.
    pub operations: String,
    /// Lifetime in seconds; `None` never expires.
    pub ttl_seconds: Option<u64>,
}

/// A freshly issued token. Not `Debug`: the secret must only be printed deliberately.
pub struct IssuedToken {
    /// The token to hand to the caller, once.
    pub secret: Zeroizing<String>,
    /// What was stored.
    pub record: TokenRecord,
}

/// Generates a token, stores its hash and returns it. Its creation time, and its expiry
/// `ttl_seconds` later, are read from `clock` (the one its expiry will be checked against).
pub fn issue_token(
    store: &dyn KeyStore,
    spec: &TokenSpec,
    clock: &dyn Clock,
) -> Result<IssuedToken> {
    let mut random = Zeroizing::new([0u8; 32]);
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), random.as_mut())
        .map_err(|_| Error::internal("CSPRNG failed"))?;
    let secret = Zeroizing::new(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random.as_ref())
    ));
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| Error::internal("CSPRNG failed"))?;
    let now = clock.now_unix();
    let record = TokenRecord {
        id: hex::encode(id),
        name: spec.name.clone(),
        hash: hash_token(&secret),
        role: spec.role.as_str().to_owned(),
        tenants: spec.tenants.clone(),
        operations: spec.operations.clone(),
        created_at: now,
        expires_at: spec
            .ttl_seconds
            .map(|ttl| now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))),
        revoked_at: None,
        quarantined_at: None,
    };
    store.insert_token(&record)?;
    Ok(IssuedToken { secret, record })
}
