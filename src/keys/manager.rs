//! The key manager: the one place that turns stored, wrapped keys into usable ones and back.
//!
//! It checks the master keyring against the key store's check values when it opens, creates
//! and rotates tenant keys (random 256-bit keys wrapped under the primary master version),
//! serves unwrapped keys from the [`TenantCache`], enforces the nonce budget, and re-wraps
//! everything when the master key rotates. Methods that may touch the store block: async
//! callers run them on the blocking pool, except [`KeyManager::cached`], which never does I/O
//! beyond the store's change check.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::cache::{CachedVersion, TenantCache, TenantEntry};
use super::master::{MasterKeySource, MasterKeyring};
use super::wrapping::{self, TenantKeyWrapping, UnwrapFailure};
use crate::clock::SharedClock;
use crate::crypto::envelope;
use crate::crypto::secret::SecretKey;
use crate::domain::lifecycle::{self, TenantTransition, VersionTransition};
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result};
use crate::store::{
    KeyStore, KeyVersionRecord, MasterVersionRecord, Rewrapping, TenantRecord, WrappedTenantKey,
};

/// Defaults and bounds for tenant keys.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// The nonce budget of a new tenant's key versions (NIST SP 800-38D: well under 2^32).
    pub default_max_encryptions: u64,
    /// A new tenant's rotation period in seconds (0 = only on demand or by budget).
    pub default_rotation_period_seconds: u64,
    /// How many tenants' unwrapped keys to keep in memory.
    pub cache_tenants: usize,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            default_max_encryptions: 1 << 30,
            default_rotation_period_seconds: 0,
            cache_tenants: 100_000,
        }
    }
}

/// Permission to seal a counted number of values under `version` of the tenant in `entry`:
/// proof that the seals fit in the version's nonce budget (NIST SP 800-38D). Only `keys`
/// creates one, and it is not `Clone`, so each grant is spent by the one call it was made
/// for.
pub struct EncryptGrant {
    entry: Arc<TenantEntry>,
    version: u32,
    rotated_from: Option<u32>,
}

impl EncryptGrant {
    /// A grant from the snapshot's in-memory reservation, without touching the store; the
    /// snapshot back when the reservation has no room for `count` more seals (ask
    /// [`KeyManager::grant_encryptions`] then).
    pub fn from_reservation(
        entry: Arc<TenantEntry>,
        count: u64,
    ) -> std::result::Result<Self, Arc<TenantEntry>> {
        match entry.try_take(count) {
            Some(version) => Ok(Self {
                entry,
                version,
                rotated_from: None,
            }),
            None => Err(entry),
        }
    }

    /// The snapshot whose primary version is [`EncryptGrant::version`].
    pub fn entry(&self) -> &Arc<TenantEntry> {
        &self.entry
    }

    /// The key version to seal under.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Set when this grant rotated the tenant's key because the nonce budget of this former
    /// primary version was spent (the caller audits the rotation).
    pub fn rotated_from(&self) -> Option<u32> {
        self.rotated_from
    }
}

/// The master keys in memory and the wrapping keys derived from them.
struct MasterKeys {
    ring: MasterKeyring,
    wrapping: TenantKeyWrapping,
}

impl MasterKeys {
    fn new(ring: MasterKeyring) -> Result<Self> {
        let wrapping = TenantKeyWrapping::new(&ring)?;
        Ok(Self { ring, wrapping })
    }
}

/// What a master-key re-wrap did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RewrapSummary {
    /// The master version everything is now wrapped under.
    pub primary_master_version: u32,
    /// Tenant keys re-wrapped by this run.
    pub rewrapped: u64,
    /// Master versions retired by this run.
    pub retired: Vec<u32>,
    /// Older master versions that still wrap a key (written meanwhile by a process with an
    /// older keyring); a later run re-wraps them and retires the version.
    pub still_in_use: Vec<u32>,
}

