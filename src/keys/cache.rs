//! The bounded cache of unwrapped tenant keys and the field keys derived from them.
//!
//! An entry is a snapshot of one tenant: its row, its unwrapped enabled key versions and a
//! small map of prepared AEAD keys per (version, purpose, context). Any change to the tenant
//! (rotation, lifecycle, version state) removes its entry before the change is acknowledged,
//! so no call that starts after a change is served from a key cached before it. Dropping an
//! entry drops its tenant keys, which zeroize.
//!
//! A loader that read the store before an invalidation must not put its stale snapshot back:
//! every invalidation bumps an epoch, and [`TenantCache::insert`] refuses a snapshot loaded in
//! an older epoch.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::crypto::aead::AeadKey;
use crate::crypto::blind_index::IndexKey;
use crate::crypto::envelope::{self, Purpose};
use crate::crypto::secret::SecretKey;
use crate::crypto::siv::SivKey;
use crate::domain::{KeyVersionState, TenantId, TenantState};
use crate::error::{Error, Result};
use crate::store::TenantRecord;

/// How many prepared value keys one tenant entry keeps before it starts over; bounds memory
/// for tenants that use very many contexts.
const MAX_VALUE_KEYS_PER_TENANT: usize = 1024;

/// How many prepared keys a tenant keeps in its small vector before using a map: most tenants
/// use a handful of contexts, and scanning a few entries beats hashing the context.
const FEW_VALUE_KEYS: usize = 8;

/// One prepared value key.
struct ValueKey {
    version: u32,
    purpose: Purpose,
    context: Box<str>,
    key: Arc<AeadKey>,
}

/// Prepared value keys of one tenant: the first few in a vector, the rest by (version,
/// purpose) and then context.
#[derive(Default)]
struct ValueKeys {
    few: Vec<ValueKey>,
    more: HashMap<(u32, Purpose), HashMap<String, Arc<AeadKey>>>,
    count: usize,
}

impl ValueKeys {
    fn get(&self, version: u32, purpose: Purpose, context: &str) -> Option<&Arc<AeadKey>> {
        self.few
            .iter()
            .find(|k| k.version == version && k.purpose == purpose && &*k.context == context)
            .map(|k| &k.key)
            .or_else(|| {
                self.more
                    .get(&(version, purpose))
                    .and_then(|m| m.get(context))
            })
    }

    fn insert(&mut self, version: u32, purpose: Purpose, context: &str, key: Arc<AeadKey>) {
        if self.count >= MAX_VALUE_KEYS_PER_TENANT {
            *self = Self::default();
        }
        self.count += 1;
        if self.few.len() < FEW_VALUE_KEYS {
            self.few.push(ValueKey {
                version,
                purpose,
                context: context.into(),
                key,
            });
        } else {
            self.more
                .entry((version, purpose))
                .or_default()
                .insert(context.to_owned(), key);
        }
    }
}

/// One key version inside a tenant snapshot.
pub struct CachedVersion {
    /// Its state when the snapshot was taken.
    pub state: KeyVersionState,
    /// The unwrapped tenant key, present for enabled versions only.
    pub key: Option<SecretKey>,
}

/// Encryption accounting for the primary version (the nonce budget).
#[derive(Debug)]
pub struct Counter {
    /// Seals handed out by this process (plus everything reserved before it loaded).
    pub used: u64,
    /// Seals reserved in the store; `used` never passes it.
    pub reserved: u64,
}

/// Derived search keys of one kind, by version and then by index name or context.
type KeysByVersionAndName<K> = HashMap<u32, HashMap<String, Arc<K>>>;

/// Prepared searchable-column keys of one tenant (docs/SEARCHABLE.md): blind index keys by
/// (version, index name) and deterministic keys by (version, context), bounded like the value
/// keys. Their own maps, because their key types are not AEAD keys.
#[derive(Default)]
struct SearchKeys {
    index: KeysByVersionAndName<IndexKey>,
    siv: KeysByVersionAndName<SivKey>,
    count: usize,
}

impl SearchKeys {
    fn make_room(&mut self) {
        if self.count >= MAX_VALUE_KEYS_PER_TENANT {
            *self = Self::default();
        }
        self.count += 1;
    }
}

