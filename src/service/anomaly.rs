//! Turns the detectors' findings (`crate::detect`) into what an operator sees: an `Anomaly`
//! record in the audit chain, the `tenant_kms_anomalies_total{detector}` counter, and one
//! structured log line at WARN (target `tenant_kms::anomaly`).
//!
//! When an anomaly webhook is configured (`crate::webhook`), the alert is queued for it last,
//! with the record's sequence number; queuing never waits.
//!
//! The record names the caller and the tenant (so a per-tenant `ListAuditEvents` or
//! `audit export` finds it), the detector as the context `detector:NAME`, the request that
//! tripped it, and in its detail the figures and any containment applied. Nothing secret is
//! in a finding: names and counts only.
//!
//! The record is appended after the tripping call's own record and before that call is
//! answered, so the chain shows the cause first and a test (or the drill) that sees the
//! answer finds the record. Findings are rare (one per detector, caller and tenant per
//! repeat window), so this wait is not on the common path. An Anomaly record that cannot be
//! written does not fail the call (its own record is durable): it is logged at ERROR and
//! the metric still counts it.

use crate::audit::operation::Task;
use crate::audit::{AuditRecord, Outcome};
use crate::detect::Finding;

use super::state::AppState;

/// The context an Anomaly record names its detector by.
pub fn detector_context(finding: &Finding) -> String {
    format!("detector:{}", finding.detector.name())
}

/// The Anomaly record of `finding`, seen on a call from `peer` with `request_id`.
pub fn record(state: &AppState, finding: &Finding, peer: &str, request_id: &str) -> AuditRecord {
    let mut containment = String::new();
    if finding.throttled {
        let rate = state.detectors.policy().throttle_rate;
        containment.push_str(&format!(
            "; contained: caller throttled to {} calls/s (burst {}) for {}s",
            rate.per_second,
            rate.burst,
            state.detectors.policy().throttle_micros / 1_000_000
        ));
    }
    if finding.quarantine {
        containment.push_str("; contained: token quarantined until an admin releases it");
    }
    AuditRecord::new(Task::Anomaly, finding.caller.clone(), peer, Outcome::Ok)
        .request_id(request_id)
        .tenant(finding.tenant.clone())
        .contexts(vec![detector_context(finding)])
        .detail(format!(
            "detector={}; {}{containment}",
            finding.detector.name(),
            finding.figures
        ))
}

/// The audit caller name of what the server does by itself in containment.
pub const DETECTOR_CALLER: &str = "server:detector";

/// Quarantines the token of `finding`'s caller; the step's audit record, or `None` when
/// there is no token to quarantine (a certificate caller) or the store refused (logged).
/// The authenticator's cache is dropped so the token's next call is refused.
async fn quarantine(state: &AppState, finding: &Finding) -> Option<AuditRecord> {
    let id = finding.caller.strip_prefix("token:")?.to_owned();
    let keys = std::sync::Arc::clone(&state.keys);
    let why = format!("detector {}", finding.detector.name());
    let done = super::blocking(move || {
        super::containment::set_quarantine(&keys, &id, true, DETECTOR_CALLER, &why)
    })
    .await;
    state.auth.clear();
    match done {
        Ok((_, record)) => Some(record),
        Err(e) => {
            tracing::error!(error = %e, "could not quarantine a token after an anomaly");
            None
        }
    }
}

/// Records each finding: metric, log line, audit record (waited for; see the module docs),
/// then applies and records a configured quarantine.
pub async fn report(state: &AppState, findings: Vec<Finding>, peer: &str, request_id: &str) {
    for mut finding in findings {
        let quarantined = if finding.quarantine {
            quarantine(state, &finding).await
        } else {
            None
        };
        finding.quarantine = quarantined.is_some();
        crate::metrics::global().anomaly(finding.detector);
        tracing::warn!(
            target: "tenant_kms::anomaly",
            detector = finding.detector.name(),
            caller = %finding.caller,
            tenant = %finding.tenant,
            figures = %finding.figures,
            throttled = finding.throttled,
            quarantined = finding.quarantine,
            request_id,
            "anomaly detected"
        );
        let anomaly = record(state, &finding, peer, request_id);
        let mut audit_seq = None;
        for (i, record) in std::iter::once(anomaly).chain(quarantined).enumerate() {
            match state.audit.append(record).await {
                Ok(seq) if i == 0 => audit_seq = Some(seq),
                Ok(_) => {}
                Err(e) => tracing::error!(
                    error = %e,
                    detector = finding.detector.name(),
                    "could not write an Anomaly or quarantine audit record"
                ),
            }
        }
        if let Some(webhook) = &state.webhook {
            webhook.send(&crate::webhook::AnomalyEvent {
                finding: &finding,
                peer,
                request_id,
                audit_seq,
                time_micros: state.options.clock.now_micros(),
            });
        }
    }
}
