//! The optional TOML configuration file of `serve` (`--config FILE`). Flags override it; it
//! overrides the built-in defaults. Secrets never go here: master keys come from the keyring
//! file or an environment variable.
//!
//! ```toml
//! data_dir = "./data"
//! listen = "127.0.0.1:50051"
//! keyring_file = "/etc/tenant-kms/master.keyring"   # default: <data_dir>/master.keyring
//! master_key_env = "TENANT_KMS_MASTER_KEYS"          # instead of a keyring file
//! audit_durability = "fsync"                          # or "process"
//! min_deletion_window = "1d"
//! default_deletion_window = "7d"
//! max_field_bytes = 65536
//! max_batch_items = 10000
//! max_message_bytes = 16777216
//! cache_tenants = 100000
//! default_max_encryptions = 1073741824
//! insecure_plaintext = false
//! tls_cert = "/etc/tenant-kms/server.pem"            # serve TLS (with tls_key)
//! tls_key = "/etc/tenant-kms/server.key"
//! client_ca = "/etc/tenant-kms/clients-ca.pem"        # require client certificates (mTLS)
//! rate_limit_per_second = 10000.0                     # per caller; 0 disables
//! rate_limit_burst = 20000
//! max_concurrent_requests = 1024
//! request_timeout = "60s"                             # caps every call's deadline
//! request_body_timeout = "10s"                        # a request body must arrive within
//! lock_memory = true                                  # mlockall when the OS allows
//! max_requests_awaiting_body = 4096                   # server-wide, requests still receiving
//! refusal_audit_window = "60s"                        # unauthenticated refusals: one record
//! refusal_rate_per_second = 20.0                      #   per peer and window; budget per peer
//! refusal_rate_burst = 100
//! response_send_timeout = "30s"                       # a response must be taken by then
//! handshake_timeout = "10s"                           # TLS handshake and first request
//! max_unestablished_connections = 1024                # connections without a request yet
//! anomaly_detectors_off = []                          # e.g. ["new_peer"] (docs/OPERATIONS.md)
//! anomaly_repeat_window = "10m"                       # one Anomaly per detector/caller/tenant
//! anomaly_max_tracked = 100000                        # keys per detector
//! anomaly_spike_interval = "1m"                       # rate_spike: EWMA interval,
//! anomaly_spike_factor = 10.0                         #   × baseline,
//! anomaly_spike_floor = 1000                          #   least decrypts per interval,
//! anomaly_spike_warmup = 10                           #   intervals before judging
//! anomaly_learning = "1h"                             # enumeration, new_peer: learning time
//! anomaly_enumeration_window = "10m"                  # enumeration: new tenants per window
//! anomaly_enumeration_tenants = 50
//! anomaly_probe_window = "1m"                         # probing: refused tenants per window
//! anomaly_probe_tenants = 10
//! anomaly_tamper_window = "1m"                        # tampering: failed opens per window
//! anomaly_tamper_failures = 20
//! anomaly_throttle = []                               # containment, opt-in per detector
//! anomaly_quarantine = []                            # containment: token refused until released
//! anomaly_throttle_rate = 1.0                         # throttled caller: calls per second
//! anomaly_throttle_for = "15m"
//! anomaly_webhook_url = "https://alerts.internal/kms" # POST each anomaly (JSON, signed)
//! anomaly_webhook_secret_file = "/etc/tenant-kms/webhook.secret" # HMAC secret, 0600
//! anomaly_webhook_tls_ca = "/etc/tenant-kms/alerts-ca.pem" # needed for https://
//! anomaly_webhook_timeout = "5s"                      # per attempt
//! anomaly_webhook_retries = 5                         # attempts after the first
//! anomaly_webhook_backoff = "1s"                      # first wait, doubled up to 1m
//! anomaly_webhook_queue = 1000                        # alerts waiting; more are dropped
//! store = "postgres://kms@db1,db2/kms?target_session_attrs=read-write"  # default: SQLite
//! store_password_file = "/etc/tenant-kms/pg.password" # or PGPASSWORD
//! store_tls_ca = "/etc/tenant-kms/pg-ca.pem"          # TLS to PostgreSQL, verified
//! store_pool_size = 16
//! store_connect_timeout = "5s"
//! staleness_bound = "1s"                              # fail closed past it (several nodes)
//! node_id = "kms-a"                                   # default: kept in <data_dir>/node.id
//!
//! # A client certificate whose SAN (DNS or URI; the subject CN if it has no SAN) is exactly
//! # `identity` acts as this caller, in place of a bearer token.
//! [[tls_callers]]
//! identity = "ingest.svc.internal"
//! role = "service"                                    # admin | service | auditor
//! tenants = ["acme", "globex"]                        # or ["*"]
//! operations = ["encrypt"]                            # service only; default: all
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::audit::Durability;
use crate::error::{Error, Result};

