//! `tenant-kms drill`: a breach drill an auditor can watch (issue 16). It runs, against a
//! server, the attacks an auditor asks about, and reports for each whether it was blocked
//! (the gRPC status seen), detected (the evidence found through `ListAuditEvents`: an
//! `Anomaly` record, or for dead tokens the refusal recorded by the token's name), and
//! contained (when the server is configured to), then whether the audit chain still verifies.
//! Exit 0 only when every scenario was blocked and detected and the chain verifies.
//!
//! By default the drill starts a child `tenant-kms serve` on a temporary data directory with
//! detector settings small enough for a drill ([`CHILD_CONFIG`]: short bursts trip, no
//! learning period, a rate spike quarantines the token) and stops it afterwards; the child
//! runs on the system clock (no clock is faked). `--detectors-off` switches detectors off in
//! the child, to show the drill failing. With `--addr`, the drill runs against that server
//! instead (plaintext loopback or private network; its admin token in `--token-file`, its data
//! directory in `--data-dir` so the drill can mint the scoped, revoked and expired tokens the
//! scenarios need, as `token create` would); its own detector settings then decide, and
//! `--volume` sizes the bursts.
//!
//! The scenarios, each with its own tokens and tenants (`drill-<random>-…`):
//! - `cross_tenant_decrypt`: a token scoped to one tenant decrypts naming other tenants;
//! - `ciphertext_moved`: a ciphertext opened under another tenant, context and row (AAD);
//! - `revoked_token`, `expired_token`: dead tokens used;
//! - `tenant_enumeration`: guessed tenant ids, one after another;
//! - `decrypt_spike`: a stolen token decrypting far above any baseline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use clap::Args;
use serde::Serialize;
// The drill's stubs authenticate as the CLI's do: through the client library's `Bearer`,
// whose header value is marked sensitive (never logged by tonic).
use tenant_kms_client::client::{AuthedChannel as Authed, Bearer};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::audit::operation::Task;
use crate::auth::{Role, TokenSpec, issue_token};
use crate::error::{Error, Result};
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::tenant_service_client::TenantServiceClient;
use crate::service::ServiceOptions;
use crate::service::state::{ADMIN_TOKEN_FILE, DataDir};

/// The child server's detector settings: bursts of [`CHILD_VOLUME`] trip every detector.
pub const CHILD_CONFIG: &str = "\
anomaly_learning = \"0s\"
anomaly_probe_tenants = 5
anomaly_enumeration_tenants = 5
anomaly_tamper_failures = 5
anomaly_spike_floor = 100
anomaly_spike_warmup = 0
anomaly_quarantine = [\"rate_spike\"]
";

/// Burst size against the child: one more than its thresholds.
pub const CHILD_VOLUME: usize = 6;

/// Arguments of `drill`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Drill this running server (http://host:port) instead of a child one.
    #[arg(long, requires_all = ["token_file", "data_dir"])]
    addr: Option<String>,
    /// With --addr: the file holding an admin token of that server.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// With --addr: that server's data directory (and keyring there), where the drill mints
    /// its tokens.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Burst size: distinct tenants probed, failed opens, guessed ids; a spike decrypts 20×
    /// this many items [default: 6 against the child, 60 with --addr].
    #[arg(long)]
    volume: Option<usize>,
    /// Detectors to switch off in the child server (comma-separated), e.g. probing: the
    /// drill then reports what goes undetected and exits 1.
    #[arg(long, value_delimiter = ',', conflicts_with = "addr")]
    detectors_off: Vec<String>,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one scenario showed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ScenarioReport {
    /// The scenario's name.
    pub scenario: &'static str,
    /// The gRPC status code that refused the attack, if it was refused.
    pub blocked: Option<String>,
    /// The evidence found in the audit log, if any.
    pub detected: Option<String>,
    /// The containment applied, if any.
    pub contained: Option<String>,
    /// Blocked and detected.
    pub passed: bool,
}

/// The whole drill.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// The server drilled (`child` or its address).
    pub server: String,
    /// Per scenario.
    pub scenarios: Vec<ScenarioReport>,
    /// `VerifyAuditChain` afterwards.
    pub audit_chain_verified: bool,
    /// Every scenario passed and the chain verified.
    pub passed: bool,
}

