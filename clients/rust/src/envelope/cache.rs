//! A bounded cache of data keys, in the manner of the AWS Encryption SDK's caching
//! cryptographic materials manager: a key from GenerateDataKey seals several messages, within
//! limits, instead of one call per message.
//!
//! Limits, per key ([`CachePolicy`]): a maximum age, a maximum number of messages (uses) and,
//! for encryption, a maximum number of plaintext bytes. A key past any limit is dropped, and
//! the next message gets a fresh one. The cache holds at most `capacity` keys of each kind,
//! evicting the oldest.
//!
//! Encryption entries are keyed by (tenant, context); a message whose length is not known
//! up front is never sealed under a cached key (its bytes could not be charged first), as the
//! AWS SDK does. Decryption entries are keyed by (tenant, context, wrapped key): a cached
//! unwrap spares a DecryptDataKey call for messages sealed under the same key.
//!
//! What caching gives up (docs/ENVELOPE.md section 6): a cache hit is not a server call, so it
//! is neither authorized nor audited again, and a key version disabled meanwhile keeps working
//! for cached keys until they expire. Keep `max_age` short where that matters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::format::DataKey;

/// Monotonic time for the cache's age limit, injectable so tests move it instead of waiting.
/// (The server's `clock` module is wall-clock time in the server crate, which a client
/// library must not depend on.)
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin; never goes backwards.
    fn now(&self) -> Duration;
}

/// The operating system's monotonic clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let micros = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.0.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::SeqCst))
    }
}

/// The limits of [`DataKeyCache`].
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// A key older than this is not used again.
    pub max_age: Duration,
    /// A key seals (or, decrypting, opens) at most this many messages.
    pub max_messages: u64,
    /// A key seals at most this many plaintext bytes in all.
    pub max_bytes: u64,
    /// Keys kept of each kind (encryption, decryption); the oldest goes first.
    pub capacity: usize,
}

impl Default for CachePolicy {
    /// Five minutes, 1,000 messages and 1 GiB per key; 100 keys of each kind.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(300),
            max_messages: 1000,
            max_bytes: 1 << 30,
            capacity: 100,
        }
    }
}

struct Entry {
    key: DataKey,
    wrapped: Vec<u8>,
    created: Duration,
    messages: u64,
    bytes: u64,
}

/// Data keys kept for re-use within the [`CachePolicy`] limits. Keys are zeroized when they
/// leave the cache.
pub struct DataKeyCache {
    policy: CachePolicy,
    clock: Arc<dyn Clock>,
    encrypt: HashMap<(String, String), Entry>,
    decrypt: HashMap<(String, String, Vec<u8>), Entry>,
}

impl DataKeyCache {
    /// An empty cache on the system clock.
    pub fn new(policy: CachePolicy) -> Self {
        Self::with_clock(policy, Arc::new(SystemClock::default()))
    }

    /// An empty cache on `clock`.
    pub fn with_clock(policy: CachePolicy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            clock,
            encrypt: HashMap::new(),
            decrypt: HashMap::new(),
        }
    }

    /// The limits in force.
    pub fn policy(&self) -> &CachePolicy {
        &self.policy
    }

    fn usable(&self, entry: &Entry, bytes: u64) -> bool {
        self.clock.now().saturating_sub(entry.created) < self.policy.max_age
            && entry.messages < self.policy.max_messages
            && entry.bytes.saturating_add(bytes) <= self.policy.max_bytes
    }

    /// A cached key (and its wrapped form) to seal one more message of `length` bytes for
    /// (tenant, context), charged to the key; `None` when there is none within the limits
    /// (an exhausted key is dropped) or the length is unknown.
    pub fn encryption_key(
        &mut self,
        tenant: &str,
        context: &str,
        length: Option<u64>,
    ) -> Option<(DataKey, Vec<u8>)> {
        let length = length?;
        let id = (tenant.to_owned(), context.to_owned());
        let usable = self.encrypt.get(&id).map(|e| self.usable(e, length))?;
        if !usable {
            self.encrypt.remove(&id);
            return None;
        }
        let entry = self.encrypt.get_mut(&id)?;
        entry.messages += 1;
        entry.bytes += length;
        Some((entry.key.duplicate(), entry.wrapped.clone()))
    }

    /// Keeps a fresh key that has just sealed one message of `length` bytes (nothing is kept
    /// for an unknown length, or when the one message already reaches a limit).
    pub fn insert_encryption_key(
        &mut self,
        tenant: &str,
        context: &str,
        key: &DataKey,
        wrapped: &[u8],
        length: Option<u64>,
    ) {
        let Some(length) = length else { return };
        if self.policy.max_messages <= 1 || length >= self.policy.max_bytes {
            return;
        }
        let entry = self.entry(key, wrapped, length);
        evict_oldest(&mut self.encrypt, self.policy.capacity);
        self.encrypt
            .insert((tenant.to_owned(), context.to_owned()), entry);
    }

    /// A cached unwrap of `wrapped` for (tenant, context), charged one use; `None` when
    /// there is none within the limits.
    pub fn decryption_key(
        &mut self,
        tenant: &str,
        context: &str,
        wrapped: &[u8],
    ) -> Option<DataKey> {
        let id = (tenant.to_owned(), context.to_owned(), wrapped.to_vec());
        let usable = self.decrypt.get(&id).map(|e| self.usable(e, 0))?;
        if !usable {
            self.decrypt.remove(&id);
            return None;
        }
        let entry = self.decrypt.get_mut(&id)?;
        entry.messages += 1;
        Some(entry.key.duplicate())
    }

    /// Keeps a key DecryptDataKey has just unwrapped for one message.
    pub fn insert_decryption_key(
        &mut self,
        tenant: &str,
        context: &str,
        wrapped: &[u8],
        key: &DataKey,
    ) {
        if self.policy.max_messages <= 1 {
            return;
        }
        let entry = self.entry(key, wrapped, 0);
        evict_oldest(&mut self.decrypt, self.policy.capacity);
        self.decrypt.insert(
            (tenant.to_owned(), context.to_owned(), wrapped.to_vec()),
            entry,
        );
    }

    /// Drops every key.
    pub fn clear(&mut self) {
        self.encrypt.clear();
        self.decrypt.clear();
    }

    /// Keys held (encryption, decryption).
    pub fn len(&self) -> (usize, usize) {
        (self.encrypt.len(), self.decrypt.len())
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.encrypt.is_empty() && self.decrypt.is_empty()
    }

    fn entry(&self, key: &DataKey, wrapped: &[u8], bytes: u64) -> Entry {
        Entry {
            key: key.duplicate(),
            wrapped: wrapped.to_vec(),
            created: self.clock.now(),
            messages: 1,
            bytes,
        }
    }
}