/// The configuration file's contents; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Listen address.
    pub listen: Option<String>,
    /// Master keyring file.
    pub keyring_file: Option<PathBuf>,
    /// Environment variable holding the master keys.
    pub master_key_env: Option<String>,
    /// Audit durability.
    pub audit_durability: Option<Durability>,
    /// Shortest deletion window, e.g. `1d`.
    pub min_deletion_window: Option<String>,
    /// Default deletion window, e.g. `7d`.
    pub default_deletion_window: Option<String>,
    /// Largest field value in bytes.
    pub max_field_bytes: Option<usize>,
    /// Most items per batch.
    pub max_batch_items: Option<usize>,
    /// Largest gRPC message in bytes.
    pub max_message_bytes: Option<usize>,
    /// Tenants whose keys are cached.
    pub cache_tenants: Option<usize>,
    /// Nonce budget of new tenants.
    pub default_max_encryptions: Option<u64>,
    /// Allow a non-loopback listen address without TLS.
    pub insecure_plaintext: Option<bool>,
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM); makes them required.
    pub client_ca: Option<PathBuf>,
    /// Per-caller sustained calls per second (0 disables).
    pub rate_limit_per_second: Option<f64>,
    /// Per-caller burst.
    pub rate_limit_burst: Option<u32>,
    /// Requests in flight at once.
    pub max_concurrent_requests: Option<usize>,
    /// Longest deadline of a call, e.g. `60s`.
    pub request_timeout: Option<String>,
    /// Longest a request's body may take to arrive, e.g. `10s`.
    pub request_body_timeout: Option<String>,
    /// Lock the process's memory against swapping when the OS allows.
    pub lock_memory: Option<bool>,
    /// Requests that may wait for their bodies at once, server-wide.
    pub max_requests_awaiting_body: Option<usize>,
    /// Window of the aggregated audit of refusals before authentication, e.g. `60s`.
    pub refusal_audit_window: Option<String>,
    /// Refused authentications per second a peer (or a dead token) may sustain.
    pub refusal_rate_per_second: Option<f64>,
    /// Burst of refused authentications per peer.
    pub refusal_rate_burst: Option<u32>,
    /// Longest a response may take to be taken by its client, e.g. `30s`.
    pub response_send_timeout: Option<String>,
    /// Longest a connection may take to finish its TLS handshake and send a request.
    pub handshake_timeout: Option<String>,
    /// Connections that may be open at once without having sent a request.
    pub max_unestablished_connections: Option<usize>,
    /// Detectors switched off, by name (`crate::detect::Detector::name`).
    pub anomaly_detectors_off: Option<Vec<String>>,
    /// At most one Anomaly record per detector, caller and tenant within this, e.g. `10m`.
    pub anomaly_repeat_window: Option<String>,
    /// Most keys (callers, tenants, pairs) each detector tracks.
    pub anomaly_max_tracked: Option<usize>,
    /// `rate_spike`: length of one counting interval, e.g. `1m`.
    pub anomaly_spike_interval: Option<String>,
    /// `rate_spike`: how many times the baseline trips.
    pub anomaly_spike_factor: Option<f64>,
    /// `rate_spike`: least decrypted items per interval that can trip.
    pub anomaly_spike_floor: Option<u64>,
    /// `rate_spike`: closed intervals before a caller is judged.
    pub anomaly_spike_warmup: Option<u32>,
    /// `enumeration` and `new_peer`: how long a newly seen caller only learns, e.g. `1h`.
    pub anomaly_learning: Option<String>,
    /// `enumeration`: window in which new tenants are counted, e.g. `10m`.
    pub anomaly_enumeration_window: Option<String>,
    /// `enumeration`: new tenants within one window that trip.
    pub anomaly_enumeration_tenants: Option<u32>,
    /// `probing`: window in which refused tenants are counted, e.g. `1m`.
    pub anomaly_probe_window: Option<String>,
    /// `probing`: distinct refused tenants within one window that trip.
    pub anomaly_probe_tenants: Option<u32>,
    /// `tampering`: window in which failed opens are counted, e.g. `1m`.
    pub anomaly_tamper_window: Option<String>,
    /// `tampering`: failed opens for one tenant within one window that trip.
    pub anomaly_tamper_failures: Option<u32>,
    /// Detectors whose findings throttle the caller (containment, opt-in).
    pub anomaly_throttle: Option<Vec<String>>,
    /// Detectors whose findings quarantine the caller's token (containment, opt-in).
    pub anomaly_quarantine: Option<Vec<String>>,
    /// A throttled caller's calls per second (its burst is five times that, at least 1).
    pub anomaly_throttle_rate: Option<f64>,
    /// How long a throttle lasts, e.g. `15m`.
    pub anomaly_throttle_for: Option<String>,
    /// The alerting endpoint each anomaly is POSTed to (`http://…` or `https://…`).
    pub anomaly_webhook_url: Option<String>,
    /// File (mode 0600) whose first line is the webhook's HMAC secret.
    pub anomaly_webhook_secret_file: Option<PathBuf>,
    /// CA (PEM) an `https://` webhook endpoint's certificate must chain to.
    pub anomaly_webhook_tls_ca: Option<PathBuf>,
    /// Longest one webhook attempt may take, e.g. `5s`.
    pub anomaly_webhook_timeout: Option<String>,
    /// Webhook attempts after the first.
    pub anomaly_webhook_retries: Option<u32>,
    /// Wait before the first webhook retry (doubled for each next one), e.g. `1s`.
    pub anomaly_webhook_backoff: Option<String>,
    /// Webhook alerts waiting for delivery at most (more are dropped, counted).
    pub anomaly_webhook_queue: Option<usize>,
    /// Tenants, and callers, with their own label in the usage metrics (the rest: `other`).
    pub usage_metrics_top: Option<usize>,
    /// How often usage counts are written to `usage.db`, e.g. `10s`.
    pub usage_flush_interval: Option<String>,
    /// Stream committed audit records as JSON lines to this file (rotated by size).
    pub audit_stream_file: Option<PathBuf>,
    /// Size past which the stream file is rotated, in bytes.
    pub audit_stream_file_max_bytes: Option<u64>,
    /// Rotated stream files kept.
    pub audit_stream_file_keep: Option<usize>,
    /// Stream committed audit records as RFC 5424 syslog: `tcp://HOST:PORT` or `unix:///PATH`.
    pub audit_stream_syslog: Option<String>,
    /// Key store: a PostgreSQL connection string (may carry a password here); default
    /// SQLite in the data directory.
    pub store: Option<String>,
    /// File holding the PostgreSQL password (mode 0600).
    pub store_password_file: Option<PathBuf>,
    /// CA (PEM) the PostgreSQL server's certificate must chain to; makes TLS required.
    pub store_tls_ca: Option<PathBuf>,
    /// Most PostgreSQL connections of this node.
    pub store_pool_size: Option<u32>,
    /// Longest one PostgreSQL connection attempt may take, e.g. `5s`.
    pub store_connect_timeout: Option<String>,
    /// Longest a node serves without confirming it read other nodes' changes, e.g. `1s`.
    pub staleness_bound: Option<String>,
    /// This node's identity in the audit chains of a shared store.
    pub node_id: Option<String>,
    /// Client-certificate identities that act as callers.
    #[serde(default)]
    pub tls_callers: Vec<TlsCallerConfig>,
}

