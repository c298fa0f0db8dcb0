//! The anomaly webhook (issue 16, item 2): each anomaly the detectors report is also POSTed,
//! as JSON signed with an HMAC header, to the operator's alerting endpoint
//! (`anomaly_webhook_url`), off the data plane.
//!
//! - **Never on a call's path.** Reporting an anomaly only puts a prepared body on a bounded
//!   queue ([`WebhookConfig::queue`] alerts) without waiting; one background task delivers
//!   them in order. A slow or dead endpoint holds up only that task. When the queue is full,
//!   the alert is dropped, counted in `tenant_kms_anomaly_webhook_dropped_total` and logged;
//!   the Anomaly audit record, the metric and the log line exist regardless (the audit chain
//!   is the source of truth; the SIEM stream delivers it at least once).
//! - **Retried.** An attempt that gets no answer within [`WebhookConfig::timeout`], cannot
//!   connect, or is answered 5xx, 408 or 429 is retried up to [`WebhookConfig::retries`]
//!   times, waiting [`WebhookConfig::backoff`] and doubling up to [`MAX_BACKOFF`]. Another
//!   4xx is not retried (a wrong URL or secret does not heal). Every attempt of one alert
//!   carries the same delivery id, so a receiver can drop the repeats of an alert whose answer
//!   was lost: delivery is at least once while the server runs.
//! - **Stopping** ([`Webhook::stop`]): a graceful stop gives what is still queued (and the
//!   alert waiting for its next retry) one last attempt each, at once, for at most the attempt
//!   timeout (and [`MAX_STOP_GRACE`]) in all; what is left then is dropped, counted and
//!   logged. The queue is not kept across a restart: the Anomaly audit records are.
//! - **Signed** ([`sign`]): HMAC-SHA256 with the secret of `anomaly_webhook_secret_file` over
//!   the timestamp header and the exact body.
//! - **Nothing secret in it** ([`payload`]): the finding's names and counts only.
//! - **Transport** ([`post`]): HTTP/1.1 with hyper's client; `https://` through rustls, trusting
//!   only `anomaly_webhook_tls_ca`.

pub mod payload;
pub mod post;
pub mod settings;
pub mod sign;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Bytes;
use tokio::sync::{mpsc, watch};

use crate::clock::SharedClock;
use crate::error::Result;
use crate::metrics::WebhookEvent;

pub use payload::AnomalyEvent;

/// Longest wait between two attempts of one alert.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Longest a stop waits for the last attempts (less when the attempt timeout is shorter): a
/// dead endpoint must not hold up a stop that a supervisor times.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(5);