/// Runs `drill`.
pub fn run(args: DrillArgs) -> Result<ExitCode> {
    let runtime = super::client::runtime()?;
    let report = match &args.addr {
        Some(addr) => {
            let token_file = args.token_file.clone().unwrap_or_default();
            let data_dir = args.data_dir.clone().unwrap_or_default();
            let admin = read_token(&token_file)?;
            let volume = args.volume.unwrap_or(60);
            runtime.block_on(drill(addr, &admin, &data_dir, volume, addr.clone()))?
        }
        None => {
            let child = ChildServer::start(&args.detectors_off)?;
            let admin = read_token(&child.data_dir.join(ADMIN_TOKEN_FILE))?;
            let volume = args.volume.unwrap_or(CHILD_VOLUME);
            let url = child.url.clone();
            let report = runtime.block_on(drill(
                &url,
                &admin,
                &child.data_dir,
                volume,
                "child".to_owned(),
            ));
            drop(child);
            report?
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Error::internal(e.to_string()))?
        );
    } else {
        print!("{}", table(&report));
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

fn read_token(path: &Path) -> Result<Zeroizing<String>> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        Error::InvalidArgument(format!("cannot read token file {}: {e}", path.display()))
    })?);
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// The report as a table for people.
pub fn table(report: &DrillReport) -> String {
    let mut out = format!("breach drill against {}\n", report.server);
    out.push_str(&format!(
        "{:<22} {:<20} {:<8} {}\n",
        "scenario", "blocked", "detected", "evidence / containment"
    ));
    for s in &report.scenarios {
        let mut evidence = s.detected.clone().unwrap_or_else(|| "NOT DETECTED".into());
        if let Some(c) = &s.contained {
            evidence.push_str(&format!("; contained: {c}"));
        }
        out.push_str(&format!(
            "{:<22} {:<20} {:<8} {}\n",
            s.scenario,
            s.blocked.as_deref().unwrap_or("NOT BLOCKED"),
            if s.detected.is_some() { "yes" } else { "NO" },
            evidence
        ));
    }
    out.push_str(&format!(
        "audit chain verifies afterwards: {}\nresult: {}\n",
        if report.audit_chain_verified {
            "yes"
        } else {
            "NO"
        },
        if report.passed { "PASS" } else { "FAIL" }
    ));
    out
}

/// A child `tenant-kms serve` on a temporary data directory, killed on drop.
struct ChildServer {
    child: Child,
    url: String,
    data_dir: PathBuf,
    _temp: tempfile::TempDir,
}

impl ChildServer {
    fn start(detectors_off: &[String]) -> Result<Self> {
        let io =
            |e: std::io::Error| Error::Internal(format!("drill: cannot start a child server: {e}"));
        let temp = tempfile::tempdir().map_err(io)?;
        let data_dir = temp.path().join("data");
        let config = temp.path().join("drill.toml");
        let mut text = CHILD_CONFIG.to_owned();
        if !detectors_off.is_empty() {
            // Checked by the child's own parser: an unknown name fails its start.
            let names: Vec<String> = detectors_off.iter().map(|d| format!("\"{d}\"")).collect();
            text.push_str(&format!("anomaly_detectors_off = [{}]\n", names.join(", ")));
        }
        std::fs::write(&config, text).map_err(io)?;
        let exe = std::env::current_exe().map_err(io)?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--config")
            .arg(&config)
            .arg("--log")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::internal("child stdout"))?;
        let addr = ready_address(stdout);
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Unavailable(
                "drill: the child server did not start (run `tenant-kms serve` by hand to see why)"
                    .into(),
            ));
        };
        Ok(Self {
            child,
            url: format!("http://{addr}"),
            data_dir,
            _temp: temp,
        })
    }
}

