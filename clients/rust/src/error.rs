//! The client's one error type.

use std::fmt;

/// Result of every fallible client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong. No variant carries key material or plaintext.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The client's own settings are unusable (an address, a file, a token); names what.
    Config(String),
    /// The server could not be reached: `failure` says why in a way a program can branch on
    /// (refused, timed out, which TLS check failed); `detail` is the transport's own text,
    /// with the address.
    Connect {
        /// Why, classified.
        failure: ConnectFailure,
        /// The address and the transport's error chain, for people.
        detail: String,
    },
    /// The server answered with a gRPC status (after any retries the call allowed).
    Rpc(tonic::Status),
    /// Envelope input that is not in the format of docs/ENVELOPE.md (wrong magic or version,
    /// impossible lengths), or whose header names another tenant or context than the caller
    /// expects.
    Format(String),
    /// An envelope that does not open: a segment failed authentication, or the stream was
    /// truncated, reordered or extended. One error whatever the cause (no oracle).
    Decrypt,
    /// Reading the input or writing the output failed.
    Io(std::io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) => write!(f, "client settings: {m}"),
            Error::Connect { failure, detail } => {
                write!(f, "cannot connect ({}): {detail}", failure.as_str())
            }
            Error::Rpc(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            Error::Format(m) => write!(f, "not a tenant-kms envelope: {m}"),
            Error::Decrypt => f.write_str("the envelope does not open"),
            Error::Io(e) => write!(f, "I/O: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Rpc(s) => Some(s),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rpc(status)
    }
}

impl From<std::io::Error> for Error {
    /// An I/O error that wraps one of ours (raised inside a `Read`/`Write` adapter) is
    /// unwrapped back to it, so an envelope that does not open stays [`Error::Decrypt`].
    fn from(e: std::io::Error) -> Self {
        if !e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::Io(e);
        }
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(ours)) => *ours,
            // Checked just above: the inner error is one of ours.
            _ => Error::Decrypt,
        }
    }
}

impl From<Error> for std::io::Error {
    /// For the `Read`/`Write` adapters of the envelope; [`From<std::io::Error>`] undoes it.
    fn from(e: Error) -> Self {
        match e {
            Error::Io(io) => io,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// Why a connection could not be made, read from the transport's error chain (tonic and
/// rustls do not expose these as types through `tonic::transport::Error`, so the chain's text
/// is matched: rustls' `Debug` names are stable within its 0.23 series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// Nothing listens at the address (TCP connection refused).
    Refused,
    /// The connection or the TLS handshake did not complete within the connect timeout.
    TimedOut,
    /// The server's certificate does not chain to the configured CA.
    UnknownCa,
    /// The server's certificate is not valid for the host name or address connected to.
    NameMismatch,
    /// The server's certificate has expired or is not yet valid.
    Expired,
    /// The peer did not answer TLS (a plaintext server at an `https://` address).
    NotTls,
    /// The server requires a client certificate and none (or none it accepts) was sent.
    CertificateRequired,
    /// Anything else; the detail says what.
    Other,
}

impl ConnectFailure {
    /// A short name for messages (`"connection refused"`, `"TLS: unknown CA"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "connection refused",
            ConnectFailure::TimedOut => "timed out",
            ConnectFailure::UnknownCa => "TLS: unknown CA",
            ConnectFailure::NameMismatch => "TLS: name mismatch",
            ConnectFailure::Expired => "TLS: certificate expired",
            ConnectFailure::NotTls => "TLS: the server did not answer TLS",
            ConnectFailure::CertificateRequired => "TLS: client certificate required",
            ConnectFailure::Other => "transport error",
        }
    }

    /// Classifies a failed connection by its error chain (each error's `Debug` and
    /// `Display`, outermost first).
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut text = String::new();
        let mut refused = false;
        let mut source = Some(error);
        while let Some(e) = source {
            text.push_str(&format!("{e:?} {e} | "));
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
            }
            source = e.source();
        }
        let has = |needle: &str| text.contains(needle);
        if has("UnknownIssuer") || has("UnknownCA") {
            ConnectFailure::UnknownCa
        } else if has("NotValidForName") {
            ConnectFailure::NameMismatch
        } else if has("Expired") {
            ConnectFailure::Expired
        } else if has("InvalidContentType") || has("CorruptMessage") {
            ConnectFailure::NotTls
        } else if has("CertificateRequired") || has("certificate required") {
            ConnectFailure::CertificateRequired
        } else if refused {
            ConnectFailure::Refused
        } else if has("timed out") || has("TimedOut") || has("Elapsed") {
            ConnectFailure::TimedOut
        } else {
            ConnectFailure::Other
        }
    }
}

/// The text of an error and its sources, outermost first (a transport error's own text is
/// often just "transport error"; the cause is further down).
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