/// Makes room for one more entry.
fn evict_oldest<K: Clone + Eq + std::hash::Hash>(map: &mut HashMap<K, Entry>, capacity: usize) {
    while map.len() >= capacity.max(1) {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, e)| e.created)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> DataKey {
        DataKey::from_slice(&[byte; 32]).unwrap()
    }

    fn cache(policy: CachePolicy) -> (DataKeyCache, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (DataKeyCache::with_clock(policy, clock.clone()), clock)
    }

    #[test]
    fn a_key_serves_until_its_message_limit() {
        let (mut c, _) = cache(CachePolicy {
            max_messages: 3,
            ..CachePolicy::default()
        });
        assert!(c.encryption_key("t", "c", Some(1)).is_none(), "empty");
        c.insert_encryption_key("t", "c", &key(1), b"w1", Some(1));
        for _ in 0..2 {
            let (k, w) = c.encryption_key("t", "c", Some(1)).unwrap();
            assert_eq!(k.expose(), &[1; 32]);
            assert_eq!(w, b"w1");
        }
        assert!(
            c.encryption_key("t", "c", Some(1)).is_none(),
            "fourth message"
        );
        assert_eq!(c.len().0, 0, "an exhausted key is dropped");
        assert!(c.encryption_key("t", "other", Some(1)).is_none());
        assert!(c.encryption_key("u", "c", Some(1)).is_none());
    }

    #[test]
    fn a_key_serves_until_its_byte_limit_and_never_for_unknown_lengths() {
        let (mut c, _) = cache(CachePolicy {
            max_bytes: 100,
            ..CachePolicy::default()
        });
        c.insert_encryption_key("t", "c", &key(1), b"w", Some(60));
        assert!(c.encryption_key("t", "c", None).is_none(), "unknown length");
        assert!(
            c.encryption_key("t", "c", Some(40)).is_some(),
            "exactly 100"
        );
        assert!(c.encryption_key("t", "c", Some(1)).is_none(), "101");
        c.insert_encryption_key("t", "c", &key(2), b"w", Some(100));
        assert_eq!(c.len().0, 0, "one message at the limit is not kept");
        c.insert_encryption_key("t", "c", &key(2), b"w", None);
        assert_eq!(c.len().0, 0);
    }

    #[test]
    fn a_key_expires_with_age_for_both_directions() {
        let (mut c, clock) = cache(CachePolicy {
            max_age: Duration::from_secs(60),
            ..CachePolicy::default()
        });
        c.insert_encryption_key("t", "c", &key(1), b"w", Some(1));
        c.insert_decryption_key("t", "c", b"w", &key(1));
        clock.advance(Duration::from_secs(59));
        assert!(c.encryption_key("t", "c", Some(1)).is_some());
        assert!(c.decryption_key("t", "c", b"w").is_some());
        clock.advance(Duration::from_secs(1));
        assert!(c.encryption_key("t", "c", Some(1)).is_none());
        assert!(c.decryption_key("t", "c", b"w").is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn decryption_entries_are_bound_to_tenant_context_and_wrapped_key() {
        let (mut c, _) = cache(CachePolicy::default());
        c.insert_decryption_key("t", "c", b"w", &key(1));
        assert!(c.decryption_key("t", "c", b"x").is_none());
        assert!(c.decryption_key("t", "d", b"w").is_none());
        assert!(c.decryption_key("u", "c", b"w").is_none());
        assert_eq!(c.decryption_key("t", "c", b"w").unwrap().expose(), &[1; 32]);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let (mut c, clock) = cache(CachePolicy {
            capacity: 2,
            ..CachePolicy::default()
        });
        for (i, ctx) in ["a", "b", "c"].iter().enumerate() {
            c.insert_encryption_key("t", ctx, &key(i as u8), b"w", Some(1));
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(c.len().0, 2);
        assert!(
            c.encryption_key("t", "a", Some(1)).is_none(),
            "oldest evicted"
        );
        assert!(c.encryption_key("t", "c", Some(1)).is_some());
    }
}
