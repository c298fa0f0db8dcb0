//! The one JSON style of the CLI's output: protobuf's JSON mapping of the response messages,
//! with the protos' own field names (`tenant_id`, as with `preserving_proto_field_name`; every
//! protobuf JSON parser accepts them), every field printed (unset messages as `null`), enums
//! by their proto names (`TENANT_STATE_ACTIVE`), bytes in base64, 64-bit integers as strings,
//! and times in RFC 3339 (UTC, `Z`). One JSON object per line on stdout.

use std::io::Write;

use base64::Engine;
use serde_json::{Value, json};

use tenant_kms_client::pb;

/// Prints `value` as one line on stdout. A closed stdout (a reader that stopped early) ends
/// the output silently instead of panicking.
pub fn print(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
}

/// RFC 3339 text of a timestamp (`null` when unset); a time outside years 1970-9999, which
/// a server never sends, prints as its raw seconds instead of panicking in the formatter.
pub fn timestamp(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref().map_or(Value::Null, |t| {
        Value::String(
            u64::try_from(t.seconds)
                .ok()
                .filter(|&s| s <= 253_402_300_799)
                .map(|s| rfc3339_seconds(s, t.nanos))
                .unwrap_or_else(|| format!("{}s", t.seconds)),
        )
    })
}

/// RFC 3339 text of unix seconds (and nanoseconds, shown when not zero).
fn rfc3339_seconds(seconds: u64, nanos: i32) -> String {
    let time = std::time::UNIX_EPOCH
        + std::time::Duration::new(seconds, u32::try_from(nanos).unwrap_or(0));
    if nanos == 0 {
        humantime::format_rfc3339_seconds(time).to_string()
    } else {
        humantime::format_rfc3339_nanos(time).to_string()
    }
}

/// RFC 3339 text of the current time, for output lines that say when something happened.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Bytes as protobuf JSON writes them: standard base64 with padding.
pub fn bytes(b: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
}

/// A 64-bit integer as protobuf JSON writes it: a string (JavaScript loses precision above
/// 2^53).
pub fn u64_(n: u64) -> Value {
    Value::String(n.to_string())
}

/// A tenant.
pub fn tenant(t: &pb::Tenant) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "state": pb::TenantState::try_from(t.state)
            .unwrap_or(pb::TenantState::Unspecified)
            .as_str_name(),
        "primary_version": t.primary_version,
        "created_at": timestamp(&t.created_at),
        "rotation_policy": t.rotation_policy.as_ref().map(rotation_policy),
        "deletion_time": timestamp(&t.deletion_time),
        "destroyed_at": timestamp(&t.destroyed_at),
    })
}

/// A rotation policy.
pub fn rotation_policy(p: &pb::RotationPolicy) -> Value {
    json!({
        "rotation_period_seconds": u64_(p.rotation_period_seconds),
        "max_encryptions": u64_(p.max_encryptions),
    })
}

/// A key version's metadata.
pub fn key_version(v: &pb::KeyVersion) -> Value {
    json!({
        "version": v.version,
        "state": pb::KeyVersionState::try_from(v.state)
            .unwrap_or(pb::KeyVersionState::Unspecified)
            .as_str_name(),
        "created_at": timestamp(&v.created_at),
        "encryptions": u64_(v.encryptions),
        "primary": v.primary,
    })
}

/// A blind index definition.
pub fn definition(d: &pb::BlindIndexDefinition) -> Value {
    json!({
        "tenant_id": d.tenant_id,
        "name": d.name,
        "bits": d.bits,
        "normalization": d.normalization,
        "created_at": timestamp(&d.created_at),
    })
}

/// One blind index of a value.
pub fn blind_index(i: &pb::BlindIndex) -> Value {
    json!({
        "index_name": i.index_name,
        "key_version": i.key_version,
        "index": bytes(&i.index),
    })
}

/// A batch item's failure: its `google.rpc.Code` and message.
pub fn item_error(e: &pb::ItemError) -> Value {
    json!({ "code": e.code, "message": super::client::flag_names(&e.message) })
}

/// A batch result: `{"output": …}` or `{"error": …}` (the `result` oneof), and whether it
/// succeeded.
pub fn result<T>(
    output: Option<Result<&T, &pb::ItemError>>,
    render: impl Fn(&T) -> Value,
) -> (Value, bool) {
    match output {
        Some(Ok(out)) => (json!({ "output": render(out) }), true),
        Some(Err(e)) => (json!({ "error": item_error(e) }), false),
        None => (
            json!({ "error": { "code": 13, "message": "the server sent no result" } }),
            false,
        ),
    }
}

/// An Encrypt answer.
pub fn encrypt_response(r: &pb::EncryptResponse) -> Value {
    json!({
        "ciphertext": bytes(&r.ciphertext),
        "key_version": r.key_version,
        "blind_indexes": r.blind_indexes.iter().map(blind_index).collect::<Vec<_>>(),
        "other_versions": r.other_versions.iter().map(|o| json!({
            "key_version": o.key_version,
            "ciphertext": bytes(&o.ciphertext),
        })).collect::<Vec<_>>(),
    })
}

/// A Rewrap answer.
pub fn rewrap_response(r: &pb::RewrapResponse) -> Value {
    json!({
        "ciphertext": bytes(&r.ciphertext),
        "key_version": r.key_version,
        "blind_indexes": r.blind_indexes.iter().map(blind_index).collect::<Vec<_>>(),
    })
}

/// An audit event.
pub fn audit_event(e: &pb::AuditEvent) -> Value {
    json!({
        "seq": u64_(e.seq),
        "time": timestamp(&e.time),
        "request_id": e.request_id,
        "caller": e.caller,
        "peer": e.peer,
        "tenant_id": e.tenant_id,
        "operation": e.operation,
        "contexts": e.contexts,
        "key_versions": e.key_versions,
        "item_count": e.item_count,
        "outcome": e.outcome,
        "aad_fingerprint": e.aad_fingerprint,
        "detail": e.detail,
        "trace_parent": e.trace_parent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_unset_ones_null() {
        let t = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(timestamp(&t(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp(&t(1_700_000_000, 5)),
            "2023-11-14T22:13:20.000000005Z"
        );
        assert_eq!(timestamp(&None), Value::Null);
        assert_eq!(timestamp(&t(-1, 0)), "-1s");
    }

    #[test]
    fn sixty_four_bit_integers_are_strings_and_bytes_base64() {
        let v = key_version(&pb::KeyVersion {
            version: 2,
            encryptions: u64::MAX,
            state: pb::KeyVersionState::Enabled as i32,
            ..Default::default()
        });
        assert_eq!(v["encryptions"], "18446744073709551615");
        assert_eq!(v["state"], "KEY_VERSION_STATE_ENABLED");
        assert_eq!(v["version"], 2);
        assert_eq!(bytes(b"\xff\x00"), "/wA=");
    }
}
