//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` header a
//! caller sends so that this service's log lines and audit record join the caller's trace.
//!
//! A header that does not parse is ignored, as the specification says a receiver must: the
//! call goes on without a trace (it is never refused for it).

/// A validated `traceparent`: the trace id and the caller's span id (the parent of this
/// call), in lowercase hex as the header carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 16 bytes, 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span: 8 bytes, 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value (§3.2 of the specification): `version-traceid-parentid-
    /// flags`, lowercase hex, version `ff` invalid, all-zero ids invalid; version 00 has
    /// exactly these four fields, a later version may append more after a `-`, which are
    /// skipped. `None` for anything else.
    pub fn parse(header: &str) -> Option<Self> {
        let bytes = header.as_bytes();
        if bytes.len() < 55 {
            return None;
        }
        let version = header.get(0..2)?;
        if !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if version == "00" && bytes.len() != 55 {
            return None;
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = header.get(3..35)?;
        let parent_id = header.get(36..52)?;
        let flags = header.get(53..55)?;
        if !is_lower_hex(trace_id) || !is_lower_hex(parent_id) || !is_lower_hex(flags) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// The version-00 header form, as recorded in the audit trail.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_parses() {
        let t = TraceParent::parse(VALID).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.header(), VALID);
    }

    #[test]
    fn a_later_version_may_append_fields() {
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-says";
        let t = TraceParent::parse(later).unwrap();
        assert_eq!(
            t.header(),
            VALID,
            "recorded in the version it is understood as"
        );
        assert!(
            TraceParent::parse(&format!("{VALID}-more")).is_none(),
            "00 has four fields"
        );
        assert!(
            TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x")
                .is_none()
        );
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for bad in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01a",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9\u{e9}b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
