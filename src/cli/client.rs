//! How the client commands reach a running server: the address, TLS, the bearer token, and
//! what a failed connection or a refused call tells the operator. The one module holding the
//! CLI's connection set-up, so moving it onto the client library touches only this file.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::tenant_service_client::TenantServiceClient;

/// The environment variable that may hold the bearer token itself (as `VAULT_TOKEN` does for
/// Vault): used when no `--token-file` is named, never printed.
pub const TOKEN_ENV: &str = "TENANT_KMS_TOKEN";

/// The token file used when neither `--token-file` nor [`TOKEN_ENV`] names a token: the one
/// `serve` writes on its first start in the default data directory.
const DEFAULT_TOKEN_FILE: &str = "./data/admin.token";

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server address: `host:port` (http, or https when --ca-cert is given) or a URL,
    /// `http://host:port` / `https://host:port`.
    #[arg(long, default_value = "127.0.0.1:50051", env = "TENANT_KMS_ADDR")]
    pub addr: String,
    /// File holding the bearer token. Without it the token comes from the TENANT_KMS_TOKEN
    /// environment variable, else from ./data/admin.token.
    #[arg(long, env = "TENANT_KMS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that the server's certificate must chain to (https addresses).
    #[arg(long, env = "TENANT_KMS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --client-key. When the server maps it
    /// to a caller, no token is needed.
    #[arg(long, requires = "client_key", env = "TENANT_KMS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert", env = "TENANT_KMS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// How long to wait for the connection (TCP and TLS handshake), e.g. 5s, 500ms.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

/// A channel that adds the bearer token to every call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request (nothing when the caller is named by
/// its client certificate alone).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A usage error: exit code 2 ([`super::EXIT_USAGE`]) for a client command.
fn usage(message: String) -> Error {
    Error::InvalidArgument(message)
}