/// One committed batch of a master-key re-wrap, reported to the caller's progress hook.
#[derive(Debug, Clone, Copy)]
pub struct RewrapProgress {
    /// The master version the batch's keys were under.
    pub from_master: u32,
    /// The master version they are under now.
    pub to_master: u32,
    /// Keys re-wrapped by this batch.
    pub batch: u64,
    /// Keys re-wrapped by this run so far.
    pub total: u64,
}

/// How many passes a re-wrap makes over an old master version before it leaves it for a
/// later run (each pass catches keys another process wrapped under it meanwhile).
const REWRAP_PASSES: usize = 3;

/// The key manager. Shared by all requests.
pub struct KeyManager {
    store: Arc<dyn KeyStore>,
    source: MasterKeySource,
    master: RwLock<MasterKeys>,
    cache: TenantCache,
    policy: KeyPolicy,
    /// The store's change generation the caches were last dropped for.
    cleared_generation: std::sync::atomic::AtomicU64,
    /// Serializes drops, so the generation is marked only after its drop finished.
    clearing: std::sync::Mutex<()>,
    /// The shred ledger, told of every destruction (set once, when the data dir opens).
    shred: std::sync::OnceLock<Arc<dyn super::ShredRecorder>>,
    /// Wall-clock time: key-version creation times (rotation age) and deletion windows.
    clock: SharedClock,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// The size of one nonce-budget reservation: large enough that the store is written rarely,
/// small enough that a crash wastes little of the budget.
fn reservation_chunk(max_encryptions: u64) -> u64 {
    (max_encryptions / 64).clamp(64, 65_536)
}

impl KeyManager {
    /// Loads the keyring (creating it if allowed) and checks it against the store's key check
    /// values: a keyring that is not the one this data directory was created with fails here,
    /// with a message saying so, rather than on every call later. Every time the manager
    /// stores or compares against comes from `clock`.
    pub fn open(
        store: Arc<dyn KeyStore>,
        source: MasterKeySource,
        create_keyring: bool,
        policy: KeyPolicy,
        clock: SharedClock,
    ) -> Result<Self> {
        let ring = MasterKeyring::load(&source, create_keyring)?;
        check_keyring(store.as_ref(), &ring, clock.now_unix())?;
        Ok(Self {
            store,
            source,
            master: RwLock::new(MasterKeys::new(ring)?),
            cache: TenantCache::new(policy.cache_tenants),
            policy,
            cleared_generation: std::sync::atomic::AtomicU64::new(0),
            clearing: std::sync::Mutex::new(()),
            shred: std::sync::OnceLock::new(),
            clock,
        })
    }

    /// Attaches the shred ledger: from now on every tenant or version destruction is recorded
    /// in it. Only the first call takes effect.
    pub fn set_shred_recorder(&self, recorder: Arc<dyn super::ShredRecorder>) {
        let _ = self.shred.set(recorder);
    }

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The wall clock this manager decides by; commands that ask the store what is due at
    /// "now" (`rotate --due`) use the same one.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The policy defaults.
    pub fn policy(&self) -> &KeyPolicy {
        &self.policy
    }

    /// How many tenants are cached.
    pub fn cached_tenants(&self) -> usize {
        self.cache.len()
    }

    /// The cache of tenant snapshots (for metrics; lookups go through the manager).
    pub fn cache(&self) -> &TenantCache {
        &self.cache
    }

    /// Drops the cached keys for the store's change `generation` (from
    /// [`crate::store::ChangeDetection::change_generation`]), also running `also` (dropping other caches built from
    /// the store), unless they were dropped for this generation or a later one already.
    /// Returns whether this call dropped them; follow a `true` with
    /// [`KeyManager::reload_keyring_if_stale`] off the async threads.
    ///
    /// Exact: when this returns, every change the generation covers has dropped the cache
    /// (here, or in a concurrent caller whose drop has finished). Never waits on the store.
    pub fn drop_caches_for(&self, generation: u64, also: impl FnOnce()) -> bool {
        use std::sync::atomic::Ordering;
        if self.cleared_generation.load(Ordering::Acquire) >= generation {
            return false;
        }
        let _serial = self.clearing.lock().unwrap_or_else(|p| p.into_inner());
        if self.cleared_generation.load(Ordering::Acquire) >= generation {
            return false;
        }
        self.cache.clear();
        also();
        crate::metrics::global().cache_dropped();
        self.cleared_generation
            .fetch_max(generation, Ordering::AcqRel);
        true
    }

