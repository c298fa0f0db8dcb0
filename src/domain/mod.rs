//! Domain types that protobuf input is parsed into at the service boundary ("parse, don't
//! validate"): past the handlers nothing handles raw strings.

pub mod hex;
pub mod index;
pub mod lifecycle;

use std::fmt;

use crate::error::Error;

/// Longest tenant id, in characters.
pub const MAX_TENANT_ID_LEN: usize = 64;
/// Longest context, in characters.
pub const MAX_CONTEXT_LEN: usize = 128;

/// A tenant id: 1–64 characters of `[a-z0-9][a-z0-9_-]*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Parses a tenant id, or says what is wrong with it (without echoing long input).
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let valid_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let valid_rest = |c: u8| valid_first(c) || c == b'_' || c == b'-';
        let bytes = raw.as_bytes();
        let ok = match bytes.split_first() {
            None => false,
            Some((first, rest)) => {
                bytes.len() <= MAX_TENANT_ID_LEN
                    && valid_first(*first)
                    && rest.iter().all(|c| valid_rest(*c))
            }
        };
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::InvalidArgument(
                "tenant_id must be 1-64 characters of [a-z0-9][a-z0-9_-]*".into(),
            ))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a value is, e.g. `crm.contacts.email`: 1–128 printable ASCII characters (0x20–0x7e).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Context(String);

impl Context {
    /// Parses a context.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        if !raw.is_empty()
            && raw.len() <= MAX_CONTEXT_LEN
            && raw.bytes().all(|c| (0x20..=0x7e).contains(&c))
        {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::InvalidArgument(
                "context must be 1-128 printable ASCII characters".into(),
            ))
        }
    }

    /// The context.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's lifecycle state (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TenantState {
    /// Serves crypto calls.
    Active,
    /// Temporarily refused; can be resumed.
    Suspended,
    /// Refused; destroyed when the waiting window passes unless cancelled.
    PendingDeletion,
    /// Final: key material is gone, the row is a tombstone.
    Destroyed,
}

impl TenantState {
    /// The stored code.
    pub fn code(self) -> i64 {
        match self {
            TenantState::Active => 1,
            TenantState::Suspended => 2,
            TenantState::PendingDeletion => 3,
            TenantState::Destroyed => 4,
        }
    }

    /// Decodes a stored code.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(TenantState::Active),
            2 => Some(TenantState::Suspended),
            3 => Some(TenantState::PendingDeletion),
            4 => Some(TenantState::Destroyed),
            _ => None,
        }
    }

    /// The name used in messages and logs: the API's `TenantState` value without its prefix,
    /// so a FAILED_PRECONDITION message names the state exactly as clients see it.
    pub fn name(self) -> &'static str {
        match self {
            TenantState::Active => "ACTIVE",
            TenantState::Suspended => "SUSPENDED",
            TenantState::PendingDeletion => "PENDING_DELETION",
            TenantState::Destroyed => "DESTROYED",
        }
    }
}

/// A key version's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyVersionState {
    /// Decrypts; the primary one also encrypts.
    Enabled,
    /// Refuses decryption until enabled again.
    Disabled,
    /// Key bytes deleted for good.
    Destroyed,
}

impl KeyVersionState {
    /// The stored code.
    pub fn code(self) -> i64 {
        match self {
            KeyVersionState::Enabled => 1,
            KeyVersionState::Disabled => 2,
            KeyVersionState::Destroyed => 3,
        }
    }

    /// Decodes a stored code.
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(KeyVersionState::Enabled),
            2 => Some(KeyVersionState::Disabled),
            3 => Some(KeyVersionState::Destroyed),
            _ => None,
        }
    }

    /// The name used in messages: the API's `KeyVersionState` value without its prefix.
    pub fn name(self) -> &'static str {
        match self {
            KeyVersionState::Enabled => "ENABLED",
            KeyVersionState::Disabled => "DISABLED",
            KeyVersionState::Destroyed => "DESTROYED",
        }
    }
}

/// The longest duration an API field, a CLI flag or a configuration value may name, in
/// seconds: 3650 days (ten years). Deletion windows (AWS KMS allows 7–30 days), rotation
/// periods and token lifetimes longer than that are mistakes, and bounding them keeps every
/// time computed from them (now + duration) far inside the range of a protobuf `Timestamp`
/// and of `i64` (issue 13: a window of 10^11 days was stored and broke every reader).
pub const MAX_DURATION_SECONDS: u64 = 3650 * 86_400;

/// `seconds` if it is at most [`MAX_DURATION_SECONDS`]; otherwise INVALID_ARGUMENT naming
/// `what` and the bound.
pub fn bounded_duration(what: &str, seconds: u64) -> Result<u64, Error> {
    if seconds > MAX_DURATION_SECONDS {
        return Err(Error::InvalidArgument(format!(
            "{what} may be at most {MAX_DURATION_SECONDS} seconds (3650 days)"
        )));
    }
    Ok(seconds)
}

/// Seconds since the Unix epoch, now, from the OS clock: the implementation of
/// [`crate::clock::SystemClock`]. Whatever decides by time asks the [`crate::clock::Clock`] it
/// was given instead; only timestamps that decide nothing (audit record times, backup
/// manifests) still read this directly.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch, now, from the OS clock (see [`unix_now`] for who
/// should call it).
pub fn unix_now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded() {
        assert_eq!(bounded_duration("x", 0).unwrap(), 0);
        assert_eq!(
            bounded_duration("x", MAX_DURATION_SECONDS).unwrap(),
            MAX_DURATION_SECONDS
        );
        for bad in [MAX_DURATION_SECONDS + 1, 1 << 63, u64::MAX] {
            let err = bounded_duration("waiting_period_seconds", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)));
            assert!(err.to_string().contains("waiting_period_seconds"), "{err}");
        }
    }

    #[test]
    fn tenant_ids() {
        for ok in ["a", "acme", "a-b_c", "0", &"x".repeat(64)] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "_a", "A", "a b", "a.b", "é", &"x".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn contexts() {
        assert!(Context::parse("crm.contacts.email").is_ok());
        assert!(Context::parse(" spaced ok ~").is_ok());
        assert!(Context::parse(&"c".repeat(128)).is_ok());
        for bad in ["", "tab\there", "nl\n", "é", &"c".repeat(129)] {
            assert!(Context::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn state_codes_round_trip() {
        for s in [
            TenantState::Active,
            TenantState::Suspended,
            TenantState::PendingDeletion,
            TenantState::Destroyed,
        ] {
            assert_eq!(TenantState::from_code(s.code()), Some(s));
        }
        for s in [
            KeyVersionState::Enabled,
            KeyVersionState::Disabled,
            KeyVersionState::Destroyed,
        ] {
            assert_eq!(KeyVersionState::from_code(s.code()), Some(s));
        }
    }
}
