//! The in-process baselines: what the crypto costs on one core (raw ring seal), what our field
//! encryption costs with a cached and an uncached key, what one fsync of the data directory
//! costs, and what the key store's change check costs.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::Serialize;

use super::scenario::{AAD, CONTEXT};
use super::stats::Latency;
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format;
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::domain::TenantId;
use tenant_kms::error::{Error, Result};
use tenant_kms::keys::cache::TenantEntry;
use tenant_kms::store::{ChangeDetection, SqliteKeyStore};

/// The tenant id the in-process baselines bind (the size of a typical id).
const TENANT: &str = "bench-000042";

/// Runs `op` in chunks until `budget` has passed; returns nanoseconds per call.
fn time_per_op(budget: Duration, mut op: impl FnMut()) -> f64 {
    // Warm up caches and the branch predictor first.
    for _ in 0..1000 {
        op();
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            op();
        }
        ops += 1000;
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// The AAD length a v1 ciphertext of the bench's tenant and context authenticates.
pub fn wire_aad_len() -> usize {
    let header = [0u8; format::HEADER_LEN];
    format::additional_data(Purpose::Field.label(), &header, TENANT, CONTEXT, AAD).len()
}

/// Nanoseconds of one ring AES-256-GCM seal of `size` bytes with `aad_len` bytes of AAD, on
/// one core, in place, counter nonces: the primitive with nothing around it.
pub fn raw_seal_ns(size: usize, aad_len: usize, budget: Duration) -> f64 {
    raw_sealer(size, aad_len).map_or(0.0, |op| time_per_op(budget, op))
}

/// One raw seal per call (see [`raw_seal_ns`]).
fn raw_sealer(size: usize, aad_len: usize) -> Option<impl FnMut()> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).ok()?);
    let aad = vec![1u8; aad_len];
    let mut buf = vec![0u8; size + 16];
    let mut counter = 0u64;
    Some(move || {
        counter += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let (data, tag_out) = buf.split_at_mut(size);
        if let Ok(tag) = key.seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            data,
        ) {
            tag_out.copy_from_slice(tag.as_ref());
        }
        std::hint::black_box(&buf);
    })
}

/// Slices each side of [`seal_pair_ns`] is measured in.
const PAIR_SLICES: u32 = 10;

/// The raw seal ([`raw_seal_ns`], with the wire format's AAD length) and the cached field
/// encryption (`cached_sealer`) of `size` bytes, measured in alternating slices
/// of `budget`; medians over the slices, so a burst of other load on this shared machine hits
/// both alike. Returns (raw, cached) nanoseconds.
pub fn seal_pair_ns(size: usize, budget: Duration) -> Result<(f64, f64)> {
    let mut raw =
        raw_sealer(size, wire_aad_len()).ok_or_else(|| Error::internal("ring key setup"))?;
    let mut cached = cached_sealer(size)?;
    let slice = budget / PAIR_SLICES;
    let mut raw_ns = Vec::new();
    let mut cached_ns = Vec::new();
    for _ in 0..PAIR_SLICES {
        raw_ns.push(time_per_op(slice, &mut raw));
        cached_ns.push(time_per_op(slice, &mut cached));
    }
    Ok((median(raw_ns), median(cached_ns)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn bench_entry() -> Result<(TenantEntry, TenantId)> {
    let tenant = TenantId::parse(TENANT)?;
    let key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
    Ok((TenantEntry::with_one_key(tenant.clone(), key), tenant))
}

/// One field encryption of `size` bytes with the tenant's snapshot cached, per call:
/// prepared-key lookup, random nonce, header, AAD, seal: exactly what a handler runs between
/// admitting a call and finishing it, minus the nonce-budget take.
fn cached_sealer(size: usize) -> Result<impl FnMut()> {
    let (entry, tenant) = bench_entry()?;
    let plaintext = vec![0xa5u8; size];
    Ok(move || {
        if let Ok(key) = entry.value_key(1, Purpose::Field, CONTEXT) {
            let out = envelope::seal_value(
                &key,
                Purpose::Field,
                1,
                tenant.as_str(),
                CONTEXT,
                AAD,
                &plaintext,
            );
            std::hint::black_box(out.ok());
        }
    })
}

/// Nanoseconds of deriving a field key (HKDF-SHA256 + AES key schedule) and sealing `size`
/// bytes with it: a context seen for the first time.
pub fn field_encrypt_uncached_ns(size: usize, budget: Duration) -> Result<f64> {
    let key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
    let plaintext = vec![0xa5u8; size];
    Ok(time_per_op(budget, || {
        if let Ok(value_key) = envelope::derive_value_key(&key, Purpose::Field, TENANT, CONTEXT) {
            let out = envelope::seal_value(
                &value_key,
                Purpose::Field,
                1,
                TENANT,
                CONTEXT,
                AAD,
                &plaintext,
            );
            std::hint::black_box(out.ok());
        }
    }))
}

/// One file's fsync latency in a directory, one at a time.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FsyncBaseline {
    /// Fsyncs done.
    pub count: u64,
    /// Fsyncs per second, one at a time.
    pub per_second: f64,
    /// Their latency.
    pub latency: Latency,
}

/// Writes 4 KiB and fsyncs it, over and over, in a scratch file in `dir`, for `budget`.
pub fn fsync(dir: &Path, budget: Duration) -> Result<FsyncBaseline> {
    let path = dir.join(".bench-fsync");
    let io = |e: std::io::Error| Error::Internal(format!("fsync baseline: {e}"));
    let mut file = std::fs::File::create(&path).map_err(io)?;
    let block = [0x33u8; 4096];
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget && samples.len() < 100_000 {
        let t0 = Instant::now();
        file.write_all(&block).map_err(io)?;
        file.sync_all().map_err(io)?;
        samples.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let seconds = start.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    let count = samples.len() as u64;
    Ok(FsyncBaseline {
        count,
        per_second: count as f64 / seconds,
        latency: Latency::of_nanos(&mut samples),
    })
}

/// Nanoseconds of one key-store change check (`PRAGMA data_version` under the keys.db mutex)
/// on a scratch store in `dir`.
pub fn change_check_ns(dir: &Path, budget: Duration) -> Result<f64> {
    let path = dir.join("bench-change-check.db");
    let store = SqliteKeyStore::open(&path)?;
    let ns = time_per_op(budget, || {
        std::hint::black_box(store.change_generation().ok());
    });
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(ns)
}
