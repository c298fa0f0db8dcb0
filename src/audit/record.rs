//! An audit record and its canonical byte encoding (the input of the chain MAC).

use super::operation::Operation;
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
    /// The RPC or command, as [`Operation::as_str`] names it (kept as the stored string so a
    /// record with a name this build does not know still reads and verifies).
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
    /// The caller's W3C `traceparent` (version-00 form), empty when it sent none or an
    /// invalid one: joins the record to the caller's distributed trace.
    pub trace_parent: String,
}

/// The peer of a record made on this machine.
pub const LOCAL_PEER: &str = "local";

/// Label of the canonical record encoding.
const RECORD_LABEL: &[u8] = b"tenant-kms/v1/audit-record";

/// Name of the optional trace field in the canonical encoding.
const TRACE_PARENT_FIELD: &[u8] = b"trace_parent";

impl AuditRecord {
    /// The record as one JSON object, as `audit export` prints it and the SIEM stream sends
    /// it: every field, plus its sequence number and its time in RFC 3339 (empty for a time
    /// past year 9999, which only a forged row has: the formatter would panic).
    pub fn export_json(&self, seq: u64) -> serde_json::Value {
        let time = crate::clock::rfc3339_micros(self.time_micros);
        serde_json::json!({
            "seq": seq,
            "time": time,
            "time_us": self.time_micros,
            "request_id": self.request_id,
            "caller": self.caller,
            "peer": self.peer,
            "tenant_id": self.tenant_id,
            "operation": self.operation,
            "contexts": self.contexts,
            "key_versions": self.key_versions,
            "item_count": self.item_count,
            "outcome": self.outcome.as_str(),
            "aad_fingerprint": self.aad_fingerprint,
            "detail": self.detail,
            "trace_parent": self.trace_parent,
        })
    }

    /// The one way records are made: `operation` by `caller` from `peer`, ending in
    /// `outcome`, timed now, about one item, and nothing else (no tenant, request id,
    /// contexts, versions, fingerprint or detail) until the builder methods below add it.
    pub fn new(
        operation: impl Into<Operation>,
        caller: impl Into<String>,
        peer: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self {
            time_micros: crate::domain::unix_now_micros(),
            request_id: String::new(),
            caller: caller.into(),
            peer: peer.into(),
            tenant_id: String::new(),
            operation: operation.into().as_str().to_owned(),
            contexts: Vec::new(),
            key_versions: Vec::new(),
            item_count: 1,
            outcome,
            aad_fingerprint: String::new(),
            detail: String::new(),
            trace_parent: String::new(),
        }
    }

    /// A record of something done on this machine, not for a remote peer (a command, the
    /// service by itself): [`AuditRecord::new`] with the peer `local`.
    pub fn local(
        operation: impl Into<Operation>,
        caller: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self::new(operation, caller, LOCAL_PEER, outcome)
    }

    /// Sets the time (µs since the Unix epoch).
    pub fn at(mut self, time_micros: i64) -> Self {
        self.time_micros = time_micros;
        self
    }

    /// Sets the request id.
    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    /// Sets the tenant.
    pub fn tenant(mut self, tenant_id: impl Into<String>) -> Self {
        self.tenant_id = tenant_id.into();
        self
    }

    /// Sets the contexts touched.
    pub fn contexts(mut self, contexts: Vec<String>) -> Self {
        self.contexts = contexts;
        self
    }

    /// Sets the key versions touched.
    pub fn versions(mut self, key_versions: Vec<u32>) -> Self {
        self.key_versions = key_versions;
        self
    }

    /// Sets the item count.
    pub fn items(mut self, item_count: u32) -> Self {
        self.item_count = item_count;
        self
    }

