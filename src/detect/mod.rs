//! Anomaly detectors: cheap in-process watchers of the service's own traffic (issue 16).
//!
//! Every authenticated call that finishes is shown to [`Detectors::observe`] as an
//! [`Observation`] (who, which tenant, from where, what happened). Five detectors look at it:
//!
//! | detector | trips on | module |
//! |---|---|---|
//! | `rate_spike` | a caller's decrypts for one tenant far above its own EWMA baseline | [`spike`] |
//! | `enumeration` | a caller naming many tenants it never named before | [`reach`] |
//! | `probing` | PERMISSION_DENIED / NOT_FOUND across many tenant ids | [`reach`] |
//! | `tampering` | a burst of ciphertexts that do not open for one tenant | [`tamper`] |
//! | `new_peer` | a caller's credential used from a new address, or over mTLS with a new client certificate identity | [`peer`] |
//!
//! A detection is a [`Finding`]: the detector, the caller, the tenant and the figures that
//! tripped it, never a secret (names and counts only). The service turns it into an `Anomaly`
//! audit record, a metric and a log line (`service::anomaly`). Repeats are rate-limited: at
//! most one finding per (detector, caller, tenant) per `repeat_window`.
//!
//! **Cost.** An observation hashes its caller, tenant and peer names once each with a fast
//! keyed hash ([`table::KeyHasher`]), then takes one short mutex section: the caller's shard
//! of the caller-keyed tables (rate spike, reach, new peer, repeats, throttles), one of
//! [`SHARDS`], so calls of different callers rarely wait on each other. The tenant-keyed
//! tampering table has a mutex of its own, taken only by calls with ciphertexts that did not
//! open. No allocation and no formatting unless something trips. `benches/detect.rs` measures
//! it (docs/PERFORMANCE.md).
//!
//! **Memory.** Every table is bounded (`max_tracked` keys each, split evenly over the shards;
//! see [`table`]).
//!
//! **Time.** Every window is measured on the injected [`crate::clock::Clock`], so tests step
//! over them instead of sleeping.

pub mod peer;
pub mod reach;
pub mod settings;
pub mod spike;
pub mod table;
pub mod tamper;

use std::sync::{Arc, Mutex};

use crate::clock::SharedClock;

pub use peer::PeerPolicy;
pub use reach::{EnumerationPolicy, ProbingPolicy};
pub use spike::SpikePolicy;
pub use tamper::TamperPolicy;

/// One detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detector {
    /// A decrypt rate far above the caller's baseline for a tenant.
    RateSpike,
    /// Many tenants a caller never named before.
    Enumeration,
    /// Refusals across many tenant ids.
    Probing,
    /// Ciphertexts that do not open, in a burst, for one tenant.
    Tampering,
    /// A credential used from a new address (or, over mTLS, with a new client certificate
    /// identity).
    NewPeer,
}

impl Detector {
    /// Every detector.
    pub const ALL: [Detector; 5] = [
        Detector::RateSpike,
        Detector::Enumeration,
        Detector::Probing,
        Detector::Tampering,
        Detector::NewPeer,
    ];

    /// The name used in configuration, metrics (`detector` label), logs and audit records.
    pub const fn name(self) -> &'static str {
        match self {
            Detector::RateSpike => "rate_spike",
            Detector::Enumeration => "enumeration",
            Detector::Probing => "probing",
            Detector::Tampering => "tampering",
            Detector::NewPeer => "new_peer",
        }
    }

    /// The detector a configuration name names.
    pub fn parse(name: &str) -> Option<Detector> {
        Detector::ALL.into_iter().find(|d| d.name() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Parses a list of detector names (a configuration value); INVALID_ARGUMENT naming the first
/// unknown one.
pub fn parse_detectors(setting: &str, names: &[String]) -> crate::error::Result<Vec<Detector>> {
    names
        .iter()
        .map(|name| {
            Detector::parse(name.trim()).ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!(
                    "{setting}: '{name}' is not a detector (one of: {})",
                    Detector::ALL.map(Detector::name).join(", ")
                ))
            })
        })
        .collect()
}

