//! The churn soak: tenants are created, used, rotated (through the server and, now and then,
//! by the `rotate` command in another process), suspended, resumed, scheduled for deletion,
//! cancelled and destroyed (at once, or later by `rotate --due` in another process) while
//! Encrypt/Decrypt load runs on all of them, including those that must refuse.
//!
//! One lifecycle driver makes every transition, one at a time, and records for each the
//! instant it sent the request and the instant it got the answer: the change took effect
//! somewhere in between. Each load call is recorded the same way. A successful call is a
//! violation when the tenant cannot have been ACTIVE at any instant of the call, i.e. the
//! call's interval misses every interval in which an ACTIVE state might have held.
//!
//! At the end: every tenant that is not destroyed is brought back to ACTIVE and all of its
//! kept ciphertexts must decrypt; the server stops; `audit verify` must pass; and no file in
//! the data directory may contain any wrapped key bytes of a destroyed tenant (read from the
//! store just before its deletion was scheduled).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::child::ChildServer;
use super::scenario::{AAD, Bearer, CONTEXT, KeyClient};
use tenant_kms::domain::TenantId;
use tenant_kms::error::{Error, Result};
use tenant_kms::pb;
use tenant_kms::pb::tenant_service_client::TenantServiceClient;
use tenant_kms::store::{BackupStore, SqliteKeyStore};

type TenantClient = TenantServiceClient<InterceptedService<Channel, Bearer>>;

/// Tenants kept alive (not destroyed) at any time.
const LIVE_TENANTS: usize = 24;
/// Ciphertexts kept per tenant for the final check.
const KEPT_CIPHERTEXTS: usize = 6;
/// How often `rotate --due` runs in another process.
const DUE_EVERY: Duration = Duration::from_secs(2);
/// How often `rotate --tenant` runs in another process.
const CLI_ROTATE_EVERY: Duration = Duration::from_secs(5);
/// Most violations listed in the report (all are counted).
const LISTED_VIOLATIONS: usize = 20;

/// A tenant's lifecycle state as the soak tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Active,
    Suspended,
    Pending,
    Destroyed,
}

fn state_of(tenant: &pb::Tenant) -> St {
    match pb::TenantState::try_from(tenant.state) {
        Ok(pb::TenantState::Active) => St::Active,
        Ok(pb::TenantState::Suspended) => St::Suspended,
        Ok(pb::TenantState::PendingDeletion) => St::Pending,
        _ => St::Destroyed,
    }
}

/// A transition: requested at `sent`, answered at `answered`, leaving `state`.
#[derive(Debug, Clone, Copy)]
struct Transition {
    sent: Instant,
    answered: Instant,
    state: St,
}

struct Tenant {
    id: String,
    state: St,
    transitions: Vec<Transition>,
    ciphertexts: Vec<Vec<u8>>,
    wrapped: Vec<Vec<u8>>,
}

impl Tenant {
    /// The intervals in which the tenant may have been ACTIVE: from the moment a transition
    /// to ACTIVE may have taken effect until the next transition was answered.
    fn active_windows(&self) -> Vec<(Instant, Option<Instant>)> {
        let mut windows = Vec::new();
        for (i, t) in self.transitions.iter().enumerate() {
            if t.state == St::Active {
                windows.push((t.sent, self.transitions.get(i + 1).map(|n| n.answered)));
            }
        }
        windows
    }
}

#[derive(Debug, Clone, Copy)]
struct CallRecord {
    tenant: usize,
    decrypt: bool,
    sent: Instant,
    answered: Instant,
    ok: bool,
}

