//! TLS on the serving port, done here rather than by tonic so that ALPN offers `h2` **and**
//! `http/1.1`: tonic's own acceptor offers `h2` only, so an HTTP/1.1 client over TLS (curl
//! `--http1.1`, most REST connectors) could not reach the HTTP/JSON API (`rest`). The server
//! prefers `h2` (gRPC clients require it); the connection is then served by the same hyper
//! "auto" connection as plaintext ones, which reads the HTTP version from the first bytes.
//! gRPC over HTTP/1.1 is refused by the gateway with a clear status (`rest`).
//!
//! What tonic's acceptor guaranteed is kept: rustls with the ring provider, TLS 1.2 and 1.3,
//! client certificates required and verified against the client CA when one is named, each
//! handshake in its own task (one slow peer delays nobody) and bounded by the handshake
//! timeout. The accepted stream is a `tokio_rustls` server stream, whose connect info tonic
//! records as `TlsConnectInfo` (peer address and certificates), as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use zeroize::Zeroizing;

use super::state::TlsFiles;
use crate::error::{Error, Result};

/// The ALPN protocols offered, in the server's order of preference (RFC 7301): HTTP/2 for
/// gRPC and HTTP/2 clients of the HTTP/JSON API, HTTP/1.1 for the others.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The rustls server configuration (ring provider, TLS 1.2 and 1.3, [`ALPN_PROTOCOLS`]) from
/// the PEM files. With a client CA, client certificates are required and verified against it
/// (chain, validity period, key usage); a connection without one fails the handshake.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map(Zeroizing::new).map_err(|e| {
            Error::FailedPrecondition(format!("cannot read {what} {}: {e}", path.display()))
        })
    };
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::FailedPrecondition(format!("TLS configuration: {what}: {e}"))
    };
    let cert_pem = read(&files.cert, "TLS certificate")?;
    let key_pem = read(&files.key, "TLS key")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("the certificate file", &e))?;
    if chain.is_empty() {
        return Err(bad("the certificate file", &"no certificate in it"));
    }
    // The parse error names no byte of the key (rustls-pki-types reports the PEM section).
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("the key file", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_pem = read(path, "client CA")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&ca_pem) {
                let cert = cert.map_err(|e| bad("the client CA file", &e))?;
                roots.add(cert).map_err(|e| bad("the client CA file", &e))?;
            }
            if roots.is_empty() {
                return Err(bad("the client CA file", &"no certificate in it"));
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| bad("the client CA file", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("the certificate and key", &e))?;
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

type Handshake<IO> = Pin<Box<dyn Future<Output = io::Result<TlsStream<IO>>> + Send>>;

/// The accepted connections of `incoming` after their TLS handshakes: each handshake runs in
/// its own task, bounded by `timeout`; failed ones are logged (debug) and dropped. Polled by
/// the server's accept loop; dropping it aborts the handshakes in progress.
pub struct TlsIncoming<S, IO> {
    incoming: Pin<Box<S>>,
    acceptor: TlsAcceptor,
    timeout: Duration,
    handshakes: JoinSet<io::Result<TlsStream<IO>>>,
    incoming_done: bool,
}

impl<S, IO> TlsIncoming<S, IO>
where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Handshakes on the connections of `incoming` with `config`.
    pub fn new(incoming: S, config: Arc<rustls::ServerConfig>, timeout: Duration) -> Self {
        Self {
            incoming: Box::pin(incoming),
            acceptor: TlsAcceptor::from(config),
            timeout,
            handshakes: JoinSet::new(),
            incoming_done: false,
        }
    }

    fn handshake(&self, io: IO) -> Handshake<IO> {
        let accept = self.acceptor.accept(io);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, accept).await {
                Ok(accepted) => accepted,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake not done within the handshake timeout",
                )),
            }
        })
    }
}

impl<S, IO> Stream for TlsIncoming<S, IO>
where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Item = io::Result<TlsStream<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every connection accepted so far starts its handshake now.
        while !self.incoming_done {
            match self.incoming.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => {
                    let handshake = self.handshake(io);
                    self.handshakes.spawn(handshake);
                }
                // An accept error (too many open files, …) is the server's to report.
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.incoming_done = true,
                Poll::Pending => break,
            }
        }
        loop {
            match self.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(Ok(Err(e)))) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "TLS handshake task ended");
                }
                Poll::Ready(None) if self.incoming_done => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn unreadable_or_empty_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let files = TlsFiles {
            cert: dir.path().join("missing.pem"),
            key: empty.clone(),
            client_ca: None,
        };
        let missing = server_config(&files).err().unwrap().to_string();
        assert!(missing.contains("missing.pem"), "{missing}");
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty,
            client_ca: None,
        };
        let none = server_config(&files).err().unwrap().to_string();
        assert!(none.contains("no certificate"), "{none}");
    }
}
