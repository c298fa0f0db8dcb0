//! The JSON an alert carries: the anomaly's fields as the Anomaly audit record names them,
//! and nothing else. A [`Finding`] holds names and counts only (`crate::detect`), so no
//! token, AAD, plaintext or ciphertext can reach the body: the caller is its audit name
//! (`token:<id>`, the id is not the secret), the peer an address.

use crate::detect::Finding;

/// Version of the body's layout (`"version"`), raised if a field changes meaning.
pub const VERSION: u32 = 1;

/// What is known of an anomaly when it is reported.
pub struct AnomalyEvent<'a> {
    /// The finding.
    pub finding: &'a Finding,
    /// The peer address of the call that tripped it.
    pub peer: &'a str,
    /// The request id of that call.
    pub request_id: &'a str,
    /// The Anomaly record's sequence number in the audit chain of the node that found it
    /// (`None` if it could not be written); `request_id` finds it in any node's chain.
    pub audit_seq: Option<u64>,
    /// When it was found (µs since the Unix epoch, the server's clock).
    pub time_micros: i64,
}

/// The body of the alert for `event` with delivery id `delivery`: one JSON object.
pub fn body(event: &AnomalyEvent<'_>, delivery: &str) -> Vec<u8> {
    let f = event.finding;
    let value = serde_json::json!({
        "version": VERSION,
        "event": "anomaly",
        "delivery": delivery,
        "detector": f.detector.name(),
        "caller": f.caller,
        "tenant_id": f.tenant,
        "peer": event.peer,
        "figures": f.figures,
        "throttled": f.throttled,
        "quarantined": f.quarantine,
        "request_id": event.request_id,
        "audit_seq": event.audit_seq,
        "time": crate::clock::rfc3339_micros(event.time_micros),
        "time_us": event.time_micros,
    });
    value.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Detector;

    #[test]
    fn the_body_names_the_anomaly() {
        let finding = Finding {
            detector: Detector::Probing,
            caller: "token:00ff".into(),
            tenant: "acme".into(),
            figures: "refused_tenants=3".into(),
            throttled: false,
            quarantine: true,
        };
        let event = AnomalyEvent {
            finding: &finding,
            peer: "10.0.0.7",
            request_id: "r1",
            audit_seq: Some(42),
            time_micros: 1_900_000_000_000_001,
        };
        let json: serde_json::Value = serde_json::from_slice(&body(&event, "d1")).unwrap();
        assert_eq!(json["detector"], "probing");
        assert_eq!(json["caller"], "token:00ff");
        assert_eq!(json["tenant_id"], "acme");
        assert_eq!(json["peer"], "10.0.0.7");
        assert_eq!(json["quarantined"], true);
        assert_eq!(json["audit_seq"], 42);
        assert_eq!(json["delivery"], "d1");
        assert_eq!(json["time"], "2030-03-17T17:46:40.000001Z");
        assert_eq!(json.as_object().unwrap().len(), 14);
    }
}
