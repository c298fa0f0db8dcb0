//! One delivery attempt: a POST over HTTP/1.1 with hyper's client connection API (hyper is
//! already built for tonic), on a connection of its own, plain TCP for `http://` or rustls
//! (tokio-rustls, also already built for tonic) for `https://`, trusting only the CA the
//! operator names. Alerts are rare, so there is no connection pool: each attempt connects,
//! sends, reads the status line and closes, all within one timeout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use rustls_pki_types::ServerName;

use crate::error::{Error, Result};

/// Where alerts go: a parsed `http://` or `https://` URL.
pub struct Target {
    /// `scheme://host:port`, for logs: the path is left out because alerting services often
    /// put their own credential in it.
    shown: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

/// What one attempt ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx answer.
    Delivered,
    /// An answer or a failure worth trying again (5xx, 408, 429, no connection, a timeout).
    Retry(String),
    /// An answer that will not change by retrying (another 4xx: a wrong URL or secret).
    GiveUp(String),
}

impl Target {
    /// Parses `url`; `https://` needs `tls_ca` (PEM: the CA the endpoint's certificate must
    /// chain to). INVALID_ARGUMENT for a URL that is not `http(s)://host[:port][/path]` or
    /// that carries user credentials (the signature authenticates us; put a receiver's own
    /// token in its path if it needs one).
    pub fn new(url: &str, tls_ca: Option<&Path>) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::InvalidArgument(format!(
                "anomaly_webhook_url: {why} (expected http://HOST[:PORT]/PATH or \
                 https://HOST[:PORT]/PATH)"
            )))
        };
        let Ok(uri) = url.trim().parse::<hyper::Uri>() else {
            return bad("not a URL");
        };
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return bad("the scheme must be http or https"),
        };
        let Some(authority) = uri.authority() else {
            return bad("no host");
        };
        if authority.as_str().contains('@') {
            return bad("credentials in the URL are refused");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return bad("no host");
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let tls = match (https, tls_ca) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "anomaly_webhook_tls_ca is set but anomaly_webhook_url is not https://".into(),
                ));
            }
            (true, None) => {
                return Err(Error::InvalidArgument(
                    "an https:// anomaly_webhook_url needs anomaly_webhook_tls_ca (the CA that \
                     signs the endpoint's certificate; no system roots are trusted)"
                        .into(),
                ));
            }
            (true, Some(ca)) => {
                let roots = crate::tls_client::roots_from_pem_file("the webhook CA", ca)?;
                let config = crate::tls_client::client_config(roots)?;
                let name = ServerName::try_from(host.clone()).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "anomaly_webhook_url: '{host}' is not a host name a certificate can name"
                    ))
                })?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Self {
            shown: format!("{}://{}", if https { "https" } else { "http" }, authority),
            host,
            port,
            authority: authority.as_str().to_owned(),
            path,
            tls,
        })
    }

    /// `scheme://host:port` (no path), for logs.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether alerts travel in clear to another machine (the caller logs a warning).
    pub fn plaintext_off_host(&self) -> bool {
        self.tls.is_none() && !matches!(self.host.as_str(), "localhost" | "127.0.0.1" | "::1")
    }

    /// POSTs `body` with `headers` (JSON content type added), within `timeout` for the
    /// whole attempt (connect, TLS, send, status line).
    pub async fn post(
        &self,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Attempt {
        let mut request = hyper::Request::post(self.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("tenant-kms/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let request = match request.body(Full::new(body)) {
            Ok(request) => request,
            Err(e) => return Attempt::GiveUp(format!("cannot build the request: {e}")),
        };
        match tokio::time::timeout(timeout, self.exchange(request)).await {
            Err(_) => Attempt::Retry(format!("no answer within {}s", timeout.as_secs_f64())),
            Ok(Err(why)) => Attempt::Retry(why),
            Ok(Ok(status)) if status.is_success() => Attempt::Delivered,
            Ok(Ok(status))
                if status.is_server_error()
                    || status == hyper::StatusCode::REQUEST_TIMEOUT
                    || status == hyper::StatusCode::TOO_MANY_REQUESTS =>
            {
                Attempt::Retry(format!("answered {status}"))
            }
            Ok(Ok(status)) => Attempt::GiveUp(format!("answered {status}")),
        }
    }

    async fn exchange(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> std::result::Result<hyper::StatusCode, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        match &self.tls {
            None => send(hyper_util::rt::TokioIo::new(tcp), request).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                send(hyper_util::rt::TokioIo::new(tls), request).await
            }
        }
    }
}

/// Sends `request` on a fresh HTTP/1.1 connection over `io` and returns the answer's status.
/// The connection is driven only until the status line arrives and closed when this returns
/// (the body of the answer is not needed).
async fn send<I>(
    io: I,
    request: hyper::Request<Full<Bytes>>,
) -> std::result::Result<hyper::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    tokio::pin!(connection);
    tokio::select! {
        answer = sender.send_request(request) => answer
            .map(|response| response.status())
            .map_err(|e| format!("request failed: {e}")),
        ended = &mut connection => Err(match ended {
            Ok(()) => "the connection closed before an answer".to_owned(),
            Err(e) => format!("the connection failed: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_bad_ones_named() {
        let t = Target::new("http://127.0.0.1:9000/hooks/kms?x=1", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        assert_eq!(t.path, "/hooks/kms?x=1");
        assert_eq!(t.shown(), "http://127.0.0.1:9000");
        assert!(!t.plaintext_off_host());
        let t = Target::new("http://[::1]/", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert!(
            Target::new("http://alerts.example/x", None)
                .unwrap()
                .plaintext_off_host()
        );
        for bad in [
            "ftp://host/x",
            "alerts.example/x",
            "http://user:pw@host/x",
            "https://host/x",
            "not a url",
        ] {
            let err = Target::new(bad, None).err().unwrap().to_string();
            assert!(err.contains("anomaly_webhook"), "{bad}: {err}");
            assert!(!err.contains("pw"), "{bad}: {err}");
        }
        let err = Target::new("http://h/x", Some(Path::new("/nonexistent")))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not https"), "{err}");
    }
}