/// Where and how alerts are sent (the `anomaly_webhook_*` configuration keys).
#[derive(Clone, PartialEq)]
pub struct WebhookConfig {
    /// The endpoint, `http://…` or `https://…`.
    pub url: String,
    /// The file holding the HMAC secret (first line; mode 0600 or stricter).
    pub secret_file: PathBuf,
    /// The CA (PEM) an `https://` endpoint's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// Longest one attempt may take (connect, TLS, send, status line).
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one, up to [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Alerts waiting for delivery at most; more are dropped (counted).
    pub queue: usize,
}

impl WebhookConfig {
    /// `url` signed with the secret in `secret_file`, with the defaults: a 5 s timeout, 5
    /// retries from 1 s (1, 2, 4, 8, 16 s), a queue of 1,000 alerts.
    pub fn new(url: impl Into<String>, secret_file: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            secret_file: secret_file.into(),
            tls_ca: None,
            timeout: Duration::from_secs(5),
            retries: 5,
            backoff: Duration::from_secs(1),
            queue: 1_000,
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    /// Shows the URL without its path (alerting services often carry a credential there).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: String = self
            .url
            .splitn(4, '/')
            .take(3)
            .collect::<Vec<_>>()
            .join("/");
        f.debug_struct("WebhookConfig")
            .field("url", &format_args!("{shown}/…"))
            .field("secret_file", &self.secret_file)
            .field("tls_ca", &self.tls_ca)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("queue", &self.queue)
            .finish()
    }
}

/// One alert: its delivery id and its body, ready to sign and send.
struct Alert {
    delivery: String,
    body: Bytes,
}

/// What the delivery task needs; taken by [`Webhook::start`].
struct Worker {
    alerts: mpsc::Receiver<Alert>,
    /// Alerts queued or being attempted (shared with [`Webhook`]).
    undelivered: Arc<AtomicUsize>,
    /// Turns true when the server stops (see [`Webhook::stop`]).
    stopping: watch::Receiver<bool>,
    target: post::Target,
    signer: sign::Signer,
    clock: SharedClock,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
}

/// The webhook of one server: the sending end of the queue, and the delivery task until it
/// is started.
pub struct Webhook {
    queue: mpsc::Sender<Alert>,
    worker: Mutex<Option<Worker>>,
    endpoint: String,
    stopping: watch::Sender<bool>,
    /// Alerts queued or being attempted: what a stop cut short leaves undelivered.
    undelivered: Arc<AtomicUsize>,
    /// How long a stop waits for the last attempts: one attempt's timeout, at most
    /// [`MAX_STOP_GRACE`].
    stop_grace: Duration,
}

impl Webhook {
    /// Reads the secret and the CA, parses the URL; signs with `clock`'s time. Errors name
    /// the key or file at fault (never the secret).
    pub fn open(config: &WebhookConfig, clock: SharedClock) -> Result<Self> {
        let target = post::Target::new(&config.url, config.tls_ca.as_deref())?;
        let signer = sign::Signer::from_file(&config.secret_file)?;
        let endpoint = target.shown().to_owned();
        if target.plaintext_off_host() {
            tracing::warn!(
                endpoint,
                "anomaly_webhook_url is plain http to another host: alerts (caller and tenant \
                 names) travel in clear; prefer https:// with anomaly_webhook_tls_ca"
            );
        }
        let (queue, alerts) = mpsc::channel(config.queue.max(1));
        let (stopping, stop_seen) = watch::channel(false);
        let undelivered = Arc::new(AtomicUsize::new(0));
        Ok(Self {
            queue,
            worker: Mutex::new(Some(Worker {
                alerts,
                undelivered: Arc::clone(&undelivered),
                stopping: stop_seen,
                target,
                signer,
                clock,
                timeout: config.timeout,
                retries: config.retries,
                backoff: config.backoff,
            })),
            endpoint,
            stopping,
            undelivered,
            stop_grace: config.timeout.min(MAX_STOP_GRACE),
        })
    }

    /// Starts the delivery task on the current tokio runtime (once; later calls return
    /// `None`). It ends when the webhook is dropped or the handle aborted.
    pub fn start(&self) -> Option<tokio::task::JoinHandle<()>> {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(tokio::spawn(worker.run()))
    }

    /// Stops the delivery task `task` (from [`Webhook::start`]): each alert still queued, and
    /// the one waiting for its next retry, gets one last attempt at once; after one attempt
    /// timeout in all (at most [`MAX_STOP_GRACE`]) the task is ended and what is left is
    /// dropped (counted, logged).
    pub async fn stop(&self, mut task: tokio::task::JoinHandle<()>) {
        self.stopping.send_replace(true);
        if tokio::time::timeout(self.stop_grace, &mut task)
            .await
            .is_ok()
        {
            return;
        }
        task.abort();
        // Ended for certain before counting: an attempt finishing meanwhile counts itself down.
        let _ = task.await;
        let left = self.undelivered.load(Ordering::Acquire);
        if left == 0 {
            // The last attempt ended just as the grace ran out: nothing was left behind.
            return;
        }
        for _ in 0..left {
            crate::metrics::global().webhook(WebhookEvent::Dropped);
        }
        tracing::error!(
            endpoint = %self.endpoint,
            left,
            "anomaly webhook: alerts not delivered at stop (the Anomaly audit records are kept)"
        );
    }

