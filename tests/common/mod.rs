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

// Re-exported for the tests that move time; not every test file does.
#[allow(unused_imports)]
pub use tenant_kms::clock::{Clock, ManualClock, SharedClock};
use tenant_kms::pb;
use tenant_kms::pb::audit_service_client::AuditServiceClient;
use tenant_kms::pb::key_service_client::KeyServiceClient;
use tenant_kms::pb::tenant_service_client::TenantServiceClient;
use tenant_kms::service::{AppState, ServiceOptions, server};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub mod postgres;
pub mod tls;

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

    /// Starts a server on a fresh temporary data directory, with [`test_options`] changed by
    /// `configure`.
    pub async fn start_configured(configure: impl FnOnce(&mut ServiceOptions)) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut options = test_options(&temp.path().join("data"));
        configure(&mut options);
        let mut server = Self::start_with(options).await;
        server._temp = Some(temp);
        server
    }

    /// Starts a server on a fresh temporary data directory whose wall clock is `clock`: the
    /// test moves time (token expiry, deletion windows, rotation age) instead of waiting.
    pub async fn start_on_clock(clock: &Arc<ManualClock>) -> Self {
        let clock: SharedClock = clock.clone();
        Self::start_configured(|options| options.clock = clock).await
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
    try_create_tenant(tenants, id).await.unwrap()
}