/// A snapshot of one tenant's keys.
pub struct TenantEntry {
    /// The tenant's row at load time.
    pub record: TenantRecord,
    /// Sorted by version (a binary search is cheaper than hashing on the hot path).
    versions: Vec<(u32, CachedVersion)>,
    value_keys: Mutex<ValueKeys>,
    search_keys: Mutex<SearchKeys>,
    /// The primary version's nonce-budget counter.
    pub counter: Mutex<Counter>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a cache or a counter whose invariants hold between statements, so a
    // panic elsewhere cannot leave it inconsistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl TenantEntry {
    /// Builds a snapshot; `primary_reserved` is the primary version's stored reserved count.
    pub fn new(
        record: TenantRecord,
        versions: HashMap<u32, CachedVersion>,
        primary_reserved: u64,
    ) -> Self {
        let mut versions: Vec<(u32, CachedVersion)> = versions.into_iter().collect();
        versions.sort_unstable_by_key(|(v, _)| *v);
        Self {
            record,
            versions,
            value_keys: Mutex::new(ValueKeys::default()),
            search_keys: Mutex::new(SearchKeys::default()),
            counter: Mutex::new(Counter {
                used: primary_reserved,
                reserved: primary_reserved,
            }),
        }
    }

    /// A snapshot of an active tenant whose only key version, 1, is enabled and primary, with a
    /// nonce budget of 2^30 and nothing reserved. No store stands behind it: it is how the
    /// load generator's baseline and the micro-benchmarks measure the hot path alone.
    pub fn with_one_key(tenant_id: TenantId, key: SecretKey) -> Self {
        let versions = HashMap::from([(
            1,
            CachedVersion {
                state: KeyVersionState::Enabled,
                key: Some(key),
            },
        )]);
        let record = TenantRecord {
            tenant_id,
            state: TenantState::Active,
            primary_version: 1,
            created_at: 0,
            rotation_period_seconds: 0,
            max_encryptions: 1 << 30,
            deletion_time: None,
            destroyed_at: None,
        };
        Self::new(record, versions, 0)
    }

    /// Fails with FAILED_PRECONDITION naming the state unless the tenant is active.
    pub fn require_active(&self) -> Result<()> {
        crate::domain::lifecycle::require_active(self.record.state)
    }

    /// The prepared key of (version, purpose, context), derived on first use.
    ///
    /// A version that is not in the snapshot is the generic decryption error (the header is
    /// attacker-controlled); a disabled or destroyed one says so.
    pub fn value_key(&self, version: u32, purpose: Purpose, context: &str) -> Result<Arc<AeadKey>> {
        let cached = self
            .versions
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .and_then(|i| self.versions.get(i))
            .map(|(_, c)| c)
            .ok_or(Error::DecryptFailed)?;
        let tenant_key = match (&cached.key, cached.state) {
            (Some(key), KeyVersionState::Enabled) => key,
            (_, state) => return Err(Error::KeyVersionState { version, state }),
        };
        let mut keys = lock(&self.value_keys);
        if let Some(key) = keys.get(version, purpose, context) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(
            envelope::derive_value_key(
                tenant_key,
                purpose,
                self.record.tenant_id.as_str(),
                context,
            )
            .map_err(|_| Error::internal("value key derivation failed"))?,
        );
        keys.insert(version, purpose, context, Arc::clone(&key));
        Ok(key)
    }

    /// The unwrapped key of an enabled version in the snapshot; as [`TenantEntry::value_key`]
    /// for a version that is missing, disabled or destroyed.
    fn enabled_key(&self, version: u32) -> Result<&SecretKey> {
        let cached = self
            .versions
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .and_then(|i| self.versions.get(i))
            .map(|(_, c)| c)
            .ok_or(Error::DecryptFailed)?;
        match (&cached.key, cached.state) {
            (Some(key), KeyVersionState::Enabled) => Ok(key),
            (_, state) => Err(Error::KeyVersionState { version, state }),
        }
    }