    /// Sets the keyed AAD fingerprint (never the AAD itself).
    pub fn aad_fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.aad_fingerprint = fingerprint.into();
        self
    }

    /// Sets the secret-free detail.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Sets the caller's validated `traceparent` (empty: none).
    pub fn trace_parent(mut self, trace_parent: impl Into<String>) -> Self {
        self.trace_parent = trace_parent.into();
        self
    }

    /// The canonical encoding of this record at position `seq`, chained to `prev_mac`:
    /// `lp(label) ‖ be64(seq) ‖ be64(time) ‖ lp(request_id) ‖ lp(caller) ‖ lp(peer) ‖
    /// lp(tenant) ‖ lp(operation) ‖ be32(#contexts) ‖ lp(context)… ‖ be32(#versions) ‖
    /// be32(version)… ‖ be32(item_count) ‖ lp(outcome) ‖ lp(aad_fingerprint) ‖ lp(detail) ‖
    /// [lp("trace_parent") ‖ lp(trace_parent)] ‖ lp(prev_mac)`. The bracketed pair is present
    /// only when the record has a trace, so records without one (every record written before
    /// the field existed) encode exactly as they always did and still verify; the named pair
    /// cannot be confused with `lp(prev_mac)`, whose length is fixed.
    pub fn canonical_bytes(&self, seq: u64, prev_mac: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.canonical_bytes_into(seq, prev_mac, &mut out);
        out
    }

    /// [`AuditRecord::canonical_bytes`] written into `out` (cleared first), so that a batch
    /// encodes all its records in one buffer instead of allocating one per record.
    pub fn canonical_bytes_into(&self, seq: u64, prev_mac: &[u8], out: &mut Vec<u8>) {
        out.clear();
        push_length_prefixed(out, RECORD_LABEL);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&self.time_micros.to_be_bytes());
        for part in [
            &self.request_id,
            &self.caller,
            &self.peer,
            &self.tenant_id,
            &self.operation,
        ] {
            push_length_prefixed(out, part.as_bytes());
        }
        out.extend_from_slice(&(self.contexts.len() as u32).to_be_bytes());
        for context in &self.contexts {
            push_length_prefixed(out, context.as_bytes());
        }
        out.extend_from_slice(&(self.key_versions.len() as u32).to_be_bytes());
        for version in &self.key_versions {
            out.extend_from_slice(&version.to_be_bytes());
        }
        out.extend_from_slice(&self.item_count.to_be_bytes());
        push_length_prefixed(out, self.outcome.as_str().as_bytes());
        push_length_prefixed(out, self.aad_fingerprint.as_bytes());
        push_length_prefixed(out, self.detail.as_bytes());
        if !self.trace_parent.is_empty() {
            push_length_prefixed(out, TRACE_PARENT_FIELD);
            push_length_prefixed(out, self.trace_parent.as_bytes());
        }
        push_length_prefixed(out, prev_mac);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(out: &mut Vec<u8>, part: &[u8]) {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }

    /// The encoding written out by hand from its documented layout, for a record without a
    /// trace: the layout every record had before the trace field, so old chains verify.
    #[test]
    fn a_record_without_trace_encodes_as_before_the_field_existed() {
        let record = AuditRecord::new(
            super::super::operation::Rpc::Encrypt,
            "token:a",
            "p",
            Outcome::Ok,
        )
        .at(7)
        .request_id("r")
        .tenant("t")
        .contexts(vec!["c".into()])
        .versions(vec![2])
        .aad_fingerprint("f")
        .detail("d");
        let mut expected = Vec::new();
        lp(&mut expected, b"tenant-kms/v1/audit-record");
        expected.extend_from_slice(&5u64.to_be_bytes());
        expected.extend_from_slice(&7i64.to_be_bytes());
        for part in [&b"r"[..], b"token:a", b"p", b"t", b"Encrypt"] {
            lp(&mut expected, part);
        }
        expected.extend_from_slice(&1u32.to_be_bytes());
        lp(&mut expected, b"c");
        expected.extend_from_slice(&1u32.to_be_bytes());
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.extend_from_slice(&1u32.to_be_bytes());
        for part in [&b"ok"[..], b"f", b"d", &[9u8; 32]] {
            lp(&mut expected, part);
        }
        assert_eq!(record.canonical_bytes(5, &[9; 32]), expected);

        // With a trace, the named pair goes before the previous MAC, and changes the MAC input.
        let traced = record
            .clone()
            .trace_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let bytes = traced.canonical_bytes(5, &[9; 32]);
        let cut = expected.len() - 36;
        assert_eq!(bytes[..cut], expected[..cut]);
        let mut tail = Vec::new();
        lp(&mut tail, b"trace_parent");
        lp(&mut tail, traced.trace_parent.as_bytes());
        lp(&mut tail, &[9; 32]);
        assert_eq!(bytes[cut..], tail[..]);
    }
}