/// `CreateTenant` (the raw result, to inspect errors).
pub async fn try_create_tenant(
    tenants: &mut Tenants,
    id: &str,
) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// The first 1,000 tenants (`ListTenants`, which must succeed), tombstones included.
pub async fn list_tenants(tenants: &mut Tenants) -> Vec<pb::Tenant> {
    tenants
        .list_tenants(pb::ListTenantsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenants
}

/// `GetTenant`.
pub async fn get_tenant(tenants: &mut Tenants, id: &str) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .get_tenant(pb::GetTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `RotateTenantKey`.
pub async fn rotate_tenant(tenants: &mut Tenants, id: &str) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `SuspendTenant`.
pub async fn suspend_tenant(tenants: &mut Tenants, id: &str) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .suspend_tenant(pb::SuspendTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `ResumeTenant`.
pub async fn resume_tenant(tenants: &mut Tenants, id: &str) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .resume_tenant(pb::ResumeTenantRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `ScheduleTenantDeletion` (`None`: the server's default window).
pub async fn schedule_deletion(
    tenants: &mut Tenants,
    id: &str,
    waiting: Option<u64>,
) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest {
            tenant_id: id.into(),
            waiting_period_seconds: waiting,
        })
        .await
        .map(|r| r.into_inner())
}

/// `CancelTenantDeletion`.
pub async fn cancel_deletion(tenants: &mut Tenants, id: &str) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .cancel_tenant_deletion(pb::CancelTenantDeletionRequest {
            tenant_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// `SetRotationPolicy` (period in seconds, 0: none; nonce budget, 0: the default).
pub async fn set_rotation_policy(
    tenants: &mut Tenants,
    id: &str,
    period: u64,
    max: u64,
) -> Result<pb::Tenant, tonic::Status> {
    tenants
        .set_rotation_policy(pb::SetRotationPolicyRequest {
            tenant_id: id.into(),
            rotation_period_seconds: period,
            max_encryptions: max,
        })
        .await
        .map(|r| r.into_inner())
}

/// `DisableKeyVersion`.
pub async fn disable_key_version(
    tenants: &mut Tenants,
    id: &str,
    version: u32,
) -> Result<pb::KeyVersion, tonic::Status> {
    tenants
        .disable_key_version(pb::DisableKeyVersionRequest {
            tenant_id: id.into(),
            version,
        })
        .await
        .map(|r| r.into_inner())
}

/// `EnableKeyVersion`.
pub async fn enable_key_version(
    tenants: &mut Tenants,
    id: &str,
    version: u32,
) -> Result<pb::KeyVersion, tonic::Status> {
    tenants
        .enable_key_version(pb::EnableKeyVersionRequest {
            tenant_id: id.into(),
            version,
        })
        .await
        .map(|r| r.into_inner())
}

/// `DestroyKeyVersion`.
pub async fn destroy_key_version(
    tenants: &mut Tenants,
    id: &str,
    version: u32,
) -> Result<pb::KeyVersion, tonic::Status> {
    tenants
        .destroy_key_version(pb::DestroyKeyVersionRequest {
            tenant_id: id.into(),
            version,
        })
        .await
        .map(|r| r.into_inner())
}

/// Every key version of a tenant (`ListKeyVersions`, which must succeed).
pub async fn key_versions(tenants: &mut Tenants, id: &str) -> Vec<pb::KeyVersion> {
    tenants
        .list_key_versions(pb::ListKeyVersionsRequest {
            tenant_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions
}

/// A new data key (`GenerateDataKey`, which must succeed).
pub async fn generate_data_key(
    keys: &mut Keys,
    tenant: &str,
    context: &str,
) -> pb::GenerateDataKeyResponse {
    keys.generate_data_key(pb::GenerateDataKeyRequest {
        tenant_id: tenant.into(),
        context: context.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// `DecryptDataKey` (the raw result, to inspect errors).
pub async fn decrypt_data_key(
    keys: &mut Keys,
    tenant: &str,
    context: &str,
    wrapped_key: &[u8],
) -> Result<pb::DecryptDataKeyResponse, tonic::Status> {
    keys.decrypt_data_key(pb::DecryptDataKeyRequest {
        tenant_id: tenant.into(),
        context: context.into(),
        wrapped_key: wrapped_key.to_vec(),
        // GenerateDataKey's keys are bound to no aad.
        aad: Vec::new(),
    })
    .await
    .map(|r| r.into_inner())
}

/// An `Encrypt` request.
pub fn encrypt_request(
    tenant: &str,
    context: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> pb::EncryptRequest {
    pb::EncryptRequest {
        tenant_id: tenant.into(),
        context: context.into(),
        plaintext: plaintext.to_vec(),
        aad: aad.to_vec(),
        ..Default::default()
    }
}

/// Encrypts one value.
pub async fn encrypt(
    keys: &mut Keys,
    tenant: &str,
    context: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> pb::EncryptResponse {
    keys.encrypt(encrypt_request(tenant, context, plaintext, aad))
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

/// A free loopback port (bound then released). Racy: another process may take the port
/// before the server binds it. Prefer `--listen 127.0.0.1:0` and [`await_listening`], as
/// [`BinaryServer::start`] does; kept for callers that need a port number up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Longest a `serve` child may take to open its data directory and start listening.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a `serve` child's stderr goes, so a failed start can show it.
pub enum ServerStderr<'a> {
    /// Piped to the test (read only if the start fails).
    Piped,
    /// Written to this file.
    File(&'a Path),
}

/// Waits until the `serve` child prints its ready line (`listening on ADDR`, once its data
/// directory is open and its listener bound) and returns the bound address. Needs the child's
/// stdout piped. If the child exits or stays silent for [`START_TIMEOUT`], it is killed and
/// the error holds the child's stderr. Blocks: call it off the async threads.
pub fn wait_listening(
    child: &mut Child,
    stderr: ServerStderr<'_>,
) -> Result<std::net::SocketAddr, String> {
    use std::io::BufRead;
    let Some(stdout) = child.stdout.take() else {
        return Err("the serve child's stdout is not piped".into());
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // A reader thread, so the wait can time out; after the ready line it keeps draining
    // stdout, so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_owned());
                sent = true;
            }
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(addr) => addr
            .parse()
            .map_err(|e| format!("serve printed a bad address {addr:?}: {e}")),
        Err(why) => {
            let _ = child.kill();
            let status = child.wait().ok();
            let text = match stderr {
                ServerStderr::Piped => {
                    let mut text = String::new();
                    if let Some(mut pipe) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
                    }
                    text
                }
                ServerStderr::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
            };
            Err(format!(
                "tenant-kms serve did not start ({why:?}, exit {status:?}); stderr:\n{text}"
            ))
        }
    }
}

/// [`wait_listening`] on the blocking pool; a failed start fails the test with the server's
/// stderr. Returns the child back with the bound address.
pub async fn await_listening(
    mut child: Child,
    stderr_file: Option<PathBuf>,
) -> (Child, std::net::SocketAddr) {
    let (child, result) = tokio::task::spawn_blocking(move || {
        let stderr = match &stderr_file {
            Some(path) => ServerStderr::File(path),
            None => ServerStderr::Piped,
        };
        let result = wait_listening(&mut child, stderr);
        (child, result)
    })
    .await
    .unwrap();
    match result {
        Ok(addr) => (child, addr),
        Err(message) => panic!("{message}"),
    }
}

/// A wall clock for the processes a test starts (`serve` children, CLI commands): the
/// system time plus an offset the test moves with [`ProcessClock::advance`]. Processes see it
/// through `TENANT_KMS_TEST_CLOCK_FILE`, which only `test-seams` builds (the binary cargo
/// builds for these tests) honour; a production build ignores it.
pub struct ProcessClock {
    path: PathBuf,
    offset: std::sync::atomic::AtomicI64,
    _dir: tempfile::TempDir,
}

impl ProcessClock {
    /// A clock standing at the real time (offset 0).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clock-offset");
        std::fs::write(&path, "0").unwrap();
        Self {
            path,
            offset: std::sync::atomic::AtomicI64::new(0),
            _dir: dir,
        }
    }

    /// Moves the time of every process on this clock `seconds` forward, at once.
    pub fn advance(&self, seconds: i64) {
        let offset = self
            .offset
            .fetch_add(seconds, std::sync::atomic::Ordering::SeqCst)
            + seconds;
        // Written beside and renamed over, so a reader never sees a half-written number.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, offset.to_string()).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Puts a command on this clock.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.env(tenant_kms::clock::TEST_CLOCK_ENV, &self.path)
    }
}

impl Default for ProcessClock {
    fn default() -> Self {
        Self::new()
    }
}

impl BinaryServer {
    /// Starts `tenant-kms serve` on `data_dir` with extra flags, on a port the server binds
    /// itself (port 0, learnt from its ready line), and waits until it serves.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(data_dir, extra, None, &[]).await
    }

    /// Like [`BinaryServer::start`], with the server's wall clock on `clock`.
    pub async fn start_on_clock(data_dir: &Path, extra: &[&str], clock: &ProcessClock) -> Self {
        Self::spawn(data_dir, extra, Some(clock), &[]).await
    }

    /// Like [`BinaryServer::start`], with extra environment values (the `test-seams` knobs:
    /// failpoints, a capped key store).
    pub async fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(data_dir, extra, None, env).await
    }

    async fn spawn(
        data_dir: &Path,
        extra: &[&str],
        clock: Option<&ProcessClock>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--min-deletion-window", "0s"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(clock) = clock {
            clock.apply(&mut command);
        }
        command.envs(env.iter().copied());
        let (child, addr) = await_listening(command.spawn().unwrap(), None).await;
        Self {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
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

    /// SIGKILL (a no-op if the process already died by itself, e.g. at a failpoint) and
    /// its exit status, which tells which of the two ended it.
    pub fn kill9_status(mut self) -> std::process::ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
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
    run_command(Command::new(BIN).args(args))
}

/// [`run_cli`] with the command's wall clock on `clock`.
pub fn run_cli_on_clock(args: &[&str], clock: &ProcessClock) -> (i32, String, String) {
    run_command(clock.apply(Command::new(BIN).args(args)))
}

/// Runs the binary with arguments and `stdin` as its standard input; returns (exit code,
/// stdout, stderr).
pub fn run_cli_with_stdin(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Small inputs: the child reads them whole before it writes, so this cannot deadlock.
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a prepared command to its end; returns (exit code, stdout, stderr).
pub fn run_command(command: &mut Command) -> (i32, String, String) {
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `tenant-kms serve` on `data_dir` expecting it to refuse to start: returns its exit
/// code and stderr. A server that starts anyway is killed after 60 s and the test fails
/// (rather than hanging).
pub fn serve_refused(data_dir: &Path) -> (i32, String) {
    serve_refused_with(data_dir, &[])
}

/// [`serve_refused`] with extra flags.
pub fn serve_refused_with(data_dir: &Path, extra: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve on {} did not refuse to start", data_dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
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