    /// Queues the alert of `event` without waiting. A full queue (or a task not running)
    /// drops it: counted and logged, the caller is never held up.
    pub fn send(&self, event: &AnomalyEvent<'_>) {
        let delivery = format!("{:016x}", rand::random::<u64>());
        let alert = Alert {
            body: Bytes::from(payload::body(event, &delivery)),
            delivery,
        };
        // Counted before it is queued: the task counts it down once attempted.
        self.undelivered.fetch_add(1, Ordering::AcqRel);
        if let Err(refused) = self.queue.try_send(alert) {
            self.undelivered.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::global().webhook(WebhookEvent::Dropped);
            let why = match refused {
                mpsc::error::TrySendError::Full(_) => "its queue is full",
                mpsc::error::TrySendError::Closed(_) => "its delivery task is not running",
            };
            tracing::warn!(
                target: "tenant_kms::anomaly",
                endpoint = %self.endpoint,
                detector = event.finding.detector.name(),
                caller = %event.finding.caller,
                tenant = %event.finding.tenant,
                request_id = event.request_id,
                "anomaly webhook alert dropped: {why} (the Anomaly audit record is kept)"
            );
        }
    }
}

impl Worker {
    async fn run(mut self) {
        loop {
            let stopped = self.stopping.clone();
            tokio::select! {
                biased;
                _ = stopping(stopped) => break,
                alert = self.alerts.recv() => match alert {
                    Some(alert) => self.attempt(&alert).await,
                    None => return,
                },
            }
        }
        // Stopping: one last attempt for each alert still queued (see [`Webhook::stop`]).
        while let Ok(alert) = self.alerts.try_recv() {
            self.attempt(&alert).await;
        }
    }

    /// [`Worker::deliver`], then `alert` is no longer undelivered (delivered or given up).
    async fn attempt(&self, alert: &Alert) {
        self.deliver(alert).await;
        self.undelivered.fetch_sub(1, Ordering::AcqRel);
    }

    /// Attempts `alert` until it is delivered, refused for good, or out of retries; once the
    /// server is stopping, no attempt waits for a retry: the next is the last, and at once.
    async fn deliver(&self, alert: &Alert) {
        let metrics = crate::metrics::global();
        let mut wait = self.backoff;
        let mut attempt = 0u32;
        let why = loop {
            attempt += 1;
            // Begun after the stop: the last. (One begun before it gets another, at once.)
            let last = *self.stopping.borrow();
            // Signed per attempt, so a retry carries a fresh timestamp.
            let timestamp = self.clock.now_unix();
            let headers = [
                (sign::TIMESTAMP_HEADER, timestamp.to_string()),
                (
                    sign::SIGNATURE_HEADER,
                    self.signer.sign(timestamp, &alert.body),
                ),
                (sign::DELIVERY_HEADER, alert.delivery.clone()),
            ];
            match self
                .target
                .post(&headers, alert.body.clone(), self.timeout)
                .await
            {
                post::Attempt::Delivered => {
                    metrics.webhook(WebhookEvent::Delivered);
                    tracing::debug!(delivery = %alert.delivery, attempt, "anomaly webhook delivered");
                    return;
                }
                post::Attempt::GiveUp(why) => break why,
                post::Attempt::Retry(why) if attempt > self.retries || last => break why,
                post::Attempt::Retry(why) => {
                    metrics.webhook(WebhookEvent::Retried);
                    tracing::warn!(
                        endpoint = %self.target.shown(),
                        delivery = %alert.delivery,
                        attempt,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "anomaly webhook attempt failed: {why}"
                    );
                    // A stop cuts the wait short: the next attempt is the last.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stopping(self.stopping.clone()) => {}
                    }
                    wait = wait.saturating_mul(2).min(MAX_BACKOFF);
                }
            }
        };
        metrics.webhook(WebhookEvent::Failed);
        tracing::error!(
            endpoint = %self.target.shown(),
            delivery = %alert.delivery,
            attempts = attempt,
            "anomaly webhook gave up on an alert: {why} (the Anomaly audit record is kept)"
        );
    }
}

/// Resolves once the server is stopping (at once if it is already).
async fn stopping(mut stopping: watch::Receiver<bool>) {
    // A sender dropped (the webhook gone) ends the task through its closed queue instead.
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}