/// Reads the child's stdout until its ready line; the address it names.
fn ready_address(stdout: std::process::ChildStdout) -> Option<String> {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    while let Some(Ok(line)) = lines.next() {
        if let Some(addr) = line.strip_prefix(super::serve::READY_LINE_PREFIX) {
            let addr = addr.trim().to_owned();
            // Keep draining its stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Some(addr);
        }
    }
    None
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Clients {
    keys: KeyServiceClient<Authed>,
    tenants: TenantServiceClient<Authed>,
    audit: AuditServiceClient<Authed>,
}

fn clients(channel: &Channel, token: &str) -> Result<Clients> {
    let auth = Bearer::new(token)
        .map_err(|_| Error::InvalidArgument("the token is not valid header text".into()))?;
    Ok(Clients {
        keys: KeyServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(64 << 20),
        tenants: TenantServiceClient::with_interceptor(channel.clone(), auth.clone()),
        audit: AuditServiceClient::with_interceptor(channel.clone(), auth),
    })
}

/// The drill's tokens, minted in the server's data directory as `token create` would.
struct Minter {
    dir: DataDir,
    options: ServiceOptions,
}

impl Minter {
    fn open(data_dir: &Path) -> Result<Self> {
        let mut options = ServiceOptions::new(data_dir);
        options.clock = crate::clock::process_clock();
        options.bootstrap_admin_token = false;
        let dir = DataDir::open(&options, false)?;
        Ok(Self { dir, options })
    }

    /// A service token for `tenants`, expiring at once with `expired`; (secret, audit name).
    fn mint(&self, tenants: &str, expired: bool) -> Result<(Zeroizing<String>, String)> {
        let issued = issue_token(
            self.dir.store.as_ref(),
            &TokenSpec {
                name: "breach-drill".into(),
                role: Role::Service,
                tenants: tenants.into(),
                operations: "*".into(),
                ttl_seconds: expired.then_some(0),
            },
            self.options.clock.as_ref(),
        )?;
        self.audit(
            Task::TokenCreate,
            format!("token {} role service (breach drill)", issued.record.id),
        )?;
        Ok((issued.secret, format!("token:{}", issued.record.id)))
    }

    fn revoke(&self, name: &str) -> Result<()> {
        let id = name.strip_prefix("token:").unwrap_or(name);
        self.dir
            .store
            .revoke_token(id, self.options.clock.now_unix())?;
        self.audit(Task::TokenRevoke, format!("token {id} (breach drill)"))
    }

    /// Audits a token change as `token create` / `token revoke` do.
    fn audit(&self, task: Task, detail: String) -> Result<()> {
        let audit = self.dir.audit_writer(&self.options)?;
        audit.append_blocking(super::common::cli_record(
            task,
            "",
            Vec::new(),
            crate::audit::Outcome::Ok,
            detail,
        ))?;
        audit.shutdown();
        Ok(())
    }
}

const CONTEXT: &str = "drill.customers.email";

fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

fn rpc_error(what: &str, status: tonic::Status) -> Error {
    Error::Unavailable(format!(
        "drill: {what}: {:?}: {}",
        status.code(),
        status.message()
    ))
}

/// Every status in `seen` is `wanted`: the attack was blocked with it.
fn blocked_as(seen: &[tonic::Code], wanted: tonic::Code) -> Option<String> {
    (!seen.is_empty() && seen.iter().all(|c| *c == wanted)).then(|| format!("{wanted:?}"))
}

/// Audit events of `operation` whose caller is `caller` (every tenant; the admin's view).
async fn events(
    audit: &mut AuditServiceClient<Authed>,
    operation: &str,
    caller: &str,
) -> Result<Vec<pb::AuditEvent>> {
    let mut found = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = audit
            .list_audit_events(pb::ListAuditEventsRequest {
                operation: operation.into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| rpc_error("ListAuditEvents", s))?
            .into_inner();
        found.extend(page.events.into_iter().filter(|e| e.caller == caller));
        if page.next_page_token.is_empty() {
            return Ok(found);
        }
        page_token = page.next_page_token;
    }
}

/// The Anomaly evidence for `caller`: `detector:NAME on TENANT (seq N)`, joined.
async fn anomaly_evidence(
    audit: &mut AuditServiceClient<Authed>,
    caller: &str,
) -> Result<Option<String>> {
    let found = events(audit, "Anomaly", caller).await?;
    Ok((!found.is_empty()).then(|| {
        found
            .iter()
            .map(|e| {
                let detector = e
                    .contexts
                    .iter()
                    .find_map(|c| c.strip_prefix("detector:"))
                    .unwrap_or("?");
                format!("Anomaly {detector} on {} (seq {})", e.tenant_id, e.seq)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }))
}

fn scenario(
    name: &'static str,
    blocked: Option<String>,
    detected: Option<String>,
    contained: Option<String>,
) -> ScenarioReport {
    ScenarioReport {
        scenario: name,
        passed: blocked.is_some() && detected.is_some(),
        blocked,
        detected,
        contained,
    }
}

/// Runs every scenario against the server at `url`.
async fn drill(
    url: &str,
    admin_token: &str,
    data_dir: &Path,
    volume: usize,
    server: String,
) -> Result<DrillReport> {
    let volume = volume.max(1);
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|_| Error::InvalidArgument(format!("invalid address {url}")))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to {url}: {e}")))?;
    let mut admin = clients(&channel, admin_token)?;
    let minter = Minter::open(data_dir)?;
    let run = crate::service::call::new_request_id();
    let tenant = |i: usize| format!("drill-{}-{i}", &run[..8]);
    for i in 0..=volume {
        admin
            .tenants
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: tenant(i),
            })
            .await
            .map_err(|s| rpc_error("CreateTenant", s))?;
    }
    let home = tenant(0);
    let sealed = admin
        .keys
        .encrypt(pb::EncryptRequest {
            tenant_id: home.clone(),
            context: CONTEXT.into(),
            plaintext: b"alice@example.com".to_vec(),
            aad: b"row-1".to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|s| rpc_error("Encrypt", s))?
        .into_inner()
        .ciphertext;
    let decrypt = |tenant: String, context: &str, aad: &[u8]| pb::DecryptRequest {
        tenant_id: tenant,
        context: context.into(),
        ciphertext: sealed.clone(),
        aad: aad.to_vec(),
    };
    let mut scenarios = Vec::new();

    // Cross-tenant decrypt with a scoped token.
    let (secret, name) = minter.mint(&home, false)?;
    let mut scoped = clients(&channel, &secret)?;
    let mut seen = Vec::new();
    for i in 1..=volume {
        let result = scoped
            .keys
            .decrypt(decrypt(tenant(i), CONTEXT, b"row-1"))
            .await;
        seen.push(result.err().map_or(tonic::Code::Ok, |s| s.code()));
    }
    scenarios.push(scenario(
        "cross_tenant_decrypt",
        blocked_as(&seen, tonic::Code::PermissionDenied),
        anomaly_evidence(&mut admin.audit, &name).await?,
        None,
    ));

    // Ciphertext moved between tenants, contexts and rows.
    let (secret, name) = minter.mint("*", false)?;
    let mut mover = clients(&channel, &secret)?;
    let mut seen = Vec::new();
    let moved = mover
        .keys
        .decrypt(decrypt(tenant(1), CONTEXT, b"row-1"))
        .await;
    seen.push(moved.err().map_or(tonic::Code::Ok, |s| s.code()));
    for i in 0..volume {
        let request = if i % 2 == 0 {
            decrypt(home.clone(), "drill.other.column", b"row-1")
        } else {
            decrypt(home.clone(), CONTEXT, format!("row-{}", i + 2).as_bytes())
        };
        let result = mover.keys.decrypt(request).await;
        seen.push(result.err().map_or(tonic::Code::Ok, |s| s.code()));
    }
    scenarios.push(scenario(
        "ciphertext_moved",
        blocked_as(&seen, tonic::Code::InvalidArgument),
        anomaly_evidence(&mut admin.audit, &name).await?,
        None,
    ));

    // A revoked and an expired token: refused, and recorded by the token's name.
    for (label, expired) in [("revoked_token", false), ("expired_token", true)] {
        let (secret, name) = minter.mint(&home, expired)?;
        if !expired {
            minter.revoke(&name)?;
        }
        let mut dead = clients(&channel, &secret)?;
        let result = dead
            .keys
            .decrypt(decrypt(home.clone(), CONTEXT, b"row-1"))
            .await;
        let seen = [result.err().map_or(tonic::Code::Ok, |s| s.code())];
        let state = if expired { "expired" } else { "revoked" };
        let recorded = events(&mut admin.audit, "Decrypt", &format!("{name} ({state})")).await?;
        scenarios.push(scenario(
            label,
            blocked_as(&seen, tonic::Code::Unauthenticated),
            recorded
                .first()
                .map(|e| format!("Decrypt refused, recorded as {} (seq {})", e.caller, e.seq)),
            None,
        ));
    }

    // Tenant id enumeration: guessed ids, one after another.
    let (secret, name) = minter.mint("*", false)?;
    let mut guesser = clients(&channel, &secret)?;
    let mut seen = Vec::new();
    for i in 0..volume {
        let result = guesser
            .tenants
            .get_tenant(pb::GetTenantRequest {
                tenant_id: format!("drill-{}-guess-{i}", &run[..8]),
            })
            .await;
        seen.push(result.err().map_or(tonic::Code::Ok, |s| s.code()));
    }
    scenarios.push(scenario(
        "tenant_enumeration",
        blocked_as(&seen, tonic::Code::NotFound),
        anomaly_evidence(&mut admin.audit, &name).await?,
        None,
    ));

    // A decrypt spike with a stolen token: allowed until detected, then contained if the
    // server is configured to; blocked means the next call was refused.
    let (secret, name) = minter.mint(&home, false)?;
    let mut stolen = clients(&channel, &secret)?;
    let items: Vec<pb::DecryptBatchItem> = (0..volume.saturating_mul(20))
        .map(|_| pb::DecryptBatchItem {
            context: CONTEXT.into(),
            ciphertext: sealed.clone(),
            aad: b"row-1".to_vec(),
        })
        .collect();
    stolen
        .keys
        .decrypt_batch(pb::DecryptBatchRequest {
            tenant_id: home.clone(),
            items,
        })
        .await
        .map_err(|s| rpc_error("DecryptBatch (the spike)", s))?;
    let next = stolen
        .keys
        .decrypt(decrypt(home.clone(), CONTEXT, b"row-1"))
        .await;
    let blocked = next.err().map(|s| code_name(&s));
    let id = name.strip_prefix("token:").unwrap_or(&name).to_owned();
    let quarantined = events(
        &mut admin.audit,
        "TokenQuarantine",
        crate::service::anomaly::DETECTOR_CALLER,
    )
    .await?
    .iter()
    .any(|e| e.detail.contains(&format!("token {id} ")));
    let contained = if quarantined && blocked.as_deref() == Some("PermissionDenied") {
        Some("token quarantined".to_owned())
    } else if blocked.as_deref() == Some("ResourceExhausted") {
        Some("caller throttled".to_owned())
    } else {
        None
    };
    scenarios.push(scenario(
        "decrypt_spike",
        blocked,
        anomaly_evidence(&mut admin.audit, &name).await?,
        contained,
    ));

    let verified = admin
        .audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .map_err(|s| rpc_error("VerifyAuditChain", s))?
        .into_inner()
        .ok;
    let passed = verified && scenarios.iter().all(|s| s.passed);
    Ok(DrillReport {
        server,
        scenarios,
        audit_chain_verified: verified,
        passed,
    })
}