/// One `[[tls_callers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCallerConfig {
    /// The certificate identity matched exactly: a SAN DNS name or URI, or the subject CN of a
    /// certificate without SAN names.
    pub identity: String,
    /// `admin`, `service` or `auditor`.
    pub role: String,
    /// Tenant ids, or `["*"]` for every tenant.
    pub tenants: Vec<String>,
    /// Data-plane operations a service caller is limited to (default: all).
    pub operations: Option<Vec<String>>,
}

impl FileConfig {
    /// The validated `[[tls_callers]]` table.
    pub fn tls_callers(&self) -> Result<crate::auth::cert::TlsCallers> {
        let rules = self
            .tls_callers
            .iter()
            .map(|c| {
                crate::auth::cert::TlsCallerRule::new(
                    &c.identity,
                    &c.role,
                    &c.tenants,
                    c.operations.as_deref(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        crate::auth::cert::TlsCallers::new(rules)
    }
}

impl FileConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidArgument(format!("cannot read config {}: {e}", path.display()))
        })?;
        toml::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!("config {} is invalid: {e}", path.display()))
        })
    }
}

/// Parses a duration like `0s`, `90m`, `1d`, `7d` into seconds, at most
/// [`crate::domain::MAX_DURATION_SECONDS`] (3650 days): every flag and setting that takes a
/// duration goes through here, so none can name an absurd one.
pub fn parse_duration_seconds(text: &str) -> Result<u64> {
    let seconds = humantime::parse_duration(text.trim())
        .map(|d| d.as_secs())
        .map_err(|_| {
            Error::InvalidArgument(format!(
                "'{text}' is not a duration (examples: 0s, 30m, 1d, 7d)"
            ))
        })?;
    crate::domain::bounded_duration(&format!("the duration '{}'", text.trim()), seconds)
}