    /// Reloads the keyring when the store names a master version newer than this process's
    /// primary. Returns whether it reloaded.
    fn reload_if_stale(&self) -> Result<bool> {
        let newest = self
            .store
            .master_versions()?
            .iter()
            .map(|r| r.version)
            .max()
            .unwrap_or(0);
        if newest <= self.primary_master_version() {
            return Ok(false);
        }
        self.ensure_master_version(newest)?;
        tracing::info!(
            master_version = newest,
            "reloaded the master keyring: a newer version appeared"
        );
        Ok(true)
    }

    /// Runs a store write that wraps a new key under this process's primary master version;
    /// if the store refuses because that version was retired meanwhile by another process,
    /// reloads the keyring and runs it once more under the new primary.
    fn with_current_master<T>(&self, mut write: impl FnMut() -> Result<T>) -> Result<T> {
        match write() {
            Err(Error::RetiredMasterVersion(retired)) if self.reload_if_stale()? => {
                tracing::info!(retired, "retrying under the new master key version");
                write()
            }
            other => other,
        }
    }

    /// After a change by another process: reloads the keyring if the store now names a newer
    /// master version than this process holds (`rotate --master` ran meanwhile), so new keys
    /// are wrapped under it. Keys under the new version also load on demand
    /// (`ensure_master_version`), so a failure here is logged, not returned: a keyring that
    /// cannot be reloaded yet must not fail calls that do not need it. Blocking.
    pub fn reload_keyring_if_stale(&self) {
        if let Err(e) = self.reload_if_stale() {
            tracing::warn!(error = %e, "the store has a newer master key version than this process can load");
        }
    }

    /// The cached snapshot of a tenant, without touching the store.
    pub fn cached(&self, id: &TenantId) -> Option<Arc<TenantEntry>> {
        self.cache.get(id.as_str())
    }

    /// The snapshot of a tenant: cached, or loaded and unwrapped (blocking).
    pub fn tenant(&self, id: &TenantId) -> Result<Arc<TenantEntry>> {
        match self.cached(id) {
            Some(entry) => Ok(entry),
            None => self.load(id),
        }
    }

    fn load(&self, id: &TenantId) -> Result<Arc<TenantEntry>> {
        let epoch = self.cache.epoch();
        let (record, stored_versions) = self
            .store
            .tenant_snapshot(id)?
            .ok_or(Error::NotFound("tenant"))?;
        let mut versions = HashMap::new();
        let mut primary_reserved = 0;
        if record.state != TenantState::Destroyed {
            for version in stored_versions {
                if version.version == record.primary_version {
                    primary_reserved = version.encryptions;
                }
                let key = match (&version.wrapped, version.state) {
                    (Some(wrapped), KeyVersionState::Enabled) => {
                        Some(self.unwrap_tenant_key(id, version.version, wrapped)?)
                    }
                    _ => None,
                };
                versions.insert(
                    version.version,
                    CachedVersion {
                        state: version.state,
                        key,
                    },
                );
            }
        }
        let entry = Arc::new(TenantEntry::new(record, versions, primary_reserved));
        self.cache.insert(Arc::clone(&entry), epoch);
        Ok(entry)
    }