/// What a churn soak did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnReport {
    /// Audit durability of the server.
    pub durability: String,
    /// Seconds the soak ran.
    pub seconds: f64,
    /// Operations done, by kind.
    pub ops: BTreeMap<String, u64>,
    /// Tenants created in the soak.
    pub tenants: usize,
    /// Successful calls made while the tenant could not have been ACTIVE (must be 0).
    pub violations: u64,
    /// The first few, described.
    pub violation_examples: Vec<String>,
    /// Live tenants whose kept ciphertexts were decrypted at the end.
    pub live_tenants_checked: u64,
    /// Ciphertexts decrypted at the end.
    pub ciphertexts_checked: u64,
    /// Of those, how many failed (must be 0).
    pub final_decrypt_failures: u64,
    /// `audit verify` passed after the server stopped.
    pub audit_verified: bool,
    /// The verify command's output.
    pub audit_verify_output: String,
    /// Destroyed tenants whose wrapped keys were searched for on disk.
    pub destroyed_tenants_checked: u64,
    /// Wrapped keys of destroyed tenants still found in some file (must be 0).
    pub destroyed_key_bytes_found: u64,
    /// Where they were found (file name, tenant).
    pub destroyed_key_bytes_where: Vec<String>,
    /// `Anomaly` records the server's detectors wrote during the soak: false positives,
    /// since the soak's traffic is steady and honest (must be 0 at the default settings).
    pub anomalies: u64,
    /// Their details (detector and figures), the first few.
    pub anomaly_examples: Vec<String>,
    /// Every check held.
    pub passed: bool,
}

impl ChurnReport {
    /// A short human-readable summary.
    pub fn to_text(&self) -> String {
        let ops: Vec<String> = self.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let mut text = format!(
            "churn soak ({} durability, {:.0}s): {}\n  operations: {}\n  tenants created {}; \
             violations {}; final decrypts {} of {} ok over {} live tenants; audit verify {}; \
             destroyed tenants checked on disk {}, key bytes found {}; anomalies (false \
             positives) {}",
            self.durability,
            self.seconds,
            if self.passed { "PASSED" } else { "FAILED" },
            ops.join(", "),
            self.tenants,
            self.violations,
            self.ciphertexts_checked - self.final_decrypt_failures,
            self.ciphertexts_checked,
            self.live_tenants_checked,
            if self.audit_verified { "ok" } else { "FAILED" },
            self.destroyed_tenants_checked,
            self.destroyed_key_bytes_found,
            self.anomalies,
        );
        for example in &self.anomaly_examples {
            text.push_str(&format!("\n  anomaly: {example}"));
        }
        for example in &self.violation_examples {
            text.push_str(&format!("\n  violation: {example}"));
        }
        text
    }
}

struct Shared {
    tenants: RwLock<Vec<Arc<Mutex<Tenant>>>>,
    ops: Mutex<BTreeMap<String, u64>>,
    /// Indices of the tenants the driver last saw not destroyed (the load's usual targets).
    live: RwLock<Arc<Vec<usize>>>,
}

