//! An audit record and its canonical byte encoding (the input of the chain MAC).

use crate::crypto::labels::push_length_prefixed;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded (every item, for batches).
    Ok,
    /// A batch in which some items failed.
    Partial,
    /// No or bad credentials.
    Unauthenticated,
    /// Credentials valid, permission missing.
    Denied,
    /// Bad input.
    Invalid,
    /// The tenant or version does not exist.
    NotFound,
    /// Already exists.
    AlreadyExists,
    /// A lifecycle state forbade it.
    FailedPrecondition,
    /// A limit was hit.
    Exhausted,
    /// The service could not answer safely.
    Unavailable,
    /// An internal fault.
    Internal,
    /// The caller's deadline passed before the answer was ready; none was sent.
    DeadlineExceeded,
    /// The caller went away (cancelled, disconnected) before the answer was ready.
    Cancelled,
}

impl Outcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
            Outcome::NotFound => "not_found",
            Outcome::AlreadyExists => "already_exists",
            Outcome::FailedPrecondition => "failed_precondition",
            Outcome::Exhausted => "exhausted",
            Outcome::Unavailable => "unavailable",
            Outcome::Internal => "internal",
            Outcome::DeadlineExceeded => "deadline_exceeded",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One audit record. Holds no plaintext, key material or ciphertext: caller AAD appears only
/// as a keyed fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Microseconds since the Unix epoch.
    pub time_micros: i64,
    /// The request id (also sent to the caller in `x-request-id`).
    pub request_id: String,
    /// Who called: `token:<id>`, `cli:<user>`, or `anonymous`.
    pub caller: String,
    /// The peer address, or `local` for commands.
    pub peer: String,
    /// The tenant, if the request named a valid one.
    pub tenant_id: String,
    /// The RPC or command, e.g. `Encrypt`, `rotate`.
    pub operation: String,
    /// The contexts touched (distinct, at most a few for batches).
    pub contexts: Vec<String>,
    /// The key versions touched.
    pub key_versions: Vec<u32>,
    /// Items in the request (1 for unary calls).
    pub item_count: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Hex HMAC fingerprint of the caller AAD, empty when none.
    pub aad_fingerprint: String,
    /// A short, secret-free explanation.
    pub detail: String,
}

/// Label of the canonical record encoding.
const RECORD_LABEL: &[u8] = b"tenant-kms/v1/audit-record";

impl AuditRecord {
    /// The canonical encoding of this record at position `seq`, chained to `prev_mac`:
    /// `lp(label) ‖ be64(seq) ‖ be64(time) ‖ lp(request_id) ‖ lp(caller) ‖ lp(peer) ‖
    /// lp(tenant) ‖ lp(operation) ‖ be32(#contexts) ‖ lp(context)… ‖ be32(#versions) ‖
    /// be32(version)… ‖ be32(item_count) ‖ lp(outcome) ‖ lp(aad_fingerprint) ‖ lp(detail) ‖
    /// lp(prev_mac)`.
    pub fn canonical_bytes(&self, seq: u64, prev_mac: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        push_length_prefixed(&mut out, RECORD_LABEL);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.time_micros.to_be_bytes());
        for part in [
            &self.request_id,
            &self.caller,
            &self.peer,
            &self.tenant_id,
            &self.operation,
        ] {
            push_length_prefixed(&mut out, part.as_bytes());
        }
        out.extend_from_slice(&(self.contexts.len() as u32).to_be_bytes());
        for context in &self.contexts {
            push_length_prefixed(&mut out, context.as_bytes());
        }
        out.extend_from_slice(&(self.key_versions.len() as u32).to_be_bytes());
        for version in &self.key_versions {
            out.extend_from_slice(&version.to_be_bytes());
        }
        out.extend_from_slice(&self.item_count.to_be_bytes());
        push_length_prefixed(&mut out, self.outcome.as_str().as_bytes());
        push_length_prefixed(&mut out, self.aad_fingerprint.as_bytes());
        push_length_prefixed(&mut out, self.detail.as_bytes());
        push_length_prefixed(&mut out, prev_mac);
        out
    }
}

/// Parses a stored outcome name.
pub fn outcome_from_str(name: &str) -> Option<Outcome> {
    [
        Outcome::Ok,
        Outcome::Partial,
        Outcome::Unauthenticated,
        Outcome::Denied,
        Outcome::Invalid,
        Outcome::NotFound,
        Outcome::AlreadyExists,
        Outcome::FailedPrecondition,
        Outcome::Exhausted,
        Outcome::Unavailable,
        Outcome::Internal,
        Outcome::DeadlineExceeded,
        Outcome::Cancelled,
    ]
    .into_iter()
    .find(|o| o.as_str() == name)
}