    /// Grants `count` seals under the tenant's primary version, reserving more of the nonce
    /// budget in the store when needed and rotating the key when the budget is spent, so the
    /// count of seals under a version never passes its `max_encryptions`. Blocking.
    pub fn grant_encryptions(&self, entry: Arc<TenantEntry>, count: u64) -> Result<EncryptGrant> {
        let mut entry = entry;
        let mut rotated_from = None;
        // The second round runs on a freshly rotated key, which always has room; a third
        // covers a rotation by another caller racing ours.
        for _ in 0..3 {
            entry.require_active()?;
            let max = entry.record.max_encryptions;
            if count > max {
                return Err(Error::ResourceExhausted(format!(
                    "{count} values exceed the tenant's max_encryptions of {max} per key version"
                )));
            }
            {
                let mut counter = entry.counter.lock().unwrap_or_else(|p| p.into_inner());
                if counter.used + count <= counter.reserved {
                    counter.used += count;
                    return Ok(EncryptGrant {
                        version: entry.record.primary_version,
                        entry: Arc::clone(&entry),
                        rotated_from,
                    });
                }
                if counter.used + count <= max && counter.reserved < max {
                    let chunk = reservation_chunk(max)
                        .max(count)
                        .min(max - counter.reserved);
                    let total = self.store.reserve_encryptions(
                        &entry.record.tenant_id,
                        entry.record.primary_version,
                        chunk,
                    )?;
                    // Ours is the top `chunk` of `total`. If nobody else reserved since our
                    // last reservation it continues it, and what is left of that one is still
                    // ours; otherwise the rest of the old range is given up (counted as used:
                    // the count may only err upwards).
                    let start = total.saturating_sub(chunk);
                    if start != counter.reserved {
                        counter.used = counter.used.max(start);
                    }
                    counter.reserved = total;
                    if counter.used + count <= counter.reserved.min(max) {
                        counter.used += count;
                        return Ok(EncryptGrant {
                            version: entry.record.primary_version,
                            entry: Arc::clone(&entry),
                            rotated_from,
                        });
                    }
                }
            }
            let id = entry.record.tenant_id.clone();
            match self.rotate_from(&id, entry.record.primary_version) {
                Ok(_) => {
                    tracing::info!(tenant = %id, "rotated: nonce budget reached");
                    rotated_from = Some(entry.record.primary_version);
                }
                // Someone else rotated first: their new version serves us as well.
                Err(Error::ConcurrentChange) => {}
                Err(e) => return Err(e),
            }
            entry = self.load(&id)?;
        }
        Err(Error::internal(
            "could not grant encryptions after rotating",
        ))
    }

    fn unwrap_tenant_key(
        &self,
        id: &TenantId,
        version: u32,
        wrapped: &WrappedTenantKey,
    ) -> Result<SecretKey> {
        self.ensure_master_version(wrapped.master_version)?;
        read(&self.master)
            .wrapping
            .unwrap(id, version, wrapped)
            .map_err(|failure| match failure {
                UnwrapFailure::MasterVersionMissing(_) => {
                    Error::internal("master key version missing")
                }
                UnwrapFailure::DoesNotOpen => Error::Internal(format!(
                    "tenant key {id} v{version} does not unwrap under master version {}",
                    wrapped.master_version
                )),
            })
    }

    /// Reloads the keyring when a key is wrapped under a version it does not hold yet (the
    /// `rotate --master` command added one while this process ran).
    fn ensure_master_version(&self, version: u32) -> Result<()> {
        if read(&self.master).ring.get(version).is_some() {
            return Ok(());
        }
        let ring = MasterKeyring::load(&self.source, false)?;
        check_keyring(self.store.as_ref(), &ring, self.clock.now_unix())?;
        if ring.get(version).is_none() {
            return Err(Error::Internal(format!(
                "master key version {version} is not in the keyring"
            )));
        }
        *self.master.write().unwrap_or_else(|p| p.into_inner()) = MasterKeys::new(ring)?;
        Ok(())
    }

