//! The webhook's settings read from the configuration file (`anomaly_webhook_*` keys;
//! meanings in docs/OPERATIONS.md §13, "The webhook").

use std::time::Duration;

use super::WebhookConfig;
use crate::config::{FileConfig, bounded_count, max, parse_duration_seconds};
use crate::error::{Error, Result};

/// A duration setting of at least one second.
fn seconds(name: &str, text: &str) -> Result<Duration> {
    match parse_duration_seconds(text)? {
        0 => Err(Error::InvalidArgument(format!(
            "{name} must be at least 1s"
        ))),
        n => Ok(Duration::from_secs(n)),
    }
}

impl WebhookConfig {
    /// The webhook the file's keys describe, `None` without `anomaly_webhook_url`;
    /// INVALID_ARGUMENT naming the first bad key (the secret and CA files are read when the
    /// server opens, see [`super::Webhook::open`]).
    pub fn from_file(file: &FileConfig) -> Result<Option<Self>> {
        let Some(url) = &file.anomaly_webhook_url else {
            let others = file.anomaly_webhook_secret_file.is_some()
                || file.anomaly_webhook_tls_ca.is_some()
                || file.anomaly_webhook_timeout.is_some()
                || file.anomaly_webhook_retries.is_some()
                || file.anomaly_webhook_backoff.is_some()
                || file.anomaly_webhook_queue.is_some();
            if others {
                return Err(Error::InvalidArgument(
                    "anomaly_webhook_* settings need anomaly_webhook_url".into(),
                ));
            }
            return Ok(None);
        };
        let Some(secret_file) = &file.anomaly_webhook_secret_file else {
            return Err(Error::InvalidArgument(
                "anomaly_webhook_url needs anomaly_webhook_secret_file (a 0600 file whose first \
                 line is the HMAC secret the endpoint verifies)"
                    .into(),
            ));
        };
        let mut config = WebhookConfig::new(url, secret_file);
        config.tls_ca = file.anomaly_webhook_tls_ca.clone();
        if let Some(text) = &file.anomaly_webhook_timeout {
            config.timeout = seconds("anomaly_webhook_timeout", text)?;
        }
        if let Some(n) = file.anomaly_webhook_retries {
            config.retries = bounded_count("anomaly_webhook_retries", n, max::WEBHOOK_RETRIES)?;
        }
        if let Some(text) = &file.anomaly_webhook_backoff {
            config.backoff = seconds("anomaly_webhook_backoff", text)?;
        }
        if let Some(n) = file.anomaly_webhook_queue {
            config.queue = bounded_count("anomaly_webhook_queue", n, max::WEBHOOK_QUEUE)?.max(1);
        }
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<WebhookConfig>> {
        WebhookConfig::from_file(&toml::from_str::<FileConfig>(text).unwrap())
    }

    #[test]
    fn keys_change_the_defaults_and_bad_values_are_named() {
        assert_eq!(parse("").unwrap(), None);
        let c = parse(
            "anomaly_webhook_url = \"https://alerts.example/kms\"\n\
             anomaly_webhook_secret_file = \"/etc/tenant-kms/webhook.secret\"\n\
             anomaly_webhook_tls_ca = \"/etc/tenant-kms/alerts-ca.pem\"\n\
             anomaly_webhook_timeout = \"2s\"\nanomaly_webhook_retries = 3\n\
             anomaly_webhook_backoff = \"5s\"\nanomaly_webhook_queue = 10\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.url, "https://alerts.example/kms");
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!((c.retries, c.queue), (3, 10));
        assert_eq!(c.backoff, Duration::from_secs(5));
        assert!(!format!("{c:?}").contains("/kms"), "{c:?}");
        let defaults = parse(
            "anomaly_webhook_url = \"http://127.0.0.1:9/\"\nanomaly_webhook_secret_file = \"s\"\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(defaults.retries, 5);
        assert_eq!(defaults.timeout, Duration::from_secs(5));
        for (bad, key) in [
            (
                "anomaly_webhook_url = \"http://h/\"",
                "anomaly_webhook_secret_file",
            ),
            ("anomaly_webhook_retries = 2", "anomaly_webhook_url"),
            (
                "anomaly_webhook_url = \"http://h/\"\nanomaly_webhook_secret_file = \"s\"\nanomaly_webhook_timeout = \"0s\"",
                "anomaly_webhook_timeout",
            ),
            (
                "anomaly_webhook_url = \"http://h/\"\nanomaly_webhook_secret_file = \"s\"\nanomaly_webhook_retries = 1000",
                "anomaly_webhook_retries",
            ),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}
