//! Where the server is and how to prove who we are: address, TLS and bearer token.
//!
//! The environment names are the CLI's (`tenant-kms encrypt --help`): `TENANT_KMS_ADDR`,
//! `TENANT_KMS_TOKEN` (the token itself, as Vault's `VAULT_TOKEN`), `TENANT_KMS_TOKEN_FILE`,
//! `TENANT_KMS_CA_CERT`, `TENANT_KMS_CLIENT_CERT` and `TENANT_KMS_CLIENT_KEY`.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::client::{Bearer, Client};
use crate::error::{ConnectFailure, Error, Result};
use crate::retry::RetryPolicy;

/// The address used when none is given: the server's default listen address.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// Settings of a [`Client`]; build with the methods below, then [`ClientConfig::connect`].
///
/// Holds the token as a sensitive metadata value (never printed: there is no `Debug`) and the
/// client key in a zeroizing buffer.
pub struct ClientConfig {
    addr: String,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    bearer: Bearer,
    retry: RetryPolicy,
    connect_timeout: Duration,
}

impl ClientConfig {
    /// A server at `addr`: a URL (`http://…`, `https://…`) or `host:port`, which becomes
    /// `https://` once a CA is set and `http://` otherwise. No token, no TLS yet.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            ca_pem: None,
            identity: None,
            bearer: Bearer::none(),
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Settings from the environment (names in the module docs); `TENANT_KMS_TOKEN` wins
    /// over `TENANT_KMS_TOKEN_FILE`. Unset names leave the defaults.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`ClientConfig::from_env`] over any lookup (tests give a map instead of the process
    /// environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut config =
            Self::new(lookup("TENANT_KMS_ADDR").unwrap_or_else(|| DEFAULT_ADDR.to_owned()));
        if let Some(token) = lookup("TENANT_KMS_TOKEN") {
            config = config.token(Zeroizing::new(token))?;
        } else if let Some(file) = lookup("TENANT_KMS_TOKEN_FILE") {
            config = config.token_file(file)?;
        }
        if let Some(ca) = lookup("TENANT_KMS_CA_CERT") {
            config = config.ca_cert_file(ca)?;
        }
        match (
            lookup("TENANT_KMS_CLIENT_CERT"),
            lookup("TENANT_KMS_CLIENT_KEY"),
        ) {
            (Some(cert), Some(key)) => config = config.client_cert_files(cert, key)?,
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "TENANT_KMS_CLIENT_CERT and TENANT_KMS_CLIENT_KEY go together".into(),
                ));
            }
        }
        Ok(config)
    }

    /// Sends `authorization: Bearer <token>` with every call. Surrounding white space is
    /// ignored (token files end with a newline).
    pub fn token(mut self, token: Zeroizing<String>) -> Result<Self> {
        self.bearer = Bearer::new(&token)?;
        Ok(self)
    }

    /// [`ClientConfig::token`] read from a file (as `tenant-kms token create` writes it).
    pub fn token_file(self, path: impl AsRef<Path>) -> Result<Self> {
        let token = read_file(path.as_ref())?;
        let token = String::from_utf8(token.to_vec())
            .map_err(|_| Error::Config("the token file is not text".into()))?;
        self.token(Zeroizing::new(token))
    }

    /// TLS: the server's certificate must chain to this CA (PEM). No operating-system roots
    /// are trusted: a KMS is reached through a CA its operators name.
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// [`ClientConfig::ca_cert_pem`] from a file.
    pub fn ca_cert_file(self, path: impl AsRef<Path>) -> Result<Self> {
        Ok(self.ca_cert_pem(read_file(path.as_ref())?.to_vec()))
    }

    /// Mutual TLS: present this certificate and private key (PEM). Needs a CA as well.
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: Zeroizing<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key));
        self
    }

    /// [`ClientConfig::client_cert_pem`] from files.
    pub fn client_cert_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let cert = read_file(cert.as_ref())?.to_vec();
        let key = read_file(key.as_ref())?;
        Ok(self.client_cert_pem(cert, key))
    }

    /// Replaces the retry policy ([`RetryPolicy::default`] otherwise).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long connecting (TCP and the TLS handshake) may take before it fails with
    /// [`Error::Connect`] and [`ConnectFailure::TimedOut`] (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The endpoint URL these settings reach: `addr` as given when it is a URL, else with the
    /// scheme TLS settings imply.
    pub fn url(&self) -> String {
        if self.addr.contains("://") {
            self.addr.clone()
        } else if self.ca_pem.is_some() {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        }
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let url = self.url();
        let https = url.starts_with("https://");
        if !https && (self.ca_pem.is_some() || self.identity.is_some()) {
            return Err(Error::Config(format!(
                "a CA or client certificate needs an https:// address, not {url}"
            )));
        }
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|_| Error::Config(format!("invalid address {url}")))?
            .connect_timeout(self.connect_timeout);
        if https {
            let ca = self.ca_pem.as_ref().ok_or_else(|| {
                Error::Config("an https:// address needs a CA certificate".into())
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("TLS settings: {e}")))?;
        }
        Ok(endpoint)
    }

    /// Checks the settings without connecting: an address that is not a URL, TLS settings
    /// on a plaintext address, an `https://` address without a CA ([`Error::Config`]).
    pub fn check(&self) -> Result<()> {
        self.endpoint().map(|_| ())
    }

    /// Connects now (so a wrong address or certificate fails here, with the reason
    /// classified in [`Error::Connect`]), and returns the client.
    pub async fn connect(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        // Bounded here too: a TLS handshake that a peer never answers is not covered by
        // every connector's own timeout.
        let channel = match tokio::time::timeout(self.connect_timeout, endpoint.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    failure: ConnectFailure::of(&e),
                    detail: format!("{}: {}", self.url(), crate::error::chain(&e)),
                });
            }
            Err(_) => {
                return Err(Error::Connect {
                    failure: ConnectFailure::TimedOut,
                    detail: format!(
                        "{}: no connection within {:?}",
                        self.url(),
                        self.connect_timeout
                    ),
                });
            }
        };
        Ok(Client::new(channel, self.bearer, self.retry))
    }

    /// A client that connects on its first call (and reconnects after a failure): for
    /// services that start before the KMS is reachable. Connection failures then surface as
    /// UNAVAILABLE, which idempotent calls retry.
    pub fn connect_lazy(self) -> Result<Client> {
        let channel = self.endpoint()?.connect_lazy();
        Ok(Client::new(channel, self.bearer, self.retry))
    }
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn host_port_takes_the_scheme_tls_implies() {
        assert_eq!(ClientConfig::new("kms:50051").url(), "http://kms:50051");
        let tls = ClientConfig::new("kms:50051").ca_cert_pem(b"pem".to_vec());
        assert_eq!(tls.url(), "https://kms:50051");
        assert_eq!(
            ClientConfig::new("https://kms:1").url(),
            "https://kms:1",
            "a URL is kept as given"
        );
    }

    #[test]
    fn token_comes_from_the_environment_and_wins_over_the_file() {
        let config = ClientConfig::from_lookup(lookup(&[
            ("TENANT_KMS_ADDR", "127.0.0.1:9"),
            ("TENANT_KMS_TOKEN", "tok-123\n"),
            ("TENANT_KMS_TOKEN_FILE", "/nonexistent/token"),
        ]))
        .unwrap();
        assert_eq!(config.url(), "http://127.0.0.1:9");
        let token = config.bearer.0.unwrap();
        assert!(token.is_sensitive());
        assert_eq!(token.to_str().unwrap(), "Bearer tok-123");
    }

    #[test]
    fn unreadable_files_and_half_identities_are_refused_by_name() {
        let missing =
            ClientConfig::from_lookup(lookup(&[("TENANT_KMS_TOKEN_FILE", "/nonexistent/token")]));
        assert!(
            matches!(missing, Err(Error::Config(m)) if m.contains("/nonexistent/token")),
            "the file is named"
        );
        let half = ClientConfig::from_lookup(lookup(&[("TENANT_KMS_CLIENT_CERT", "/x")]));
        assert!(matches!(half, Err(Error::Config(_))));
        let bad = ClientConfig::new("x").token(Zeroizing::new("tok\u{7f}é".into()));
        assert!(matches!(bad, Err(Error::Config(_))));
    }

    #[test]
    fn tls_settings_need_https_and_https_needs_a_ca() {
        let plain = ClientConfig::new("http://127.0.0.1:1").ca_cert_pem(b"pem".to_vec());
        assert!(matches!(plain.endpoint(), Err(Error::Config(_))));
        let no_ca = ClientConfig::new("https://127.0.0.1:1");
        assert!(matches!(no_ca.endpoint(), Err(Error::Config(_))));
    }
}
