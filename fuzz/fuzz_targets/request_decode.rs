//! Fuzzes the decoding and validation of every request message: the first byte picks the
//! message type, the rest is decoded with prost exactly as tonic does, then every field goes
//! through the domain parsers the handlers use (`TenantId::parse`, `Context::parse`,
//! `crypto::format::parse` for ciphertexts, `audit_service::parse_tenant_filter`,
//! `convert::micros_of` for timestamps).
//!
//! Properties: nothing panics; a decoded message re-encodes and decodes to an equal message;
//! whatever a parser accepts satisfies the rule it documents.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tenant_kms::crypto::format::{self, HEADER_LEN, MIN_LEN};
use tenant_kms::domain::{Context, MAX_CONTEXT_LEN, MAX_TENANT_ID_LEN, TenantId};
use tenant_kms::pb;
use tenant_kms::service::audit_service::parse_tenant_filter;
use tenant_kms::service::convert::micros_of;

fn tenant(raw: &str) {
    if let Ok(id) = TenantId::parse(raw) {
        assert_eq!(id.as_str(), raw);
        assert!(!raw.is_empty() && raw.len() <= MAX_TENANT_ID_LEN);
        let first = raw.as_bytes()[0];
        assert!(first.is_ascii_lowercase() || first.is_ascii_digit());
        assert!(
            raw.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
        );
    }
}

fn context(raw: &str) {
    if let Ok(c) = Context::parse(raw) {
        assert_eq!(c.as_str(), raw);
        assert!(!raw.is_empty() && raw.len() <= MAX_CONTEXT_LEN);
        assert!(raw.bytes().all(|c| (0x20..=0x7e).contains(&c)));
    }
}

fn ciphertext(bytes: &[u8]) {
    if let Ok(parsed) = format::parse(bytes) {
        assert!(bytes.len() >= MIN_LEN);
        assert_eq!(&parsed.header.encode(), parsed.header_bytes);
        assert_eq!(parsed.body.len(), bytes.len() - HEADER_LEN);
        assert_ne!(parsed.header.key_version, 0);
    }
}

/// Decodes `M`, runs `validate`, and checks that it re-encodes to an equal message.
fn decode<M: Message + Default + PartialEq>(bytes: &[u8], validate: impl Fn(&M)) {
    let Ok(message) = M::decode(bytes) else {
        return;
    };
    validate(&message);
    let again = M::decode(message.encode_to_vec().as_slice()).expect("re-encoded message decodes");
    assert!(again == message, "re-encoding changed the message");
}

fuzz_target!(|data: &[u8]| {
    let Some((selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 23 {
        0 => decode::<pb::EncryptRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            context(&m.context);
        }),
        1 => decode::<pb::DecryptRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            context(&m.context);
            ciphertext(&m.ciphertext);
        }),
        2 => decode::<pb::EncryptBatchRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            m.items.iter().for_each(|i| context(&i.context));
        }),
        3 => decode::<pb::DecryptBatchRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            for item in &m.items {
                context(&item.context);
                ciphertext(&item.ciphertext);
            }
        }),
        4 => decode::<pb::GenerateDataKeyRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            context(&m.context);
        }),
        5 => decode::<pb::DecryptDataKeyRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            context(&m.context);
            ciphertext(&m.wrapped_key);
        }),
        6 => decode::<pb::RewrapRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            context(&m.context);
            ciphertext(&m.ciphertext);
        }),
        7 => decode::<pb::RewrapBatchRequest>(bytes, |m| {
            tenant(&m.tenant_id);
            for item in &m.items {
                context(&item.context);
                ciphertext(&item.ciphertext);
            }
        }),
        8 => decode::<pb::CreateTenantRequest>(bytes, |m| tenant(&m.tenant_id)),
        9 => decode::<pb::GetTenantRequest>(bytes, |m| tenant(&m.tenant_id)),
        10 => decode::<pb::ListTenantsRequest>(bytes, |m| tenant(&m.page_token)),
        11 => decode::<pb::RotateTenantKeyRequest>(bytes, |m| tenant(&m.tenant_id)),
        12 => decode::<pb::ListKeyVersionsRequest>(bytes, |m| tenant(&m.tenant_id)),
        13 => decode::<pb::DisableKeyVersionRequest>(bytes, |m| tenant(&m.tenant_id)),
        14 => decode::<pb::EnableKeyVersionRequest>(bytes, |m| tenant(&m.tenant_id)),
        15 => decode::<pb::DestroyKeyVersionRequest>(bytes, |m| tenant(&m.tenant_id)),
        16 => decode::<pb::SetRotationPolicyRequest>(bytes, |m| tenant(&m.tenant_id)),
        17 => decode::<pb::SuspendTenantRequest>(bytes, |m| tenant(&m.tenant_id)),
        18 => decode::<pb::ResumeTenantRequest>(bytes, |m| tenant(&m.tenant_id)),
        19 => decode::<pb::ScheduleTenantDeletionRequest>(bytes, |m| tenant(&m.tenant_id)),
        20 => decode::<pb::CancelTenantDeletionRequest>(bytes, |m| tenant(&m.tenant_id)),
        21 => decode::<pb::ListAuditEventsRequest>(bytes, |m| {
            let _ = parse_tenant_filter(&m.tenant_id);
            let _ = m.page_token.parse::<u64>();
            if let (Some(since), Some(until)) = (&m.since, &m.until) {
                let _ = micros_of(since) <= micros_of(until);
            }
        }),
        _ => decode::<pb::VerifyAuditChainRequest>(bytes, |_| {}),
    }
});