/// Upper bounds of the configuration's counts, so that no setting can ask for something the
/// service cannot honour or that defeats a safety bound.
pub mod max {
    /// `default_max_encryptions`: the NIST SP 800-38D bound for random 96-bit nonces, 2^32.
    pub const ENCRYPTIONS: u64 = 1 << 32;
    /// `max_concurrent_requests` (far above what one process can serve at once).
    pub const CONCURRENT_REQUESTS: usize = 1_000_000;
    /// `max_message_bytes` and `max_field_bytes`: 1 GiB (a gRPC frame's length is 32 bits).
    pub const MESSAGE_BYTES: usize = 1 << 30;
    /// `max_batch_items`.
    pub const BATCH_ITEMS: usize = 1_000_000;
    /// `max_requests_awaiting_body` and `max_unestablished_connections`.
    pub const CONNECTION_COUNTS: usize = 1_000_000;
    /// `usage_metrics_top`: each labelled tenant × caller pair is a set of series per
    /// operation, so this stays in the hundreds.
    pub const USAGE_METRICS_TOP: usize = 1_000;
    /// `audit_stream_file_keep`.
    pub const STREAM_FILES_KEPT: usize = 1_000;
    /// `anomaly_webhook_retries` (with the 1-minute back-off cap, 20 retries span 15 minutes).
    pub const WEBHOOK_RETRIES: u32 = 20;
    /// `anomaly_webhook_queue`.
    pub const WEBHOOK_QUEUE: usize = 100_000;
    /// `store_pool_size` (PostgreSQL's own `max_connections` is far lower in practice).
    pub const POOL_SIZE: u32 = 10_000;
}

/// `value` if it is at most `max`; otherwise INVALID_ARGUMENT naming the setting.
pub fn bounded_count<T: PartialOrd + std::fmt::Display>(name: &str, value: T, max: T) -> Result<T> {
    if value > max {
        return Err(Error::InvalidArgument(format!(
            "{name} = {value} is more than the most allowed, {max}"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_seconds("0s").unwrap(), 0);
        assert_eq!(parse_duration_seconds("1d").unwrap(), 86_400);
        assert_eq!(parse_duration_seconds("7d").unwrap(), 604_800);
        assert!(parse_duration_seconds("soon").is_err());
        assert_eq!(parse_duration_seconds("3650d").unwrap(), 3650 * 86_400);
        let err = parse_duration_seconds("100000000000d").unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(parse_duration_seconds("3651d").is_err());
    }

    #[test]
    fn counts_are_bounded() {
        assert_eq!(bounded_count("n", 5_u64, max::ENCRYPTIONS).unwrap(), 5);
        let err = bounded_count("default_max_encryptions", u64::MAX, max::ENCRYPTIONS).unwrap_err();
        assert!(err.to_string().contains("default_max_encryptions"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("listen = \"x\"\nbogus = 1").is_err());
        let config: FileConfig = toml::from_str("audit_durability = \"process\"").unwrap();
        assert_eq!(config.audit_durability, Some(Durability::Process));
    }

    #[test]
    fn network_abuse_keys_parse() {
        let config: FileConfig = toml::from_str(
            "max_requests_awaiting_body = 64\nrefusal_audit_window = \"5m\"\n\
             refusal_rate_per_second = 2.5\nrefusal_rate_burst = 10\n\
             response_send_timeout = \"2s\"\nhandshake_timeout = \"3s\"\n\
             max_unestablished_connections = 9\n",
        )
        .unwrap();
        assert_eq!(config.max_requests_awaiting_body, Some(64));
        assert_eq!(config.refusal_audit_window.as_deref(), Some("5m"));
        assert_eq!(config.refusal_rate_per_second, Some(2.5));
        assert_eq!(config.refusal_rate_burst, Some(10));
        assert_eq!(config.response_send_timeout.as_deref(), Some("2s"));
        assert_eq!(config.handshake_timeout.as_deref(), Some("3s"));
        assert_eq!(config.max_unestablished_connections, Some(9));
    }

    #[test]
    fn tls_callers_table() {
        let config: FileConfig = toml::from_str(
            "[[tls_callers]]\nidentity = \"svc\"\nrole = \"service\"\ntenants = [\"a\"]\n\
             operations = [\"encrypt\"]\n",
        )
        .unwrap();
        assert!(!config.tls_callers().unwrap().is_empty());
        let bad: FileConfig = toml::from_str(
            "[[tls_callers]]\nidentity = \"svc\"\nrole = \"root\"\ntenants = [\"a\"]\n",
        )
        .unwrap();
        assert!(bad.tls_callers().is_err());
        assert!(
            toml::from_str::<FileConfig>(
                "[[tls_callers]]\nidentity = \"s\"\nrole = \"admin\"\ntenants = []\nx = 1\n"
            )
            .is_err()
        );
    }
}
