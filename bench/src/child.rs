//! The server under test as a child process: the same binary's `serve` (the product's
//! `serve` plus the echo baseline), on a data directory and a free loopback port. Being a separate process is
//! what lets `bench` read the server's own CPU time and memory from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use tenant_kms::audit::Durability;
use tenant_kms::error::{Error, Result};
use tenant_kms::service::state::ADMIN_TOKEN_FILE;

/// How long a child may take to answer health checks after starting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `tenant-kms-bench serve` child (or the `serve` of `--server-exe`).
pub struct ChildServer {
    child: Option<Child>,
    /// Its process id.
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its stderr log file.
    pub log: PathBuf,
}

/// How to start a child.
pub struct ChildOptions<'a> {
    /// The data directory (created by the child if missing).
    pub data_dir: &'a Path,
    /// Audit durability.
    pub durability: Durability,
    /// A `serve --config` file (cache size), if any.
    pub config: Option<&'a Path>,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Extra `serve` flags.
    pub extra: Vec<String>,
    /// The binary whose `serve` to run (default: this one, which serves the echo baseline),
    /// e.g. an older build to compare.
    pub exe: Option<PathBuf>,
}

/// A loopback port free at the time of asking.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Internal(format!("no free loopback port: {e}")))?;
    Ok(listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("no free loopback port: {e}")))?
        .port())
}

impl ChildServer {
    /// Starts `current_exe serve` and waits until it answers a health check.
    pub async fn start(options: ChildOptions<'_>) -> Result<Self> {
        let exe = match options.exe {
            Some(exe) => exe,
            None => std::env::current_exe()
                .map_err(|e| Error::Internal(format!("cannot find this executable: {e}")))?,
        };
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(&options.log).map_err(|e| {
            Error::Internal(format!("cannot create {}: {e}", options.log.display()))
        })?;
        let mut command = Command::new(exe);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(options.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--audit-durability")
            .arg(match options.durability {
                Durability::Fsync => "fsync",
                Durability::Process => "process",
            })
            .arg("--log")
            .arg("warn")
            .args(&options.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(config) = options.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .spawn()
            .map_err(|e| Error::Internal(format!("cannot start the server: {e}")))?;
        let mut server = Self {
            pid: child.id(),
            child: Some(child),
            url,
            log: options.log,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Error::Internal(format!(
                    "the server exited at start ({status}); its log {}:\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )));
            }
            if let Ok(channel) = connect(&self.url).await {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                };
                if health.check(request).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::Internal(format!(
            "the server did not answer within {START_TIMEOUT:?}; its log: {}",
            self.log.display()
        )))
    }

    /// Stops the child with SIGTERM (graceful: in-flight calls finish) and waits for it;
    /// kills it if it takes longer than a bound.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    async fn stop_inner(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The admin token a first start wrote into the data directory.
pub fn admin_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))
}

/// One HTTP/2 connection to `url` (each call makes a new connection).
pub async fn connect(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_owned())
        .map_err(|_| Error::InvalidArgument(format!("invalid address {url}")))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to {url}: {e}")))
}