impl Shared {
    fn count(&self, op: &str) {
        *self
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op.to_owned())
            .or_default() += 1;
    }

    fn tenant(&self, index: usize) -> Option<Arc<Mutex<Tenant>>> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
            .cloned()
    }

    fn live(&self) -> Arc<Vec<usize>> {
        Arc::clone(&self.live.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn len(&self) -> usize {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How to run a soak.
pub struct ChurnOptions<'a> {
    /// The data directory the child server serves.
    pub data_dir: &'a Path,
    /// The server (a child of this process; stopped by the soak for the final checks).
    pub server: ChildServer,
    /// Its admin token.
    pub token: String,
    /// Audit durability label.
    pub durability: String,
    /// How long to churn.
    pub duration: Duration,
    /// Load calls in flight.
    pub concurrency: usize,
    /// Tenant-id prefix (unique per soak: destroyed ids cannot be reused).
    pub prefix: String,
}

/// Runs one soak and its final checks.
pub async fn run(options: ChurnOptions<'_>) -> Result<ChurnReport> {
    let bearer = Bearer::new(&options.token)?;
    let channel = super::child::connect(&options.server.url).await?;
    let keys = super::scenario::key_client(channel.clone(), bearer.clone());
    let tenants = TenantServiceClient::with_interceptor(channel, bearer);
    let store = SqliteKeyStore::open(&options.data_dir.join(tenant_kms::service::state::KEYS_DB))?;
    let shared = Arc::new(Shared {
        tenants: RwLock::new(Vec::new()),
        ops: Mutex::new(BTreeMap::new()),
        live: RwLock::new(Arc::new(Vec::new())),
    });
    let started = Instant::now();
    let end = started + options.duration;

    let mut workers = Vec::new();
    for slot in 0..options.concurrency.max(1) {
        workers.push(tokio::spawn(load_worker(
            Arc::clone(&shared),
            keys.clone(),
            end,
            slot as u64,
        )));
    }
    let mut driver = Driver {
        shared: Arc::clone(&shared),
        tenants,
        store: &store,
        data_dir: options.data_dir.to_path_buf(),
        prefix: options.prefix.clone(),
        created: 0,
        rng: SmallRng::seed_from_u64(0x5eed),
    };
    driver.churn(end).await?;
    let mut calls = Vec::new();
    for worker in workers {
        calls.extend(
            worker
                .await
                .map_err(|e| Error::Internal(format!("load worker failed: {e}")))?,
        );
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut report = ChurnReport {
        durability: options.durability.clone(),
        seconds,
        tenants: shared.len(),
        ..ChurnReport::default()
    };
    check_calls(&shared, &calls, &mut report);
    driver.final_decrypts(keys, &mut report).await?;
    drop(driver);
    drop(store);
    options.server.stop().await;
    verify_audit(options.data_dir, &mut report).await?;
    count_anomalies(options.data_dir, &mut report)?;
    check_shredded(&shared, options.data_dir, &mut report)?;
    report.ops = lock(&shared.ops).clone();
    report.passed = report.violations == 0
        && report.final_decrypt_failures == 0
        && report.audit_verified
        && report.destroyed_key_bytes_found == 0
        && report.anomalies == 0;
    Ok(report)
}

/// Counts the Anomaly records of the soak (read without the master key, like `audit export`).
fn count_anomalies(data_dir: &Path, report: &mut ChurnReport) -> Result<()> {
    let options = tenant_kms::service::ServiceOptions::new(data_dir);
    let log = tenant_kms::service::state::open_audit_log_unkeyed(&options)?;
    let found = log.list(&tenant_kms::audit::ListFilter {
        operation: "Anomaly".into(),
        limit: 1_000_000,
        ..Default::default()
    })?;
    report.anomalies = found.len() as u64;
    report.anomaly_examples = found
        .iter()
        .take(LISTED_VIOLATIONS)
        .map(|(_, r)| format!("{} {} {}", r.caller, r.tenant_id, r.detail))
        .collect();
    Ok(())
}

/// Encrypts and decrypts for random tenants (any state) until `end`.
async fn load_worker(
    shared: Arc<Shared>,
    mut keys: KeyClient,
    end: Instant,
    seed: u64,
) -> Vec<CallRecord> {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut calls = Vec::new();
    while Instant::now() < end {
        let count = shared.len();
        if count == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // Most calls go to tenants the driver last saw not destroyed (most tenants ever
        // created are destroyed, so a uniform pick would hardly exercise the live ones); one
        // call in five picks any tenant, destroyed ones included.
        let live = shared.live();
        let index = if !live.is_empty() && !rng.random_ratio(1, 5) {
            live[rng.random_range(0..live.len())]
        } else {
            rng.random_range(0..count)
        };
        let Some(tenant) = shared.tenant(index) else {
            continue;
        };
        let (id, ciphertext) = {
            let t = lock(&tenant);
            let ct = if !t.ciphertexts.is_empty() && rng.random_bool(0.5) {
                Some(t.ciphertexts[rng.random_range(0..t.ciphertexts.len())].clone())
            } else {
                None
            };
            (t.id.clone(), ct)
        };
        let sent = Instant::now();
        let (decrypt, ok, produced) = match ciphertext {
            Some(ciphertext) => {
                let result = keys
                    .decrypt(pb::DecryptRequest {
                        tenant_id: id,
                        context: CONTEXT.into(),
                        ciphertext,
                        aad: AAD.to_vec(),
                    })
                    .await;
                (true, result.is_ok(), None)
            }
            None => {
                let result = keys
                    .encrypt(pb::EncryptRequest {
                        tenant_id: id,
                        context: CONTEXT.into(),
                        plaintext: b"churn value".to_vec(),
                        aad: AAD.to_vec(),
                        ..Default::default()
                    })
                    .await;
                match result {
                    Ok(r) => (false, true, Some(r.into_inner().ciphertext)),
                    Err(_) => (false, false, None),
                }
            }
        };
        let answered = Instant::now();
        shared.count(match (decrypt, ok) {
            (false, true) => "encrypt_ok",
            (false, false) => "encrypt_refused",
            (true, true) => "decrypt_ok",
            (true, false) => "decrypt_refused",
        });
        if let Some(ct) = produced {
            let mut t = lock(&tenant);
            if t.ciphertexts.len() < KEPT_CIPHERTEXTS {
                t.ciphertexts.push(ct);
            } else {
                let slot = rng.random_range(0..KEPT_CIPHERTEXTS);
                t.ciphertexts[slot] = ct;
            }
        }
        calls.push(CallRecord {
            tenant: index,
            decrypt,
            sent,
            answered,
            ok,
        });
    }
    calls
}

struct Driver<'a> {
    shared: Arc<Shared>,
    tenants: TenantClient,
    store: &'a SqliteKeyStore,
    data_dir: PathBuf,
    prefix: String,
    created: usize,
    rng: SmallRng,
}

impl Driver<'_> {
    /// Makes transitions until `end`.
    async fn churn(&mut self, end: Instant) -> Result<()> {
        let mut next_due = Instant::now() + DUE_EVERY;
        let mut next_cli_rotate = Instant::now() + CLI_ROTATE_EVERY;
        while Instant::now() < end {
            if Instant::now() >= next_due {
                self.rotate_due().await?;
                next_due = Instant::now() + DUE_EVERY;
                continue;
            }
            if Instant::now() >= next_cli_rotate {
                self.cli_rotate().await?;
                next_cli_rotate = Instant::now() + CLI_ROTATE_EVERY;
                continue;
            }
            let live = self.indices(|s| s != St::Destroyed);
            *self.shared.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live.clone());
            if live.len() < LIVE_TENANTS {
                self.create().await?;
                continue;
            }
            let pick = self.rng.random_range(0..live.len());
            let index = live[pick];
            let state = self.state(index);
            let roll = self.rng.random_range(0..100);
            match state {
                St::Active if roll < 35 => self.rotate(index).await?,
                St::Active if roll < 70 => self.suspend(index).await?,
                St::Active if roll < 85 => self.schedule(index, 1).await?,
                St::Active => self.schedule(index, 0).await?,
                St::Suspended if roll < 60 => self.resume(index).await?,
                St::Suspended if roll < 80 => self.rotate(index).await?,
                St::Suspended => self.schedule(index, 1).await?,
                St::Pending if roll < 50 => self.cancel(index).await?,
                // Leave it to `rotate --due`.
                St::Pending | St::Destroyed => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        Ok(())
    }

    fn indices(&self, keep: impl Fn(St) -> bool) -> Vec<usize> {
        self.shared
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter(|(_, t)| keep(lock(t).state))
            .map(|(i, _)| i)
            .collect()
    }

    fn state(&self, index: usize) -> St {
        self.shared
            .tenant(index)
            .map_or(St::Destroyed, |t| lock(&t).state)
    }

    fn id(&self, index: usize) -> String {
        self.shared
            .tenant(index)
            .map(|t| lock(&t).id.clone())
            .unwrap_or_default()
    }

    fn record(&self, index: usize, sent: Instant, state: St) {
        if let Some(t) = self.shared.tenant(index) {
            let mut t = lock(&t);
            t.state = state;
            t.transitions.push(Transition {
                sent,
                answered: Instant::now(),
                state,
            });
        }
    }

    /// The tenant's state as the server reports it. A destroyed tenant's GetTenant answers
    /// FAILED_PRECONDITION "tenant destroyed" (its tombstone shows only in ListTenants).
    async fn server_state(&mut self, index: usize) -> Result<St> {
        let id = self.id(index);
        match self
            .tenants
            .get_tenant(pb::GetTenantRequest { tenant_id: id })
            .await
        {
            Ok(tenant) => Ok(state_of(&tenant.into_inner())),
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("tenant destroyed") =>
            {
                Ok(St::Destroyed)
            }
            Err(s) => Err(Error::Unavailable(format!(
                "churn: GetTenant: {}",
                s.message()
            ))),
        }
    }

    /// After a transition failed: learn the tenant's real state (the server's reaper may have
    /// destroyed it) and record it as a transition that may have happened since `sent`.
    async fn resync(&mut self, index: usize, sent: Instant) -> Result<()> {
        let state = self.server_state(index).await?;
        if state != self.state(index) {
            self.record(index, sent, state);
        }
        self.shared.count("resync");
        Ok(())
    }

    async fn create(&mut self) -> Result<()> {
        let id = format!("{}{}", self.prefix, self.created);
        self.created += 1;
        let sent = Instant::now();
        self.tenants
            .create_tenant(pb::CreateTenantRequest {
                tenant_id: id.clone(),
            })
            .await
            .map_err(|s| Error::Unavailable(format!("churn: CreateTenant: {}", s.message())))?;
        let tenant = Tenant {
            id,
            state: St::Active,
            transitions: vec![Transition {
                sent,
                answered: Instant::now(),
                state: St::Active,
            }],
            ciphertexts: Vec::new(),
            wrapped: Vec::new(),
        };
        self.shared
            .tenants
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(Mutex::new(tenant)));
        self.shared.count("create");
        Ok(())
    }

    async fn rotate(&mut self, index: usize) -> Result<()> {
        let id = self.id(index);
        let sent = Instant::now();
        match self
            .tenants
            .rotate_tenant_key(pb::RotateTenantKeyRequest { tenant_id: id })
            .await
        {
            Ok(_) => self.shared.count("rotate"),
            Err(_) => self.resync(index, sent).await?,
        }
        Ok(())
    }

    async fn suspend(&mut self, index: usize) -> Result<()> {
        let id = self.id(index);
        let sent = Instant::now();
        match self
            .tenants
            .suspend_tenant(pb::SuspendTenantRequest { tenant_id: id })
            .await
        {
            Ok(_) => {
                self.record(index, sent, St::Suspended);
                self.shared.count("suspend");
            }
            Err(_) => self.resync(index, sent).await?,
        }
        Ok(())
    }

    async fn resume(&mut self, index: usize) -> Result<()> {
        let id = self.id(index);
        let sent = Instant::now();
        match self
            .tenants
            .resume_tenant(pb::ResumeTenantRequest { tenant_id: id })
            .await
        {
            Ok(_) => {
                self.record(index, sent, St::Active);
                self.shared.count("resume");
            }
            Err(_) => self.resync(index, sent).await?,
        }
        Ok(())
    }

    /// Schedules deletion after `waiting` seconds (0 destroys at once, in the server).
    async fn schedule(&mut self, index: usize, waiting: u64) -> Result<()> {
        let id = self.id(index);
        // The wrapped keys as stored now: after destruction no file may hold them.
        let tenant_id = TenantId::parse(&id)?;
        // Through the wrapped keys only: the bench holds no row MAC key, so it reads no
        // MAC'd metadata row.
        let mut wrapped: Vec<Vec<u8>> = Vec::new();
        self.store.for_each_wrapped_key(&mut |tenant, _, w| {
            if *tenant == tenant_id {
                wrapped.push(w.bytes.clone());
            }
            Ok(())
        })?;
        if let Some(t) = self.shared.tenant(index) {
            lock(&t).wrapped.extend(wrapped);
        }
        let sent = Instant::now();
        match self
            .tenants
            .schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest {
                tenant_id: id,
                waiting_period_seconds: Some(waiting),
            })
            .await
        {
            Ok(response) => {
                let state = state_of(&response.into_inner());
                self.record(index, sent, state);
                self.shared.count(if state == St::Destroyed {
                    "delete_now"
                } else {
                    "schedule_delete"
                });
            }
            Err(_) => self.resync(index, sent).await?,
        }
        Ok(())
    }

    async fn cancel(&mut self, index: usize) -> Result<()> {
        let id = self.id(index);
        let sent = Instant::now();
        match self
            .tenants
            .cancel_tenant_deletion(pb::CancelTenantDeletionRequest { tenant_id: id })
            .await
        {
            Ok(_) => {
                self.record(index, sent, St::Active);
                self.shared.count("cancel_delete");
            }
            Err(_) => self.resync(index, sent).await?,
        }
        Ok(())
    }

    /// Runs `rotate --due` in another process (it destroys tenants whose window passed), then
    /// learns which of the pending tenants it destroyed.
    async fn rotate_due(&mut self) -> Result<()> {
        let sent = Instant::now();
        let status = self.cli(&["rotate", "--due"]).await?;
        self.shared.count(if status {
            "cli_rotate_due"
        } else {
            "cli_rotate_due_failed"
        });
        for index in self.indices(|s| s == St::Pending) {
            if self.server_state(index).await? == St::Destroyed {
                self.record(index, sent, St::Destroyed);
                self.shared.count("destroyed_by_cli");
            }
        }
        Ok(())
    }

    /// Rotates a random active tenant with `rotate --tenant` in another process: the server
    /// must notice the change made behind its back.
    async fn cli_rotate(&mut self) -> Result<()> {
        let active = self.indices(|s| s == St::Active);
        if active.is_empty() {
            return Ok(());
        }
        let pick = active[self.rng.random_range(0..active.len())];
        let id = self.id(pick);
        let ok = self.cli(&["rotate", "--tenant", &id]).await?;
        self.shared.count(if ok {
            "cli_rotate"
        } else {
            "cli_rotate_failed"
        });
        Ok(())
    }

    async fn cli(&self, args: &[&str]) -> Result<bool> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Internal(format!("cannot find this executable: {e}")))?;
        let status = tokio::process::Command::new(exe)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--json")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| Error::Internal(format!("cannot run {args:?}: {e}")))?;
        Ok(status.success())
    }

    /// Brings every tenant that is not destroyed back to ACTIVE and decrypts what it kept.
    async fn final_decrypts(
        &mut self,
        mut keys: KeyClient,
        report: &mut ChurnReport,
    ) -> Result<()> {
        for index in self.indices(|s| s != St::Destroyed) {
            let id = self.id(index);
            match self.state(index) {
                St::Suspended => self.resume(index).await?,
                St::Pending => self.cancel(index).await?,
                _ => {}
            }
            if self.state(index) != St::Active {
                continue;
            }
            report.live_tenants_checked += 1;
            let kept = self
                .shared
                .tenant(index)
                .map(|t| lock(&t).ciphertexts.clone())
                .unwrap_or_default();
            for ciphertext in kept {
                report.ciphertexts_checked += 1;
                let result = keys
                    .decrypt(pb::DecryptRequest {
                        tenant_id: id.clone(),
                        context: CONTEXT.into(),
                        ciphertext,
                        aad: AAD.to_vec(),
                    })
                    .await;
                match result {
                    Ok(r) if r.get_ref().plaintext == b"churn value" => {}
                    _ => report.final_decrypt_failures += 1,
                }
            }
        }
        Ok(())
    }
}