/// Settings of every detector and of containment.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Detectors switched off (`anomaly_detectors_off`).
    pub off: Vec<Detector>,
    /// At most one finding per (detector, caller, tenant) within this (µs).
    pub repeat_window_micros: i64,
    /// Most keys each detector tracks.
    pub max_tracked: usize,
    /// `rate_spike`.
    pub spike: SpikePolicy,
    /// `enumeration`.
    pub enumeration: EnumerationPolicy,
    /// `probing`.
    pub probing: ProbingPolicy,
    /// `tampering`.
    pub tamper: TamperPolicy,
    /// `new_peer`.
    pub peer: PeerPolicy,
    /// Detectors whose findings throttle the caller (opt-in; none by default).
    pub throttle: Vec<Detector>,
    /// Detectors whose findings quarantine the caller's token (opt-in; none by default): it
    /// is refused until an admin releases it (`service::containment`).
    pub quarantine: Vec<Detector>,
    /// The throttled caller's rate: calls per second and burst.
    pub throttle_rate: crate::auth::rate::RateLimit,
    /// How long a throttle lasts (µs).
    pub throttle_micros: i64,
}

impl Default for Policy {
    /// Every detector on with its documented defaults; a 10-minute repeat window; 100,000
    /// keys per detector; no containment; a throttle (when opted into) of 1 call per second
    /// (burst 5) for 15 minutes.
    fn default() -> Self {
        Self {
            off: Vec::new(),
            repeat_window_micros: 600_000_000,
            max_tracked: 100_000,
            spike: SpikePolicy::default(),
            enumeration: EnumerationPolicy::default(),
            probing: ProbingPolicy::default(),
            tamper: TamperPolicy::default(),
            peer: PeerPolicy::default(),
            throttle: Vec::new(),
            quarantine: Vec::new(),
            throttle_rate: crate::auth::rate::RateLimit {
                per_second: 1.0,
                burst: 5,
            },
            throttle_micros: 900_000_000,
        }
    }
}

/// What happened in one finished, authenticated call, as the detectors see it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// The caller's audit name (`token:<id>`, `cert:<identity>`).
    pub caller: &'a str,
    /// The tenant the call named, if any.
    pub tenant: Option<&'a str>,
    /// The peer's address without port.
    pub peer: &'a str,
    /// Over mTLS: the identity of the client certificate the connection presented (its SAN
    /// names, see `crate::auth::cert::peer_identity`); `None` without a client certificate.
    pub peer_certificate: Option<&'a str>,
    /// Items decrypted (Decrypt, DecryptBatch items, DecryptDataKey); 0 for other calls.
    pub decrypted: u64,
    /// Ciphertexts that did not open.
    pub failed_opens: u64,
    /// The call was refused PERMISSION_DENIED or NOT_FOUND.
    pub refused: bool,
    /// The call created the tenant it names.
    pub created_tenant: bool,
}

/// A detection: what tripped, for whom, with the figures (names and counts only).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The detector.
    pub detector: Detector,
    /// The caller's audit name.
    pub caller: String,
    /// The tenant (empty when none applies).
    pub tenant: String,
    /// The figures that tripped it, for people (`count=… baseline=… threshold=…`).
    pub figures: String,
    /// The caller is throttled from now on (containment configured for this detector).
    pub throttled: bool,
    /// The caller's token is to be quarantined (containment configured for this detector;
    /// the service applies it).
    pub quarantine: bool,
}

/// Shards of the caller-keyed tables. A power of two, several times the cores a server
/// usually has, so that two calls of different callers seldom share a lock.
pub const SHARDS: usize = 16;

/// The caller-keyed tables of one shard (a caller's every entry is in the shard its hash
/// picks).
struct Shard {
    spikes: spike::Spikes,
    reaches: reach::Reaches,
    peers: peer::NewPeers,
    repeats: table::Table<i64>,
    throttled: table::Table<i64>,
}

/// The detectors of one server.
pub struct Detectors {
    policy: Policy,
    on: [bool; 5],
    contain: [bool; 5],
    quarantine: [bool; 5],
    clock: SharedClock,
    hasher: table::KeyHasher,
    // A std mutex per shard: each section is a few hash lookups, far shorter than anything
    // else a call does, and never held across an await (see `auth::rate` for the same
    // reasoning). Sharding by caller keeps the calls of different callers apart.
    shards: Box<[Mutex<Shard>]>,
    // Per tenant, so not in the caller shards; only calls with failed opens take it.
    tampering: Mutex<tamper::Tampering>,
    throttle: crate::auth::rate::RateLimiter,
    /// Client certificates already named for `new_peer`, so a connection's calls (all with
    /// the same certificate) parse it once, not per call.
    certificate_names: Mutex<lru::LruCache<Box<[u8]>, Arc<str>>>,
}

