//! Shared integration-test harness: a real server on an ephemeral loopback port with a
//! temporary data directory, and generated gRPC clients that send the admin token.
//!
//! Two ways to run a server:
//! - [`TestServer::start`]: in this process (fast; most tests);
//! - [`BinaryServer::start`]: the real `tenant-kms serve` binary as a child process (for
//!   restarts, SIGKILL, and tests that need another process).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tenant_kms::pb;
use tenant_kms::pb::audit_service_client::AuditServiceClient;
use tenant_kms::pb::key_service_client::KeyServiceClient;
use tenant_kms::pb::tenant_service_client::TenantServiceClient;
use tenant_kms::service::{AppState, ServiceOptions, server};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tenant-kms");

/// Adds a bearer token (or nothing) to every request.
#[derive(Clone)]
pub struct Auth(pub Option<String>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

/// Authenticated clients of one server.
pub type Keys = KeyServiceClient<InterceptedService<Channel, Auth>>;
/// Tenant client.
pub type Tenants = TenantServiceClient<InterceptedService<Channel, Auth>>;
/// Audit client.
pub type Audit = AuditServiceClient<InterceptedService<Channel, Auth>>;

/// Options with test-friendly defaults: a zero minimum deletion window.
pub fn test_options(dir: &Path) -> ServiceOptions {
    let mut options = ServiceOptions::new(dir);
    options.min_deletion_window_seconds = 0;
    options
}

/// A server running inside the test process.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token: String,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server on a fresh temporary data directory.
    pub async fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        let mut server = Self::start_with(test_options(&dir)).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server with the given options (the data directory may already exist).
    pub async fn start_with(options: ServiceOptions) -> Self {
        let data_dir = options.data_dir.clone();
        let state = Arc::new(
            tokio::task::spawn_blocking(move || AppState::open(options))
                .await
                .unwrap()
                .expect("server state opens"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run_state = Arc::clone(&state);
        let handle = tokio::spawn(async move {
            server::run(listener, run_state, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            addr,
            data_dir,
            admin_token,
            state,
            shutdown: Some(tx),
            handle: Some(handle),
            _temp: None,
        }
    }

    /// Stops the server and waits for it; keeps the data directory.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap();
        }
        self._temp.take()
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Clients authenticated with `token` (None: no token at all).
    pub async fn clients_with(&self, token: Option<&str>) -> (Keys, Tenants, Audit) {
        clients(&self.url(), token).await
    }

    /// Clients authenticated as the bootstrap admin.
    pub async fn clients(&self) -> (Keys, Tenants, Audit) {
        self.clients_with(Some(&self.admin_token.clone())).await
    }

    /// Number of audit records so far.
    pub fn audit_count(&self) -> u64 {
        self.state.audit_reader.count().unwrap()
    }
}

/// Connects clients to `url`.
pub async fn clients(url: &str, token: Option<&str>) -> (Keys, Tenants, Audit) {
    let channel = connect(url).await;
    let auth = Auth(token.map(str::to_owned));
    (
        KeyServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        TenantServiceClient::with_interceptor(channel.clone(), auth.clone()),
        AuditServiceClient::with_interceptor(channel, auth),
    )
}

/// A channel to `url`, retrying while the server comes up (bounded).
pub async fn connect(url: &str) -> Channel {
    let endpoint = Channel::from_shared(url.to_owned()).unwrap();
    for _ in 0..200 {
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {url} did not come up");
}

/// Creates a tenant through the API.
pub async fn create_tenant(tenants: &mut Tenants, id: &str) -> pb::Tenant {
    tenants
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Encrypts one value.
pub async fn encrypt(
    keys: &mut Keys,
    tenant: &str,
    context: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> pb::EncryptResponse {
    keys.encrypt(pb::EncryptRequest {
        tenant_id: tenant.into(),
        context: context.into(),
        plaintext: plaintext.to_vec(),
        aad: aad.to_vec(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Decrypts one value (the raw result, to inspect errors).
pub async fn decrypt(
    keys: &mut Keys,
    tenant: &str,
    context: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<pb::DecryptResponse, tonic::Status> {
    keys.decrypt(pb::DecryptRequest {
        tenant_id: tenant.into(),
        context: context.into(),
        ciphertext: ciphertext.to_vec(),
        aad: aad.to_vec(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Every file below `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && needle.len() <= bytes.len()
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path);
            }
        }
    }
    hits
}

/// The real binary serving a data directory, as a child process.
pub struct BinaryServer {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
}

/// A free loopback port (bound then released; the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl BinaryServer {
    /// Starts `tenant-kms serve` on `data_dir` with extra flags, and waits until it answers
    /// health checks.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--min-deletion-window")
            .arg("0s")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        };
        let channel = connect(&server.url()).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for _ in 0..200 {
            if health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin token written on first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit; returns its stderr. Waits on the blocking pool
    /// so this test's runtime keeps serving its own connections (which the server's graceful
    /// shutdown waits to see close).
    pub async fn terminate(mut self) -> String {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `unwrap_err` for results whose success type has (deliberately) no `Debug`.
pub trait StatusErr {
    /// The error status; panics if the call succeeded.
    fn status_err(self) -> tonic::Status;
}

impl<T> StatusErr for Result<T, tonic::Status> {
    fn status_err(self) -> tonic::Status {
        match self {
            Ok(_) => panic!("expected the call to fail, but it succeeded"),
            Err(status) => status,
        }
    }
}