    fn new_wrapped_version(&self, id: &TenantId, version: u32) -> Result<KeyVersionRecord> {
        let tenant_key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
        let wrapped = read(&self.master).wrapping.wrap(id, version, &tenant_key)?;
        Ok(KeyVersionRecord {
            version,
            state: KeyVersionState::Enabled,
            created_at: self.clock.now_unix(),
            encryptions: 0,
            wrapped: Some(wrapped),
        })
    }

    fn new_tenant(&self, id: &TenantId) -> Result<(TenantRecord, KeyVersionRecord)> {
        let first = self.new_wrapped_version(id, 1)?;
        let record = TenantRecord {
            tenant_id: id.clone(),
            state: TenantState::Active,
            primary_version: 1,
            created_at: first.created_at,
            rotation_period_seconds: self.policy.default_rotation_period_seconds,
            max_encryptions: self.policy.default_max_encryptions,
            deletion_time: None,
            destroyed_at: None,
        };
        Ok((record, first))
    }

    /// Creates a tenant with a random version-1 key. A destroyed tenant's id is refused
    /// (FAILED_PRECONDITION "tenant destroyed"). Blocking.
    pub fn create_tenant(&self, id: &TenantId) -> Result<TenantRecord> {
        let record = self.with_current_master(|| {
            let (record, first) = self.new_tenant(id)?;
            self.store.create_tenant(&record, &first)?;
            Ok(record)
        })?;
        self.cache.invalidate(id.as_str());
        Ok(record)
    }

    /// Creates many tenants in one store transaction (bulk provisioning, e.g. a migration
    /// from another KMS): all or none. Blocking.
    pub fn create_tenants(&self, ids: &[TenantId]) -> Result<Vec<TenantRecord>> {
        let created = self.with_current_master(|| {
            let rows = ids
                .iter()
                .map(|id| self.new_tenant(id))
                .collect::<Result<Vec<_>>>()?;
            self.store.create_tenants(&rows)?;
            Ok(rows.into_iter().map(|(record, _)| record).collect())
        })?;
        for id in ids {
            self.cache.invalidate(id.as_str());
        }
        Ok(created)
    }

    /// Adds a new primary version; older versions keep decrypting. Retries a few times when
    /// another caller rotates the same tenant at the same moment. Blocking.
    pub fn rotate(&self, id: &TenantId) -> Result<TenantRecord> {
        let mut last = None;
        for _ in 0..3 {
            let tenant = self.store.tenant(id)?.ok_or(Error::NotFound("tenant"))?;
            match self.rotate_from(id, tenant.primary_version) {
                Err(Error::ConcurrentChange) => last = Some(Error::ConcurrentChange),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::internal("rotation did not converge")))
    }

    fn rotate_from(&self, id: &TenantId, expected_primary: u32) -> Result<TenantRecord> {
        let result = self.with_current_master(|| {
            let next =
                lifecycle::next_version(self.store.key_versions(id)?.iter().map(|v| v.version));
            let version = self.new_wrapped_version(id, next)?;
            self.store.add_key_version(id, expected_primary, &version)
        });
        self.cache.invalidate(id.as_str());
        result
    }

    /// Applies a lifecycle transition now (see [`TenantStore::set_tenant_state`]), drops the
    /// tenant's cached keys before returning, and records a destruction in the shred ledger.
    /// Blocking.
    pub fn transition(&self, id: &TenantId, transition: TenantTransition) -> Result<TenantRecord> {
        let result = self
            .store
            .set_tenant_state(id, transition, self.clock.now_unix());
        self.cache.invalidate(id.as_str());
        if let (Ok(_), Some(ledger), TenantTransition::Destroy) =
            (&result, self.shred.get(), transition)
        {
            ledger.tenant_destroyed(id)?;
        }
        result
    }

    /// Cancels a pending deletion while its window is open. Blocking.
    pub fn cancel_deletion(&self, id: &TenantId) -> Result<TenantRecord> {
        self.transition(id, TenantTransition::CancelDeletion)
    }

