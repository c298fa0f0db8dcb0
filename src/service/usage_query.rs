//! `AuditService.GetUsage`: a tenant's usage over a time range, read from the usage meter
//! (stored minutes plus those not flushed yet) on the blocking pool.

use std::sync::Arc;

use super::state::AppState;
use super::{blocking, convert};
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::pb;
use crate::usage::{UsageCounts, is_decrypt_failure, is_decrypt_operation};

/// A request time as Unix microseconds; INVALID_ARGUMENT when it is not a valid `Timestamp`.
fn request_micros(name: &str, ts: &prost_types::Timestamp) -> Result<i64> {
    let seconds_ok =
        (convert::MIN_TIMESTAMP_SECONDS..=convert::MAX_TIMESTAMP_SECONDS).contains(&ts.seconds);
    if !seconds_ok || !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::InvalidArgument(format!(
            "{name} is not a valid time"
        )));
    }
    Ok(convert::micros_of(ts))
}

/// The minute-aligned `[since, until)` range, in Unix seconds, a request asks for.
fn range(req: &pb::GetUsageRequest, now_micros: i64) -> Result<(i64, i64)> {
    let since = match &req.since {
        Some(ts) => crate::usage::minute_of(request_micros("since", ts)?),
        None => crate::usage::minute_of(convert::MIN_TIMESTAMP_SECONDS * 1_000_000),
    };
    let until_micros = match &req.until {
        Some(ts) => request_micros("until", ts)?,
        // Up to now, the current minute included.
        None => now_micros.saturating_add(1),
    };
    // Rounded up: a minute counts when it starts before `until`.
    let until = crate::usage::minute_of(until_micros.saturating_add(59_999_999));
    if until <= since {
        return Err(Error::InvalidArgument(
            "the time range is empty: until must be after since".into(),
        ));
    }
    Ok((since, until))
}

/// Answers `GetUsage` for an admitted call on `tenant`.
pub async fn get_usage(
    state: &AppState,
    tenant: &TenantId,
    req: &pb::GetUsageRequest,
) -> Result<pb::GetUsageResponse> {
    let (since, until) = range(req, state.options.clock.now_micros())?;
    let meter = Arc::clone(&state.usage);
    let tenant = tenant.as_str().to_owned();
    let sums = blocking(move || meter.query(&tenant, since, until)).await?;
    let mut total = UsageCounts::default();
    let mut denials = 0u64;
    let mut decrypt_failures = 0u64;
    let entries = sums
        .into_iter()
        .map(|sum| {
            let c = sum.counts;
            total.add(&c);
            if sum.outcome == "denied" {
                denials = denials.saturating_add(c.calls);
            }
            if is_decrypt_failure(&sum.operation, &sum.outcome) {
                decrypt_failures = decrypt_failures.saturating_add(c.calls);
            }
            if is_decrypt_operation(&sum.operation) {
                decrypt_failures = decrypt_failures.saturating_add(c.failed_items);
            }
            pb::UsageEntry {
                caller: sum.caller,
                operation: sum.operation,
                outcome: sum.outcome,
                calls: c.calls,
                items: c.items,
                failed_items: c.failed_items,
                request_bytes: c.request_bytes,
                response_bytes: c.response_bytes,
            }
        })
        .collect();
    Ok(pb::GetUsageResponse {
        entries,
        calls: total.calls,
        items: total.items,
        request_bytes: total.request_bytes,
        response_bytes: total.response_bytes,
        denials,
        decrypt_failures,
        since: Some(convert::timestamp(since)),
        until: Some(convert::timestamp(until)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn ranges_are_whole_minutes_and_never_empty() {
        let req = |since, until| pb::GetUsageRequest {
            tenant_id: "t".into(),
            since,
            until,
        };
        assert_eq!(range(&req(ts(90, 0), ts(150, 0)), 0).unwrap(), (60, 180));
        assert_eq!(range(&req(ts(60, 0), ts(120, 0)), 0).unwrap(), (60, 120));
        assert_eq!(
            range(&req(ts(120, 0), None), 130_000_000).unwrap(),
            (120, 180)
        );
        assert!(range(&req(ts(120, 0), ts(120, 0)), 0).is_err());
        assert!(range(&req(ts(180, 0), ts(120, 0)), 0).is_err());
        assert!(range(&req(ts(0, -1), None), 0).is_err());
        assert!(range(&req(ts(i64::MAX, 0), None), 0).is_err());
    }
}
