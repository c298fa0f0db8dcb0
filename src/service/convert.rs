//! Conversions between store records and protobuf messages.

use crate::domain::{KeyVersionState, TenantState};
use crate::pb;
use crate::store::{KeyVersionRecord, TenantRecord};

/// The earliest second a protobuf `Timestamp` may hold: 0001-01-01T00:00:00Z.
pub const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
/// The latest second a protobuf `Timestamp` may hold: 9999-12-31T23:59:59Z.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// A protobuf timestamp from unix seconds, saturated to the range a `Timestamp` may hold
/// (google/protobuf/timestamp.proto), so that no value the store holds, however it got
/// there, yields a message a client cannot parse.
pub fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: seconds.clamp(MIN_TIMESTAMP_SECONDS, MAX_TIMESTAMP_SECONDS),
        nanos: 0,
    }
}

/// A protobuf timestamp from unix microseconds, saturated like [`timestamp`].
pub fn timestamp_micros(micros: i64) -> prost_types::Timestamp {
    let seconds = micros.div_euclid(1_000_000);
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&seconds) {
        return timestamp(seconds);
    }
    prost_types::Timestamp {
        seconds,
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Unix microseconds from a protobuf timestamp.
pub fn micros_of(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

fn tenant_state(state: TenantState) -> pb::TenantState {
    match state {
        TenantState::Active => pb::TenantState::Active,
        TenantState::Suspended => pb::TenantState::Suspended,
        TenantState::PendingDeletion => pb::TenantState::PendingDeletion,
        TenantState::Destroyed => pb::TenantState::Destroyed,
    }
}

fn version_state(state: KeyVersionState) -> pb::KeyVersionState {
    match state {
        KeyVersionState::Enabled => pb::KeyVersionState::Enabled,
        KeyVersionState::Disabled => pb::KeyVersionState::Disabled,
        KeyVersionState::Destroyed => pb::KeyVersionState::Destroyed,
    }
}

/// The `Tenant` message of a record.
pub fn tenant(record: &TenantRecord) -> pb::Tenant {
    pb::Tenant {
        tenant_id: record.tenant_id.as_str().to_owned(),
        state: tenant_state(record.state) as i32,
        primary_version: record.primary_version,
        created_at: Some(timestamp(record.created_at)),
        rotation_policy: Some(pb::RotationPolicy {
            rotation_period_seconds: record.rotation_period_seconds,
            max_encryptions: record.max_encryptions,
        }),
        deletion_time: record.deletion_time.map(timestamp),
        destroyed_at: record.destroyed_at.map(timestamp),
    }
}

/// The `KeyVersion` message of a record (metadata only).
pub fn key_version(record: &KeyVersionRecord, primary: u32) -> pb::KeyVersion {
    pb::KeyVersion {
        version: record.version,
        state: version_state(record.state) as i32,
        created_at: Some(timestamp(record.created_at)),
        encryptions: record.encryptions,
        primary: record.version == primary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_saturate_to_the_protobuf_range() {
        assert_eq!(timestamp(1_700_000_000).seconds, 1_700_000_000);
        assert_eq!(timestamp(i64::MAX).seconds, MAX_TIMESTAMP_SECONDS);
        assert_eq!(timestamp(i64::MIN).seconds, MIN_TIMESTAMP_SECONDS);
        let ts = timestamp_micros(i64::MAX);
        assert_eq!((ts.seconds, ts.nanos), (MAX_TIMESTAMP_SECONDS, 0));
        let ts = timestamp_micros(1_500_000);
        assert_eq!((ts.seconds, ts.nanos), (1, 500_000_000));
    }
}