/// Client certificates whose names [`Detectors::peer_certificate`] keeps: far more than the
/// live mTLS clients of one server; an evicted one is only parsed again.
const CERTIFICATE_NAMES: usize = 4096;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Detectors {
    /// Detectors with `policy`, measuring windows on `clock`.
    pub fn new(policy: Policy, clock: SharedClock) -> Self {
        let cap = policy.max_tracked.max(1).div_ceil(SHARDS);
        let mut on = [true; 5];
        for d in &policy.off {
            on[d.index()] = false;
        }
        let mut contain = [false; 5];
        for d in &policy.throttle {
            contain[d.index()] = true;
        }
        let mut quarantine = [false; 5];
        for d in &policy.quarantine {
            quarantine[d.index()] = true;
        }
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    spikes: spike::Spikes::new(cap, &policy.spike),
                    reaches: reach::Reaches::new(cap, &policy.enumeration, &policy.probing),
                    peers: peer::NewPeers::new(cap, &policy.peer),
                    repeats: table::Table::new(cap, policy.repeat_window_micros),
                    throttled: table::Table::new(cap, policy.throttle_micros),
                })
            })
            .collect();
        Self {
            throttle: crate::auth::rate::RateLimiter::new(policy.throttle_rate),
            tampering: Mutex::new(tamper::Tampering::new(policy.max_tracked, &policy.tamper)),
            on,
            contain,
            quarantine,
            policy,
            clock,
            hasher: table::key_hasher(),
            shards,
            certificate_names: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CERTIFICATE_NAMES)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// How `new_peer` names the client certificate `der` ([`crate::auth::cert::peer_identity`]),
    /// parsed once per certificate and then looked up (by its exact bytes).
    pub fn peer_certificate(&self, der: &[u8]) -> Arc<str> {
        if let Some(name) = lock(&self.certificate_names).get(der) {
            return Arc::clone(name);
        }
        // Parsed outside the lock: a certificate is named the same way by whoever parses it.
        let name: Arc<str> = crate::auth::cert::peer_identity(der).into();
        lock(&self.certificate_names).put(der.into(), Arc::clone(&name));
        name
    }

    /// The settings.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether `detector` is on.
    pub fn is_on(&self, detector: Detector) -> bool {
        self.on[detector.index()]
    }

    /// The shard of the caller whose key is `caller` (picked by the key's high bits, which
    /// are as uniform as the rest of a keyed hash).
    fn shard(&self, caller: u64) -> &Mutex<Shard> {
        // In bounds: the remainder of a division by the slice's length (SHARDS, never 0).
        &self.shards[(caller >> 32) as usize % self.shards.len()]
    }

    /// Shows one finished call to every detector; the findings that are due (repeats within
    /// the repeat window are dropped). Empty, without allocating, when nothing tripped.
    pub fn observe(&self, o: &Observation<'_>) -> Vec<Finding> {
        let now = self.clock.now_micros();
        let caller = table::key_of(&self.hasher, &[o.caller]);
        let tenant = o.tenant.map(|t| table::key_of(&self.hasher, &[t]));
        // Tenant-keyed, under its own lock (rare: only calls with failed opens).
        let tampered = match tenant {
            Some(tenant) if self.is_on(Detector::Tampering) && o.failed_opens > 0 => {
                lock(&self.tampering).observe(&self.policy.tamper, tenant, now, o.failed_opens)
            }
            _ => None,
        };
        let mut tripped: Vec<(Detector, String)> = Vec::new();
        let mut shard = lock(self.shard(caller));
        if let Some(tenant) = tenant {
            if self.is_on(Detector::RateSpike) && o.decrypted > 0 {
                let pair = caller ^ tenant.rotate_left(1);
                if let Some(f) = shard
                    .spikes
                    .observe(&self.policy.spike, pair, now, o.decrypted)
                {
                    tripped.push((
                        Detector::RateSpike,
                        format!(
                            "decrypted={} in the current {}s interval; baseline={:.1} per \
                             interval; threshold={:.1}",
                            f.count,
                            self.policy.spike.interval_micros / 1_000_000,
                            f.baseline,
                            f.threshold
                        ),
                    ));
                }
            }
            if self.is_on(Detector::Enumeration)
                && let Some(f) = shard.reaches.touch(
                    &self.policy.enumeration,
                    caller,
                    tenant,
                    o.created_tenant,
                    now,
                )
            {
                tripped.push((
                    Detector::Enumeration,
                    format!(
                        "new_tenants={} within {}s (threshold {})",
                        f.tenants,
                        f.window_micros / 1_000_000,
                        self.policy.enumeration.new_tenants
                    ),
                ));
            }
            if self.is_on(Detector::Probing)
                && o.refused
                && let Some(f) = shard
                    .reaches
                    .refused(&self.policy.probing, caller, tenant, now)
            {
                tripped.push((
                    Detector::Probing,
                    format!(
                        "refused_tenants={} (PERMISSION_DENIED or NOT_FOUND) within {}s \
                         (threshold {})",
                        f.tenants,
                        f.window_micros / 1_000_000,
                        self.policy.probing.tenants
                    ),
                ));
            }
            if let Some(count) = tampered {
                tripped.push((
                    Detector::Tampering,
                    format!(
                        "failed_opens={count} within {}s (threshold {})",
                        self.policy.tamper.window_micros / 1_000_000,
                        self.policy.tamper.failures
                    ),
                ));
            }
        }
        if self.is_on(Detector::NewPeer) {
            // A peer is the address and, over mTLS, the certificate identity together: either
            // one new makes a new peer.
            let peer = table::key_of(&self.hasher, &[o.peer, o.peer_certificate.unwrap_or("")]);
            if let Some(f) = shard.peers.observe(&self.policy.peer, caller, peer, now) {
                let figures = match o.peer_certificate {
                    None => format!(
                        "new peer address {} after {} known one(s)",
                        o.peer, f.known_peers
                    ),
                    Some(identity) => format!(
                        "new peer address {} with client certificate {identity} after {} known \
                         one(s)",
                        o.peer, f.known_peers
                    ),
                };
                tripped.push((Detector::NewPeer, figures));
            }
        }
        if tripped.is_empty() {
            return Vec::new();
        }
        let mut findings = Vec::with_capacity(tripped.len());
        for (detector, figures) in tripped {
            // Keyed by the caller too, so it lives in the caller's shard.
            let repeat = table::key_of(
                &self.hasher,
                &[detector.name(), o.caller, o.tenant.unwrap_or("")],
            );
            let window = self.policy.repeat_window_micros;
            let Some(last) = shard.repeats.touch(repeat, now, || i64::MIN) else {
                continue;
            };
            if *last != i64::MIN && now < last.saturating_add(window) {
                continue;
            }
            *last = now;
            let throttled = self.contain[detector.index()];
            if throttled && let Some(until) = shard.throttled.touch(caller, now, || now) {
                *until = now.saturating_add(self.policy.throttle_micros);
            }
            findings.push(Finding {
                detector,
                caller: o.caller.to_owned(),
                tenant: o.tenant.unwrap_or_default().to_owned(),
                figures,
                throttled,
                quarantine: self.quarantine[detector.index()],
            });
        }
        findings
    }

    /// For a caller under a throttle: `Err(wait)` when its throttled rate is spent, with the
    /// time until its next call may go. `Ok` for every caller not throttled (one hash and a
    /// lookup in its shard).
    pub fn check_throttle(&self, caller: &str) -> Result<(), std::time::Duration> {
        // Only detectors with throttling switched on ever throttle: with none (the default)
        // every call skips the hash and the lock.
        if !self.contain.iter().any(|&on| on) {
            return Ok(());
        }
        let now = self.clock.now_micros();
        let key = table::key_of(&self.hasher, &[caller]);
        let until = {
            let shard = lock(self.shard(key));
            if shard.throttled.is_empty() {
                return Ok(());
            }
            shard.throttled.get(key).copied()
        };
        match until {
            Some(until) if now < until => self.throttle.check(caller),
            _ => Ok(()),
        }
    }

    /// Observations dropped because a table was full (for the metrics).
    pub fn untracked(&self) -> u64 {
        let tampering = lock(&self.tampering).table.untracked();
        self.shards.iter().fold(tampering, |sum, shard| {
            let s = lock(shard);
            sum + s.spikes.table.untracked()
                + s.reaches.reach.untracked()
                + s.reaches.probes.untracked()
                + s.peers.table.untracked()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn refused<'a>(tenant: &'a str) -> Observation<'a> {
        Observation {
            caller: "token:x",
            tenant: Some(tenant),
            peer: "127.0.0.1",
            peer_certificate: None,
            decrypted: 0,
            failed_opens: 0,
            refused: true,
            created_tenant: false,
        }
    }

    fn probing_policy() -> Policy {
        Policy {
            probing: ProbingPolicy {
                window_micros: 1_000_000,
                tenants: 3,
            },
            repeat_window_micros: 10_000_000,
            ..Policy::default()
        }
    }

    #[test]
    fn findings_name_the_detector_caller_and_tenant_and_repeats_are_dropped() {
        let clock = ManualClock::at_micros(1_000_000_000_000);
        let detectors = Detectors::new(probing_policy(), clock.clone());
        assert!(detectors.observe(&refused("a")).is_empty());
        assert!(detectors.observe(&refused("b")).is_empty());
        let findings = detectors.observe(&refused("c"));
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].detector, Detector::Probing);
        assert_eq!(findings[0].caller, "token:x");
        assert_eq!(findings[0].tenant, "c");
        assert!(findings[0].figures.contains("refused_tenants=3"));
        assert!(!findings[0].throttled);
        // The next window trips again on the same tenant: within the repeat window, dropped.
        clock.advance(std::time::Duration::from_secs(2));
        for t in ["d", "e", "c"] {
            assert!(detectors.observe(&refused(t)).is_empty(), "{t}");
        }
        // After the repeat window it is reported again.
        clock.advance(std::time::Duration::from_secs(20));
        for t in ["d", "e"] {
            assert!(detectors.observe(&refused(t)).is_empty());
        }
        assert_eq!(detectors.observe(&refused("c")).len(), 1);
    }

    #[test]
    fn a_detector_switched_off_stays_silent() {
        let clock = ManualClock::at_micros(0);
        let policy = Policy {
            off: vec![Detector::Probing],
            ..probing_policy()
        };
        let detectors = Detectors::new(policy, clock);
        for t in ["a", "b", "c", "d"] {
            assert!(detectors.observe(&refused(t)).is_empty());
        }
    }

    #[test]
    fn containment_throttles_the_caller_until_it_expires() {
        let clock = ManualClock::at_micros(0);
        let policy = Policy {
            throttle: vec![Detector::Probing],
            throttle_rate: crate::auth::rate::RateLimit {
                per_second: 0.001,
                burst: 1,
            },
            throttle_micros: 60_000_000,
            ..probing_policy()
        };
        let detectors = Detectors::new(policy, clock.clone());
        assert!(detectors.check_throttle("token:x").is_ok());
        for t in ["a", "b"] {
            detectors.observe(&refused(t));
        }
        let findings = detectors.observe(&refused("c"));
        assert!(findings[0].throttled);
        assert!(detectors.check_throttle("token:x").is_ok(), "the burst");
        assert!(detectors.check_throttle("token:x").is_err());
        assert!(detectors.check_throttle("token:other").is_ok());
        clock.advance(std::time::Duration::from_secs(61));
        assert!(detectors.check_throttle("token:x").is_ok());
        assert!(detectors.check_throttle("token:x").is_ok());
    }

    #[test]
    fn over_mtls_a_new_certificate_identity_from_a_known_address_is_a_new_peer() {
        let clock = ManualClock::at_micros(0);
        let policy = Policy {
            peer: PeerPolicy {
                learning_micros: 1_000_000,
                max_peers: 8,
            },
            ..Policy::default()
        };
        let detectors = Detectors::new(policy, clock.clone());
        let call = |peer: &'static str, cert: Option<&'static str>| Observation {
            caller: "token:x",
            tenant: None,
            peer,
            peer_certificate: cert,
            decrypted: 0,
            failed_opens: 0,
            refused: false,
            created_tenant: false,
        };
        assert!(
            detectors
                .observe(&call("10.0.0.1", Some("a.svc")))
                .is_empty()
        );
        clock.advance(std::time::Duration::from_secs(2));
        assert!(
            detectors
                .observe(&call("10.0.0.1", Some("a.svc")))
                .is_empty()
        );
        let found = detectors.observe(&call("10.0.0.1", Some("b.svc")));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].detector, Detector::NewPeer);
        assert!(
            found[0].figures.contains("client certificate b.svc"),
            "{found:?}"
        );
        // Learned now: the same certificate from the same address again is nothing new.
        assert!(
            detectors
                .observe(&call("10.0.0.1", Some("b.svc")))
                .is_empty()
        );
    }

    #[test]
    fn detector_names_parse_back() {
        for d in Detector::ALL {
            assert_eq!(Detector::parse(d.name()), Some(d));
        }
        assert!(parse_detectors("x", &["rate_spike".into(), "bogus".into()]).is_err());
    }

    #[test]
    fn a_certificate_is_named_once_and_the_same_way_from_the_cache() {
        let detectors = Detectors::new(Policy::default(), ManualClock::at_micros(1));
        let der = |name: &str| {
            rcgen::generate_simple_self_signed(vec![name.to_owned()])
                .unwrap()
                .cert
                .der()
                .to_vec()
        };
        let (a, b) = (der("a.svc.internal"), der("b.svc.internal"));
        let first = detectors.peer_certificate(&a);
        assert_eq!(&*first, crate::auth::cert::peer_identity(&a));
        // The second lookup is the cached name itself, not a new parse.
        assert!(Arc::ptr_eq(&first, &detectors.peer_certificate(&a)));
        assert_eq!(
            &*detectors.peer_certificate(&b),
            crate::auth::cert::peer_identity(&b)
        );
        assert_ne!(first, detectors.peer_certificate(&b));
    }
}