/// Checks every successful call against the tenant's possible-ACTIVE windows.
fn check_calls(shared: &Shared, calls: &[CallRecord], report: &mut ChurnReport) {
    let tenants = shared.tenants.read().unwrap_or_else(|p| p.into_inner());
    let windows: Vec<Vec<(Instant, Option<Instant>)>> =
        tenants.iter().map(|t| lock(t).active_windows()).collect();
    for call in calls.iter().filter(|c| c.ok) {
        let Some(tenant_windows) = windows.get(call.tenant) else {
            continue;
        };
        let possible = tenant_windows.iter().any(|(from, until)| {
            *from <= call.answered && until.is_none_or(|until| until >= call.sent)
        });
        if !possible {
            report.violations += 1;
            if report.violation_examples.len() < LISTED_VIOLATIONS {
                let id = tenants
                    .get(call.tenant)
                    .map(|t| lock(t).id.clone())
                    .unwrap_or_default();
                report.violation_examples.push(format!(
                    "{} succeeded for {id}, which was not ACTIVE at any time during the call",
                    if call.decrypt { "Decrypt" } else { "Encrypt" },
                ));
            }
        }
    }
}

async fn verify_audit(data_dir: &Path, report: &mut ChurnReport) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Internal(format!("cannot find this executable: {e}")))?;
    let output = tokio::process::Command::new(exe)
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .await
        .map_err(|e| Error::Internal(format!("cannot run audit verify: {e}")))?;
    report.audit_verified = output.status.success();
    report.audit_verify_output = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Bytes of a wrapped key's start used to find it (its random nonce).