impl ClientArgs {
    /// The bearer token: `--token-file`, else `TENANT_KMS_TOKEN`, else ./data/admin.token
    /// (none at all when a client certificate names the caller and no token is given).
    fn bearer(&self) -> Result<Bearer> {
        let token = match (&self.token_file, std::env::var(TOKEN_ENV)) {
            (Some(path), _) => read_token_file(path)?,
            (None, Ok(token)) if !token.trim().is_empty() => Zeroizing::new(token),
            (None, _) => {
                let path = PathBuf::from(DEFAULT_TOKEN_FILE);
                if self.client_cert.is_some() && !path.exists() {
                    return Ok(Bearer(None));
                }
                read_token_file(&path).map_err(|e| {
                    usage(format!(
                        "{e}; name the token with --token-file or the {TOKEN_ENV} environment \
                         variable"
                    ))
                })?
            }
        };
        let mut value: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| usage("the token holds characters no token has".into()))?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    /// The URL `--addr` names: a URL as given, or `host:port` with `https` when `--ca-cert`
    /// is given and `http` otherwise.
    pub fn url(&self) -> Result<String> {
        let addr = self.addr.trim();
        let url = match addr.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() => addr.to_owned(),
            Some((scheme, _)) => {
                return Err(usage(format!(
                    "--addr {addr}: the scheme must be http:// or https://, not {scheme}://"
                )));
            }
            None => {
                let port = addr.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
                if !matches!(port, Some(Ok(_))) || addr.starts_with(':') {
                    return Err(usage(format!(
                        "--addr {addr}: expected host:port (e.g. 127.0.0.1:50051) or a URL \
                         (https://kms.internal:50051)"
                    )));
                }
                let scheme = if self.ca_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{addr}")
            }
        };
        Ok(url)
    }

    /// TLS settings for an https address: the named CA (no OS roots: a KMS is reached through
    /// a private CA) and, for mTLS, the client identity.
    fn tls(&self, url: &str) -> Result<Option<ClientTlsConfig>> {
        if !url.starts_with("https://") {
            if self.ca_cert.is_some() || self.client_cert.is_some() {
                return Err(usage(
                    "--ca-cert and --client-cert need an https:// --addr (or a host:port one)"
                        .into(),
                ));
            }
            return Ok(None);
        }
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|e| usage(format!("{flag} {}: cannot read it: {e}", path.display())))
        };
        let ca = self
            .ca_cert
            .as_ref()
            .ok_or_else(|| usage("an https:// --addr needs --ca-cert".into()))?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("--ca-cert", ca)?.as_slice()));
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config = config.identity(Identity::from_pem(
                read("--client-cert", cert)?.as_slice(),
                read("--client-key", key)?.as_slice(),
            ));
        }
        Ok(Some(config))
    }

    /// The endpoint `--addr` and the TLS flags describe; a bad flag is a usage error.
    fn endpoint(&self) -> Result<Endpoint> {
        let url = self.url()?;
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|_| usage(format!("--addr {}: not a valid address", self.addr)))?
            .connect_timeout(self.connect_timeout);
        if let Some(tls) = self.tls(&url)? {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| usage(format!("TLS settings (--ca-cert, --client-cert): {e}")))?;
        }
        Ok(endpoint)
    }

    /// Connects (TCP, then TLS for https), or says why it could not and what to check.
    async fn channel(&self) -> Result<Channel> {
        let endpoint = self.endpoint()?;
        let connecting = endpoint.connect();
        // Bounded here too: a TLS handshake that a peer never answers is not covered by
        // every connector's own timeout.
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(connect_error(&self.addr, self.connect_timeout, &e)),
            Err(_) => Err(Error::Unavailable(timed_out(
                &self.addr,
                self.connect_timeout,
            ))),
        }
    }

    /// Checks every flag (and the token) without connecting: bad ones are usage errors,
    /// reported before any input is read.
    pub fn check(&self) -> Result<()> {
        self.endpoint()?;
        self.bearer().map(|_| ())
    }

    /// A KeyService client.
    pub async fn keys(&self) -> Result<KeyServiceClient<Authed>> {
        let bearer = self.bearer()?;
        Ok(KeyServiceClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// A TenantService client.
    pub async fn tenants(&self) -> Result<TenantServiceClient<Authed>> {
        let bearer = self.bearer()?;
        Ok(TenantServiceClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// An AuditService client.
    pub async fn audit(&self) -> Result<AuditServiceClient<Authed>> {
        let bearer = self.bearer()?;
        Ok(AuditServiceClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// Connects, makes one KeyService call and returns its answer; a refusal becomes the
    /// command's error.
    pub async fn key_call<R, F>(&self, rpc: impl FnOnce(KeyServiceClient<Authed>) -> F) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        answer(rpc(self.keys().await?).await)
    }

    /// [`Self::key_call`] for the TenantService.
    pub async fn tenant_call<R, F>(
        &self,
        rpc: impl FnOnce(TenantServiceClient<Authed>) -> F,
    ) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        answer(rpc(self.tenants().await?).await)
    }

    /// [`Self::key_call`] for the AuditService.
    pub async fn audit_call<R, F>(
        &self,
        rpc: impl FnOnce(AuditServiceClient<Authed>) -> F,
    ) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        answer(rpc(self.audit().await?).await)
    }
}

fn read_token_file(path: &PathBuf) -> Result<Zeroizing<String>> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| usage(format!("cannot read token file {}: {e}", path.display())))
}

fn timed_out(addr: &str, timeout: Duration) -> String {
    format!(
        "cannot connect to {addr}: timed out after {}: check --addr (host and port), that no \
         firewall drops the connection, and that the server speaks TLS exactly when --addr is \
         https:// (raise --connect-timeout for a slow network)",
        humantime::format_duration(timeout)
    )
}

