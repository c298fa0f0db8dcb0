//! Scrape-time gauges read from the server's key cache: how much of the nonce budget the
//! primary key versions of the cached tenants have used (DESIGN §2: at most `max_encryptions`
//! seals per version, well under the 2^32 of NIST SP 800-38D).
//!
//! Only cached tenants are visible without a store query, so these gauges cover the tenants in
//! use; `rotate --due` covers the rest from the store. To keep a scrape small with a large
//! cache, per-tenant series are emitted only for the most used versions.

use std::sync::Arc;

use prometheus::proto::{Metric, MetricFamily, MetricType};

use crate::keys::KeyManager;
use crate::metrics::{Extra, family, sample};

/// Per-tenant series are emitted for at most this many versions (the most used).
const TOP_VERSIONS: usize = 10;

/// The `Extra` families for [`crate::metrics::serve`] over a key manager.
pub fn nonce_budget(keys: Arc<KeyManager>) -> Extra {
    Arc::new(move || families(&keys))
}

fn families(keys: &KeyManager) -> Vec<MetricFamily> {
    let mut cached = 0u64;
    let mut over_half = 0u64;
    let mut over_90 = 0u64;
    let mut max_ratio = 0f64;
    // (ratio, tenant, version, used, max)
    let mut top: Vec<(f64, String, u32, u64, u64)> = Vec::new();
    keys.cache().for_each(|entry| {
        cached += 1;
        // Skip an entry whose counter is busy rather than wait under the cache lock.
        let Ok(counter) = entry.counter.try_lock() else {
            return;
        };
        let max = entry.record.max_encryptions.max(1);
        let ratio = counter.used as f64 / max as f64;
        max_ratio = max_ratio.max(ratio);
        over_half += u64::from(ratio >= 0.5);
        over_90 += u64::from(ratio >= 0.9);
        if top.len() < TOP_VERSIONS || top.last().is_some_and(|t| t.0 < ratio) {
            top.push((
                ratio,
                entry.record.tenant_id.as_str().to_owned(),
                entry.record.primary_version,
                counter.used,
                max,
            ));
            top.sort_by(|a, b| b.0.total_cmp(&a.0));
            top.truncate(TOP_VERSIONS);
        }
    });
    let gauge = |labels: &[(&str, &str)], value: f64| sample(MetricType::GAUGE, labels, value);
    let per_version = |value: fn(&(f64, String, u32, u64, u64)) -> u64| -> Vec<Metric> {
        top.iter()
            .map(|t| {
                let version = t.2.to_string();
                gauge(
                    &[("tenant", t.1.as_str()), ("version", version.as_str())],
                    value(t) as f64,
                )
            })
            .collect()
    };
    vec![
        family(
            "tenant_kms_key_cache_tenants",
            "Tenants whose unwrapped keys are cached.",
            MetricType::GAUGE,
            vec![gauge(&[], cached as f64)],
        ),
        family(
            "tenant_kms_nonce_budget_max_ratio",
            "Highest share of its nonce budget a cached primary key version has used.",
            MetricType::GAUGE,
            vec![gauge(&[], max_ratio)],
        ),
        family(
            "tenant_kms_nonce_budget_versions",
            "Cached primary key versions past a share of their nonce budget.",
            MetricType::GAUGE,
            vec![
                gauge(&[("over", "0.5")], over_half as f64),
                gauge(&[("over", "0.9")], over_90 as f64),
            ],
        ),
        family(
            "tenant_kms_key_version_encryptions",
            "Seals counted under a cached primary key version (conservative: includes \
             reserved, unused budget), for the most used versions.",
            MetricType::GAUGE,
            per_version(|t| t.3),
        ),
        family(
            "tenant_kms_key_version_max_encryptions",
            "The nonce budget of those versions.",
            MetricType::GAUGE,
            per_version(|t| t.4),
        ),
    ]
}