    /// Crypto-shreds a tenant whose deletion window has passed. Blocking.
    pub fn destroy_tenant(&self, id: &TenantId) -> Result<TenantRecord> {
        self.transition(id, TenantTransition::Destroy)
    }

    /// Sets the rotation policy (0 for `max_encryptions` means the server default).
    pub fn set_rotation_policy(
        &self,
        id: &TenantId,
        rotation_period_seconds: u64,
        max_encryptions: u64,
    ) -> Result<TenantRecord> {
        let max = if max_encryptions == 0 {
            self.policy.default_max_encryptions
        } else {
            max_encryptions
        };
        let result = self
            .store
            .set_rotation_policy(id, rotation_period_seconds, max);
        self.cache.invalidate(id.as_str());
        result
    }

    /// Changes a key version's state (see [`TenantStore::set_key_version_state`]), drops the
    /// tenant's cached keys, and records a destruction in the shred ledger.
    pub fn set_version_state(
        &self,
        id: &TenantId,
        version: u32,
        transition: VersionTransition,
    ) -> Result<KeyVersionRecord> {
        let result = self.store.set_key_version_state(id, version, transition);
        self.cache.invalidate(id.as_str());
        if let (Ok(r), Some(ledger)) = (&result, self.shred.get())
            && r.state == KeyVersionState::Destroyed
        {
            ledger.version_destroyed(id, version)?;
        }
        result
    }

    /// The audit secret (HMAC chain and AAD fingerprint keys derive from it), created on first
    /// use and stored wrapped under the primary master key. Blocking.
    pub fn audit_secret(&self) -> Result<SecretKey> {
        if self.store.audit_key()?.is_none() {
            let secret = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
            let wrapped = self.wrap_audit_key(&secret)?;
            self.store.put_audit_key(&wrapped, None)?;
        }
        let wrapped = self
            .store
            .audit_key()?
            .ok_or_else(|| Error::internal("audit key vanished"))?;
        self.ensure_master_version(wrapped.master_version)?;
        wrapping::unwrap_audit_secret(&read(&self.master).ring, &wrapped).map_err(|failure| {
            match failure {
                UnwrapFailure::MasterVersionMissing(_) => {
                    Error::internal("master key version missing")
                }
                UnwrapFailure::DoesNotOpen => Error::internal("the audit key does not unwrap"),
            }
        })
    }

    fn wrap_audit_key(&self, secret: &SecretKey) -> Result<WrappedTenantKey> {
        wrapping::wrap_audit_secret(&read(&self.master).ring, secret)
    }

    /// The primary master version.
    pub fn primary_master_version(&self) -> u32 {
        read(&self.master).ring.primary_version()
    }

    /// Master versions older than the primary that are not retired yet: a master rotation
    /// that has not finished (re-run `rotate --master` to finish it).
    pub fn unfinished_master_versions(&self) -> Result<Vec<u32>> {
        let primary = self.primary_master_version();
        Ok(self
            .store
            .master_versions()?
            .iter()
            .filter(|r| r.version < primary && r.retired_at.is_none())
            .map(|r| r.version)
            .collect())
    }

    /// How many wrapped keys are under master versions other than the primary.
    pub fn keys_off_primary(&self) -> Result<u64> {
        let primary = self.primary_master_version();
        let mut total = 0;
        for record in self.store.master_versions()? {
            if record.version != primary {
                total += self.store.count_wrapped_under(record.version)?;
            }
        }
        Ok(total)
    }