/// Why a connection failed, in words, with what to check: refused, timed out, or which TLS
/// check failed.
fn connect_error(addr: &str, timeout: Duration, error: &tonic::transport::Error) -> Error {
    let mut chain = Vec::new();
    let mut refused = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        chain.push(format!("{e:?} {e}"));
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = e.source();
    }
    let text = chain.join(" | ");
    let message = if text.contains("UnknownIssuer") || text.contains("UnknownCA") {
        format!(
            "cannot connect to {addr}: TLS error: unknown CA: the server's certificate is not \
             issued by the CA in --ca-cert; check that --ca-cert names the CA that signed it"
        )
    } else if text.contains("NotValidForName") {
        format!(
            "cannot connect to {addr}: TLS error: name mismatch: the server's certificate is not \
             valid for the host in --addr; use a name or address its certificate lists"
        )
    } else if text.contains("Expired") {
        format!(
            "cannot connect to {addr}: TLS error: the server's certificate has expired (or is \
             not yet valid); check the server's certificate and this machine's clock"
        )
    } else if text.contains("InvalidContentType") || text.contains("CorruptMessage") {
        format!(
            "cannot connect to {addr}: TLS error: the server did not answer TLS; use http:// (or \
             no --ca-cert) in --addr if it runs without TLS"
        )
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        format!(
            "cannot connect to {addr}: TLS error: the server requires a client certificate; pass \
             --client-cert and --client-key"
        )
    } else if refused {
        format!(
            "cannot connect to {addr}: connection refused: nothing listens there; check that the \
             server runs and --addr (host and port)"
        )
    } else if text.contains("timed out") || text.contains("TimedOut") || text.contains("Elapsed") {
        timed_out(addr, timeout)
    } else {
        format!("cannot connect to {addr}: {error}; check --addr and the TLS flags")
    };
    Error::Unavailable(message)
}

/// A call's answer, or its refusal as the command's error.
pub fn answer<R>(reply: std::result::Result<tonic::Response<R>, tonic::Status>) -> Result<R> {
    reply.map(tonic::Response::into_inner).map_err(status_error)
}

/// A refusal from the server as the command's error (exit 1): its code and message, the
/// message's request-field names replaced by the flags that set them.
pub fn status_error(status: tonic::Status) -> Error {
    let mut message = flag_names(status.message());
    if status.code() == tonic::Code::Unavailable && message.contains("transport") {
        message.push_str(
            "; check that the server speaks TLS exactly when --addr is https:// (--ca-cert)",
        );
    }
    if status.code() == tonic::Code::Unauthenticated {
        message.push_str(&format!(
            "; check the token (--token-file or {TOKEN_ENV}) or the client certificate"
        ));
    }
    Error::FailedPrecondition(format!(
        "the server refused: {:?}: {message}",
        status.code()
    ))
}

/// The request fields the server names in its messages, and the CLI flag or input that sets
/// each, so an error points at what the operator typed.
const FIELD_FLAGS: &[(&str, &str)] = &[
    ("waiting_period_seconds", "--window"),
    ("rotation_period_seconds", "--rotation-period"),
    ("max_encryptions", "--max-encryptions"),
    ("tenant_id", "the tenant id"),
    ("index_name", "--index"),
    ("blind_indexes", "--blind-index"),
    ("page_token", "the page token"),
    ("plaintext", "the value on stdin"),
    ("ciphertext", "the ciphertext on stdin"),
    ("wrapped_key", "the wrapped key on stdin"),
    ("context", "--context"),
    ("aad", "--aad"),
    ("items", "the stdin lines"),
    ("bits", "--bits"),
    ("normalization", "--normalization"),
];

/// `text` with each whole-word request field name of [`FIELD_FLAGS`] replaced by its flag.
pub fn flag_names(text: &str) -> String {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(word).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(|c: char| !word(c)).unwrap_or(rest.len());
        let token = &rest[..end];
        match FIELD_FLAGS.iter().find(|(field, _)| *field == token) {
            Some((_, flag)) => out.push_str(flag),
            None => out.push_str(token),
        }
        rest = &rest[end..];
    }
    out
}

/// The current-thread runtime a client command runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields_in_messages_become_flags_whole_words_only() {
        assert_eq!(
            flag_names("waiting_period_seconds must be at least 86400"),
            "--window must be at least 86400"
        );
        assert_eq!(
            flag_names("context is 200 bytes; aad too"),
            "--context is 200 bytes; --aad too"
        );
        assert_eq!(flag_names("contexts and aad_x"), "contexts and aad_x");
    }
}
