//! How the client commands reach a running server: the address, TLS, the bearer token, and
//! what a failed connection or a refused call tells the operator. The flags and their
//! messages are the CLI's; connecting, TLS, the token header and retries are the client
//! library's (`tenant-kms-client`, clients/rust), so the CLI is one more user of it: a call
//! refused at admission with a `retry-after-ms` hint, or an idempotent call that met
//! UNAVAILABLE, is tried again as the library's [`RetryPolicy`] says.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tenant_kms_client::{Client, ClientConfig, ConnectFailure, RetryPolicy};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

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

/// A usage error: exit code 2 ([`super::EXIT_USAGE`]) for a client command.
fn usage(message: String) -> Error {
    Error::InvalidArgument(message)
}

impl ClientArgs {
    /// The bearer token: `--token-file`, else `TENANT_KMS_TOKEN`, else ./data/admin.token
    /// (none at all when a client certificate names the caller and no token is given).
    fn token(&self) -> Result<Option<Zeroizing<String>>> {
        let token = match (&self.token_file, std::env::var(TOKEN_ENV)) {
            (Some(path), _) => read_token_file(path)?,
            (None, Ok(token)) if !token.trim().is_empty() => Zeroizing::new(token),
            (None, _) => {
                let path = PathBuf::from(DEFAULT_TOKEN_FILE);
                if self.client_cert.is_some() && !path.exists() {
                    return Ok(None);
                }
                read_token_file(&path).map_err(|e| {
                    usage(format!(
                        "{e}; name the token with --token-file or the {TOKEN_ENV} environment \
                         variable"
                    ))
                })?
            }
        };
        Ok(Some(token))
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

    /// TLS settings for an https address onto `config`: the named CA (no OS roots: a KMS is
    /// reached through a private CA) and, for mTLS, the client identity. Files are read here
    /// so that an unreadable one is named by its flag.
    fn tls(&self, url: &str, mut config: ClientConfig) -> Result<ClientConfig> {
        if !url.starts_with("https://") {
            if self.ca_cert.is_some() || self.client_cert.is_some() {
                return Err(usage(
                    "--ca-cert and --client-cert need an https:// --addr (or a host:port one)"
                        .into(),
                ));
            }
            return Ok(config);
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
        config = config.ca_cert_pem(read("--ca-cert", ca)?.to_vec());
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config = config.client_cert_pem(
                read("--client-cert", cert)?.to_vec(),
                read("--client-key", key)?,
            );
        }
        Ok(config)
    }

    /// The client library's settings these flags describe; a bad flag is a usage error.
    fn config(&self) -> Result<ClientConfig> {
        let url = self.url()?;
        let mut config = ClientConfig::new(url.clone())
            .connect_timeout(self.connect_timeout)
            .retry(RetryPolicy::default());
        config = self.tls(&url, config)?;
        if let Some(token) = self.token()? {
            config = config
                .token(token)
                .map_err(|_| usage("the token holds characters no token has".into()))?;
        }
        config
            .check()
            .map_err(|e| usage(format!("--addr {} and the TLS flags: {e}", self.addr)))?;
        Ok(config)
    }

    /// Checks every flag (and the token) without connecting: bad ones are usage errors,
    /// reported before any input is read.
    pub fn check(&self) -> Result<()> {
        self.config().map(|_| ())
    }

    /// Connects (TCP, then TLS for https), or says why it could not and what to check.
    pub async fn connect(&self) -> Result<Client> {
        self.config()?.connect().await.map_err(|e| match e {
            tenant_kms_client::Error::Connect { failure, detail } => {
                connect_error(&self.addr, self.connect_timeout, failure, &detail)
            }
            other => client_error(other),
        })
    }

    /// Connects, makes one call through the client library (with its retries) and returns
    /// its answer; a refusal becomes the command's error.
    pub async fn call<R, F>(&self, rpc: impl FnOnce(Client) -> F) -> Result<R>
    where
        F: Future<Output = tenant_kms_client::Result<R>>,
    {
        answer(rpc(self.connect().await?).await)
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
/// check failed (as the client library classified it).
fn connect_error(addr: &str, timeout: Duration, failure: ConnectFailure, detail: &str) -> Error {
    let message = match failure {
        ConnectFailure::UnknownCa => format!(
            "cannot connect to {addr}: TLS error: unknown CA: the server's certificate is not \
             issued by the CA in --ca-cert; check that --ca-cert names the CA that signed it"
        ),
        ConnectFailure::NameMismatch => format!(
            "cannot connect to {addr}: TLS error: name mismatch: the server's certificate is not \
             valid for the host in --addr; use a name or address its certificate lists"
        ),
        ConnectFailure::Expired => format!(
            "cannot connect to {addr}: TLS error: the server's certificate has expired (or is \
             not yet valid); check the server's certificate and this machine's clock"
        ),
        ConnectFailure::NotTls => format!(
            "cannot connect to {addr}: TLS error: the server did not answer TLS; use http:// (or \
             no --ca-cert) in --addr if it runs without TLS"
        ),
        ConnectFailure::CertificateRequired => format!(
            "cannot connect to {addr}: TLS error: the server requires a client certificate; pass \
             --client-cert and --client-key"
        ),
        ConnectFailure::Refused => format!(
            "cannot connect to {addr}: connection refused: nothing listens there; check that the \
             server runs and --addr (host and port)"
        ),
        ConnectFailure::TimedOut => timed_out(addr, timeout),
        _ => format!("cannot connect to {addr}: {detail}; check --addr and the TLS flags"),
    };
    Error::Unavailable(message)
}

/// A client-library error as the command's error: a refusal through [`status_error`], a bad
/// setting as a usage error.
fn client_error(error: tenant_kms_client::Error) -> Error {
    match error {
        tenant_kms_client::Error::Rpc(status) => status_error(status),
        tenant_kms_client::Error::Config(message) => usage(message),
        connect @ tenant_kms_client::Error::Connect { .. } => {
            Error::Unavailable(connect.to_string())
        }
        other => Error::Internal(other.to_string()),
    }
}

/// A call's answer, or its refusal as the command's error.
pub fn answer<R>(reply: tenant_kms_client::Result<R>) -> Result<R> {
    reply.map_err(client_error)
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