    /// The enabled versions of the snapshot: the primary first, then the others newest first
    /// (the order in which searchable-column answers list them).
    pub fn enabled_versions(&self) -> Vec<u32> {
        let primary = self.record.primary_version;
        let mut out = vec![primary];
        out.extend(
            self.versions
                .iter()
                .rev()
                .filter(|(v, c)| {
                    *v != primary && c.state == KeyVersionState::Enabled && c.key.is_some()
                })
                .map(|(v, _)| *v),
        );
        out
    }

    /// The prepared blind index key of (version, index name), derived on first use.
    pub fn index_key(&self, version: u32, index_name: &str) -> Result<Arc<IndexKey>> {
        self.search_key(
            version,
            index_name,
            |keys| &mut keys.index,
            |tenant_key| {
                IndexKey::derive(tenant_key, self.record.tenant_id.as_str(), index_name)
                    .map_err(|_| Error::internal("index key derivation failed"))
            },
        )
    }

    /// The deterministic (AES-256-SIV) key of (version, context), derived on first use.
    pub fn deterministic_key(&self, version: u32, context: &str) -> Result<Arc<SivKey>> {
        self.search_key(
            version,
            context,
            |keys| &mut keys.siv,
            |tenant_key| {
                SivKey::derive(tenant_key, self.record.tenant_id.as_str(), context)
                    .map_err(|_| Error::internal("deterministic key derivation failed"))
            },
        )
    }

    /// The search key of (version, name) in the map `select` picks, derived from the enabled
    /// version's tenant key on first use and kept within the per-tenant bound.
    fn search_key<K>(
        &self,
        version: u32,
        name: &str,
        select: fn(&mut SearchKeys) -> &mut KeysByVersionAndName<K>,
        derive: impl FnOnce(&SecretKey) -> Result<K>,
    ) -> Result<Arc<K>> {
        let tenant_key = self.enabled_key(version)?;
        let mut keys = lock(&self.search_keys);
        if let Some(key) = select(&mut keys).get(&version).and_then(|m| m.get(name)) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(derive(tenant_key)?);
        keys.make_room();
        select(&mut keys)
            .entry(version)
            .or_default()
            .insert(name.to_owned(), Arc::clone(&key));
        Ok(key)
    }

    /// Takes `count` seals from the reservation if it has room; `None` when the store must
    /// reserve more (or the key must rotate).
    pub fn try_take(&self, count: u64) -> Option<u32> {
        let mut counter = lock(&self.counter);
        if counter.used.saturating_add(count) <= counter.reserved {
            counter.used += count;
            Some(self.record.primary_version)
        } else {
            None
        }
    }
}

/// The bounded map from tenant id to snapshot.
pub struct TenantCache {
    entries: Mutex<LruCache<String, Arc<TenantEntry>>>,
    epoch: AtomicU64,
}

impl TenantCache {
    /// A cache holding at most `capacity` tenants (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            epoch: AtomicU64::new(0),
        }
    }

    /// The current epoch; pass it to [`TenantCache::insert`] after loading from the store.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The snapshot of a tenant, if cached.
    pub fn get(&self, tenant_id: &str) -> Option<Arc<TenantEntry>> {
        let entry = lock(&self.entries).get(tenant_id).cloned();
        crate::metrics::global().cache_lookup(entry.is_some());
        entry
    }

    /// Caches a snapshot loaded in `epoch`, unless an invalidation happened since.
    pub fn insert(&self, entry: Arc<TenantEntry>, epoch: u64) {
        let mut entries = lock(&self.entries);
        // Checked under the lock that invalidations also take, so none can slip in between.
        if self.epoch.load(Ordering::Acquire) == epoch {
            entries.put(entry.record.tenant_id.as_str().to_owned(), entry);
        }
    }

    /// Drops one tenant's snapshot.
    pub fn invalidate(&self, tenant_id: &str) {
        let mut entries = lock(&self.entries);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.pop(tenant_id);
    }

    /// Drops every snapshot (after a change made by another process).
    pub fn clear(&self) {
        let mut entries = lock(&self.entries);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.clear();
    }

    /// Visits every cached snapshot (without refreshing its recency), holding the cache lock
    /// meanwhile: `f` must be quick and must not touch the cache. For metrics.
    pub fn for_each(&self, mut f: impl FnMut(&TenantEntry)) {
        for (_, entry) in lock(&self.entries).iter() {
            f(entry);
        }
    }

    /// How many tenants are cached.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
