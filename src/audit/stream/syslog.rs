//! The syslog sink: each record as an RFC 5424 message, framed by octet counting (RFC 6587
//! §3.4.1: `LEN SP MSG`), over TCP or a Unix stream socket.
//!
//! Plain syslog over a stream has no acknowledgement, and a write that succeeded may still be
//! lost with a receiver that dies. So each batch goes over a connection of its own that ends
//! with a graceful close: the sink sends the batch, half-closes its side, and counts the batch
//! acknowledged only when the receiver, having read to the end, closes its side too (a
//! receiver that dies first shows as a reset or a timeout, and the batch is sent again).
//!
//! The message: `<PRI>1 TIME HOST tenant-kms PID OPERATION [tenantkms@32473 seq="N"] JSON`,
//! facility 13 (log audit); severity 6 (informational) for an `ok` record, 5 (notice) for
//! any other outcome, 4 (warning) for an `Anomaly` record. MSG is the record's JSON
//! ([`AuditRecord::export_json`]) after a UTF-8 BOM. 32473 is the enterprise number
//! RFC 5612 reserves for documentation: SD-ID `tenantkms@32473` names our parameters without
//! claiming a registered number.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::Sink;
use crate::audit::Outcome;
use crate::audit::record::AuditRecord;
use crate::error::{Error, Result};

/// How long connecting, a write, or the receiver's close may take before the attempt fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 5424 facility 13: log audit.
const FACILITY: u8 = 13;

/// Where the receiver listens (config key `audit_stream_syslog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// `tcp://HOST:PORT`.
    Tcp(String),
    /// `unix:///PATH` (a stream socket).
    Unix(PathBuf),
}

impl SyslogTarget {
    /// Parses `tcp://HOST:PORT` or `unix:///PATH`.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(addr) = text.strip_prefix("tcp://") {
            if addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }) {
                return Ok(Self::Tcp(addr.to_owned()));
            }
        } else if let Some(path) = text.strip_prefix("unix://")
            && path.starts_with('/')
        {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        Err(Error::InvalidArgument(format!(
            "audit_stream_syslog '{text}' is neither tcp://HOST:PORT nor unix:///PATH"
        )))
    }
}

/// The syslog sink.
pub struct SyslogSink {
    target: SyslogTarget,
    host: String,
    pid: u32,
}

impl SyslogSink {
    /// A sink sending to `target`.
    pub fn new(target: SyslogTarget) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or_else(|| "-".to_owned());
        Self {
            target,
            host,
            pid: std::process::id(),
        }
    }

    /// One framed message.
    fn frame(&self, seq: u64, record: &AuditRecord, out: &mut Vec<u8>) -> Result<()> {
        let severity = if record.operation == "Anomaly" {
            4
        } else if record.outcome == Outcome::Ok {
            6
        } else {
            5
        };
        let json = record.export_json(seq);
        let time = json["time"]
            .as_str()
            .filter(|t| !t.is_empty())
            .unwrap_or("-");
        // MSGID: at most 32 printable ASCII characters (RFC 5424 §6).
        let msgid: String = record
            .operation
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(32)
            .collect();
        let msgid = if msgid.is_empty() { "-".into() } else { msgid };
        let mut message = format!(
            "<{}>1 {time} {} tenant-kms {} {msgid} [tenantkms@32473 seq=\"{seq}\"] \u{feff}",
            FACILITY * 8 + severity,
            self.host,
            self.pid
        )
        .into_bytes();
        serde_json::to_writer(&mut message, &json)
            .map_err(|e| Error::Internal(format!("audit stream encoding: {e}")))?;
        out.extend_from_slice(format!("{} ", message.len()).as_bytes());
        out.extend_from_slice(&message);
        Ok(())
    }
}

/// Sends `bytes`, half-closes, and waits for the receiver to close its side.
fn send_and_confirm<S: Read + Write>(
    mut stream: S,
    bytes: &[u8],
    shutdown: impl FnOnce(&S) -> std::io::Result<()>,
) -> std::io::Result<()> {
    stream.write_all(bytes)?;
    stream.flush()?;
    shutdown(&stream)?;
    let mut sink = [0u8; 512];
    loop {
        // The receiver has nothing to say; whatever it sends is read and ignored until EOF.
        if stream.read(&mut sink)? == 0 {
            return Ok(());
        }
    }
}

/// [`send_and_confirm`] over a new TCP connection to `addr`.
fn send_tcp(addr: &str, bytes: &[u8]) -> std::io::Result<()> {
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    send_and_confirm(stream, bytes, |s| s.shutdown(Shutdown::Write))
}

/// [`send_and_confirm`] over a new connection to the Unix stream socket at `path`.
fn send_unix(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    send_and_confirm(stream, bytes, |s| s.shutdown(Shutdown::Write))
}

impl Sink for SyslogSink {
    fn name(&self) -> &'static str {
        "syslog"
    }

    fn deliver(&mut self, records: &[(u64, AuditRecord)]) -> Result<()> {
        let mut bytes = Vec::with_capacity(records.len() * 400);
        for (seq, record) in records {
            self.frame(*seq, record, &mut bytes)?;
        }
        let sent = match &self.target {
            SyslogTarget::Tcp(addr) => send_tcp(addr, &bytes),
            SyslogTarget::Unix(path) => send_unix(path, &bytes),
        };
        sent.map_err(|e| Error::Unavailable(format!("syslog receiver: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            SyslogTarget::parse("tcp://siem.example:6514").unwrap(),
            SyslogTarget::Tcp("siem.example:6514".into())
        );
        assert_eq!(
            SyslogTarget::parse("unix:///run/siem.sock").unwrap(),
            SyslogTarget::Unix("/run/siem.sock".into())
        );
        for bad in [
            "udp://x:1",
            "tcp://x",
            "tcp://:514",
            "tcp://x:0",
            "unix://rel",
            "x",
        ] {
            assert!(SyslogTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_are_rfc5424_with_octet_counting() {
        let sink = SyslogSink::new(SyslogTarget::Tcp("127.0.0.1:1".into()));
        let record = AuditRecord::local(
            crate::audit::operation::Task::Backup,
            "cli:test",
            Outcome::Ok,
        );
        let mut out = Vec::new();
        sink.frame(7, &record, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (len, message) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len());
        assert!(message.starts_with("<110>1 "), "{message}");
        assert!(message.contains(" tenant-kms "), "{message}");
        assert!(
            message.contains(" Backup [tenantkms@32473 seq=\"7\"] \u{feff}{"),
            "{message}"
        );
        let json: serde_json::Value =
            serde_json::from_str(message.split_once('\u{feff}').unwrap().1).unwrap();
        assert_eq!(json["seq"], 7);
    }
}