const PROBE_LEN: usize = 16;

/// Searches every file of the data directory for the wrapped keys of destroyed tenants.
fn check_shredded(shared: &Shared, data_dir: &Path, report: &mut ChurnReport) -> Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![data_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| Error::Internal(format!("cannot list {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                files.push((name, bytes));
            }
        }
    }
    // Every wrapped key of a destroyed tenant, found by its first bytes (random: a nonce) in
    // one pass over each file, then compared whole.
    let tenants = shared.tenants.read().unwrap_or_else(|p| p.into_inner());
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    for tenant in tenants.iter() {
        let t = lock(tenant);
        if t.state != St::Destroyed {
            continue;
        }
        report.destroyed_tenants_checked += 1;
        for wrapped in t.wrapped.iter().filter(|w| w.len() >= PROBE_LEN) {
            keys.push((t.id.clone(), wrapped.clone()));
        }
    }
    drop(tenants);
    let mut by_probe: HashMap<[u8; PROBE_LEN], Vec<usize>> = HashMap::new();
    for (index, (_, wrapped)) in keys.iter().enumerate() {
        if let Some(probe) = wrapped.first_chunk::<PROBE_LEN>() {
            by_probe.entry(*probe).or_default().push(index);
        }
    }
    let mut found: Vec<Vec<String>> = vec![Vec::new(); keys.len()];
    for (name, bytes) in &files {
        for (at, window) in bytes.windows(PROBE_LEN).enumerate() {
            let Some(candidates) = window
                .first_chunk::<PROBE_LEN>()
                .and_then(|probe| by_probe.get(probe))
            else {
                continue;
            };
            for &index in candidates {
                let (id, wrapped) = &keys[index];
                if bytes.get(at..at + wrapped.len()) == Some(wrapped.as_slice()) {
                    found[index].push(format!("{name} at byte {at}: a wrapped key of {id}"));
                }
            }
        }
    }
    for places in found.into_iter().filter(|p| !p.is_empty()) {
        report.destroyed_key_bytes_found += 1;
        report.destroyed_key_bytes_where.extend(places);
    }
    Ok(())
}