    /// Re-wraps every tenant key and the audit secret under the primary master version, in
    /// batches of `batch` (each one transaction, so an interrupted run loses nothing, every
    /// key is readable under the old or the new version at every moment, and the next run
    /// continues), then retires each older master version once no key uses it. `progress`
    /// runs after each committed batch; an error from it stops the run. Blocking.
    pub fn rewrap_to_primary(
        &self,
        batch: usize,
        mut progress: impl FnMut(&RewrapProgress) -> Result<()>,
    ) -> Result<RewrapSummary> {
        let primary = self.primary_master_version();
        let mut summary = RewrapSummary {
            primary_master_version: primary,
            ..RewrapSummary::default()
        };
        for record in self.store.master_versions()? {
            if record.version == primary {
                continue;
            }
            if record.retired_at.is_some() {
                // Nothing should be wrapped under a retired version (the store refuses it),
                // but if anything is, move it too.
                if self.store.count_wrapped_under(record.version)? > 0 {
                    self.rewrap_version(
                        record.version,
                        primary,
                        batch,
                        &mut summary,
                        &mut progress,
                    )?;
                }
                continue;
            }
            let mut retired = false;
            for _ in 0..REWRAP_PASSES {
                self.rewrap_version(record.version, primary, batch, &mut summary, &mut progress)?;
                if self
                    .store
                    .retire_master_version(record.version, self.clock.now_unix())?
                {
                    retired = true;
                    break;
                }
            }
            if retired {
                summary.retired.push(record.version);
            } else {
                summary.still_in_use.push(record.version);
            }
        }
        self.cache.clear();
        Ok(summary)
    }

    /// Moves every key under `from` to `primary`, batch by batch.
    fn rewrap_version(
        &self,
        from: u32,
        primary: u32,
        batch: usize,
        summary: &mut RewrapSummary,
        progress: &mut impl FnMut(&RewrapProgress) -> Result<()>,
    ) -> Result<()> {
        loop {
            let rows = self.store.wrapped_under(from, batch.max(1))?;
            if rows.is_empty() {
                break;
            }
            let mut rewrappings = Vec::with_capacity(rows.len());
            for (id, version, wrapped) in rows {
                let key = self.unwrap_tenant_key(&id, version, &wrapped)?;
                let wrapped = read(&self.master)
                    .wrapping
                    .wrap_under(primary, &id, version, &key)?;
                rewrappings.push(Rewrapping {
                    tenant_id: id,
                    version,
                    from_master: from,
                    wrapped,
                });
            }
            let done = self.store.rewrap(&rewrappings)? as u64;
            summary.rewrapped += done;
            progress(&RewrapProgress {
                from_master: from,
                to_master: primary,
                batch: done,
                total: summary.rewrapped,
            })?;
        }
        if let Some(wrapped) = self.store.audit_key()?
            && wrapped.master_version == from
        {
            let secret = self.audit_secret()?;
            let rewrapped = self.wrap_audit_key(&secret)?;
            self.store.put_audit_key(&rewrapped, Some(from))?;
        }
        Ok(())
    }
}

/// Compares a keyring with the store's key check values and records versions the store has
/// not seen yet.
fn check_keyring(store: &dyn KeyStore, ring: &MasterKeyring, now: i64) -> Result<()> {
    let stored = store.master_versions()?;
    for record in &stored {
        match ring.get(record.version) {
            None if record.retired_at.is_some() => {}
            None => {
                return Err(Error::FailedPrecondition(format!(
                    "the master keyring has no version {}, which keys.db uses: wrong keyring?",
                    record.version
                )));
            }
            Some(key) => {
                let check = envelope::key_check_value(key, record.version)
                    .map_err(|_| Error::internal("key check derivation failed"))?;
                if !envelope::constant_time_eq(&check, &record.check_value) {
                    return Err(Error::FailedPrecondition(format!(
                        "master key version {} does not match the key check value in keys.db: \
                         this is not the keyring this data directory was created with",
                        record.version
                    )));
                }
            }
        }
    }
    for version in ring.versions() {
        if stored.iter().all(|r| r.version != version) {
            let key = ring
                .get(version)
                .ok_or_else(|| Error::internal("keyring version vanished"))?;
            store.insert_master_version(&MasterVersionRecord {
                version,
                check_value: envelope::key_check_value(key, version)
                    .map_err(|_| Error::internal("key check derivation failed"))?
                    .to_vec(),
                created_at: now,
                retired_at: None,
            })?;
        }
    }
    Ok(())
}
