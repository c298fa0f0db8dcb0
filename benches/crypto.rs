//! Criterion micro-benchmarks of the crypto core: what one field value costs to seal and open
//! at several sizes (with a prepared key and with a key derived on the spot), the pieces of
//! that cost (raw ring seal, key derivation, the cached-key lookup, the nonce, the AAD), and
//! parsing the wire format; and the searchable-column pieces (a cached blind index against a raw
//! HMAC-SHA256, a deterministic seal).
//!
//! `cargo bench --bench crypto` (add `-- --quick` for a fast pass). These are in-process
//! figures for one core; `tenant-kms bench` measures the service end to end.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use tenant_kms::crypto::aead::random_nonce;
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format;
use tenant_kms::crypto::secret::SecretKey;
use tenant_kms::domain::TenantId;
use tenant_kms::keys::cache::TenantEntry;

const TENANT: &str = "bench-000042";
const CONTEXT: &str = "bench.customers.email";
const AAD: &[u8] = b"row-0000001234";
const SIZES: &[usize] = &[16, 64, 256, 1024, 4096, 65536];

fn entry() -> TenantEntry {
    TenantEntry::with_one_key(
        TenantId::parse(TENANT).unwrap(),
        SecretKey::from_slice(&[7; 32]).unwrap(),
    )
}

fn wire_aad_len() -> usize {
    format::additional_data(
        Purpose::Field.label(),
        &[0; format::HEADER_LEN],
        TENANT,
        CONTEXT,
        AAD,
    )
    .len()
}

fn seal_and_open(c: &mut Criterion) {
    let entry = entry();
    let aad_len = wire_aad_len();
    let raw = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9; 32]).unwrap());
    let raw_aad = vec![1u8; aad_len];
    let mut group = c.benchmark_group("field");
    for &size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let plaintext = vec![0xa5u8; size];
        // The primitive alone: ring AES-256-GCM in place, counter nonce, same AAD length.
        let mut buf = vec![0u8; size];
        let mut counter = 0u64;
        group.bench_with_input(BenchmarkId::new("raw_ring_seal", size), &size, |b, _| {
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&counter.to_be_bytes());
                let tag = raw
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&raw_aad[..]),
                        &mut buf,
                    )
                    .unwrap();
                let _ = black_box(tag);
            })
        });
        // What a handler runs with the tenant cached: prepared-key lookup + seal_value.
        group.bench_with_input(BenchmarkId::new("seal_cached", size), &size, |b, _| {
            b.iter(|| {
                let key = entry.value_key(1, Purpose::Field, CONTEXT).unwrap();
                black_box(
                    envelope::seal_value(
                        &key,
                        Purpose::Field,
                        1,
                        TENANT,
                        CONTEXT,
                        AAD,
                        black_box(&plaintext),
                    )
                    .unwrap(),
                )
            })
        });
        let key = entry.value_key(1, Purpose::Field, CONTEXT).unwrap();
        let ciphertext =
            envelope::seal_value(&key, Purpose::Field, 1, TENANT, CONTEXT, AAD, &plaintext)
                .unwrap();
        group.bench_with_input(BenchmarkId::new("open_cached", size), &size, |b, _| {
            b.iter(|| {
                let parsed = format::parse(black_box(&ciphertext)).unwrap();
                let key = entry.value_key(1, Purpose::Field, CONTEXT).unwrap();
                black_box(
                    envelope::open_value(&key, Purpose::Field, &parsed, TENANT, CONTEXT, AAD)
                        .unwrap(),
                )
            })
        });
    }
    group.finish();
}

fn derivation(c: &mut Criterion) {
    let tenant_key = SecretKey::from_slice(&[7; 32]).unwrap();
    let plaintext = vec![0xa5u8; 64];
    let mut group = c.benchmark_group("derive");
    group.bench_function("hkdf_value_key", |b| {
        b.iter(|| {
            black_box(
                envelope::derive_value_key(&tenant_key, Purpose::Field, TENANT, CONTEXT).unwrap(),
            )
        })
    });
    // The same derivation through the `hkdf` crate (the reference implementation in kdf.rs).
    let info = envelope::value_key_info(Purpose::Field, TENANT, CONTEXT);
    group.bench_function("hkdf_crate_32_bytes", |b| {
        b.iter(|| {
            let mut out = [0u8; 32];
            tenant_kms::crypto::kdf::hkdf_sha256(None, tenant_key.expose_secret(), &info, &mut out)
                .unwrap();
            black_box(out)
        })
    });
    group.bench_function("aead_key_setup", |b| {
        b.iter(|| {
            black_box(tenant_kms::crypto::aead::AeadKey::from_slice(black_box(&[5u8; 32])).unwrap())
        })
    });
    // A context seen for the first time: derive the key, then seal 64 bytes.
    group.bench_function("uncached_derive_and_seal_64", |b| {
        b.iter(|| {
            let key =
                envelope::derive_value_key(&tenant_key, Purpose::Field, TENANT, CONTEXT).unwrap();
            black_box(
                envelope::seal_value(&key, Purpose::Field, 1, TENANT, CONTEXT, AAD, &plaintext)
                    .unwrap(),
            )
        })
    });
    let master = SecretKey::from_slice(&[3; 32]).unwrap();
    let wrapping =
        envelope::master_wrapping_key(&master, tenant_kms::crypto::labels::TENANT_KEY_WRAP, 1)
            .unwrap();
    let wrapped = envelope::wrap_tenant_key(&wrapping, 1, TENANT, 1, &tenant_key).unwrap();
    // A cache miss unwraps each enabled tenant key version; `rotate --master` unwraps and wraps.
    group.bench_function("unwrap_tenant_key", |b| {
        b.iter(|| {
            black_box(envelope::unwrap_tenant_key(&wrapping, 1, TENANT, 1, &wrapped).unwrap())
        })
    });
    group.bench_function("rewrap_tenant_key", |b| {
        b.iter(|| {
            let key = envelope::unwrap_tenant_key(&wrapping, 1, TENANT, 1, &wrapped).unwrap();
            black_box(envelope::wrap_tenant_key(&wrapping, 1, TENANT, 1, &key).unwrap())
        })
    });
    group.finish();
}

fn pieces(c: &mut Criterion) {
    let entry = entry();
    let mut group = c.benchmark_group("pieces");
    group.bench_function("value_key_lookup", |b| {
        b.iter(|| {
            black_box(
                entry
                    .value_key(1, Purpose::Field, black_box(CONTEXT))
                    .unwrap(),
            )
        })
    });
    group.bench_function("random_nonce", |b| b.iter(|| black_box(random_nonce())));
    group.bench_function("wire_aad", |b| {
        b.iter(|| {
            black_box(format::additional_data(
                Purpose::Field.label(),
                &[0; format::HEADER_LEN],
                TENANT,
                CONTEXT,
                AAD,
            ))
        })
    });
    group.bench_function("try_take_budget", |b| {
        b.iter(|| black_box(entry.try_take(1)))
    });
    group.finish();
}

fn wire(c: &mut Criterion) {
    let key = envelope::derive_value_key(
        &SecretKey::from_slice(&[7; 32]).unwrap(),
        Purpose::Field,
        TENANT,
        CONTEXT,
    )
    .unwrap();
    let ciphertext =
        envelope::seal_value(&key, Purpose::Field, 1, TENANT, CONTEXT, AAD, &[0; 64]).unwrap();
    let mut group = c.benchmark_group("wire");
    group.bench_function("parse_valid", |b| {
        b.iter(|| {
            black_box(
                format::parse(black_box(&ciphertext))
                    .unwrap()
                    .header
                    .key_version,
            )
        })
    });
    let mut bad = ciphertext.clone();
    bad[0] = 9;
    group.bench_function("parse_invalid", |b| {
        b.iter(|| black_box(format::parse(black_box(&bad)).is_err()))
    });
    group.finish();
}

/// Searchable columns (issue 15): a blind index of a 32-byte value with the index key cached in
/// the tenant entry (the service's path: cache lookup, normalization, HMAC, truncation) against
/// a raw ring HMAC-SHA256 of the same value with a prepared key (the target is ≤ 1.5×), and a
/// deterministic (AES-256-SIV) seal of 64 bytes with its key cached.
fn searchable(c: &mut Criterion) {
    use tenant_kms::crypto::blind_index::{Normalization, index_of};
    use tenant_kms::crypto::siv;
    let entry = entry();
    let value = [0x5au8; 32];
    let mut group = c.benchmark_group("searchable");
    group.throughput(Throughput::Elements(1));
    let raw = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[3; 32]);
    group.bench_function("raw_hmac_sha256_32B", |b| {
        b.iter(|| ring::hmac::sign(&raw, black_box(&value)))
    });
    group.bench_function("cached_blind_index_32B", |b| {
        b.iter(|| {
            let key = entry.index_key(1, "email").unwrap();
            index_of(&key, 32, Normalization::Exact, black_box(&value)).unwrap()
        })
    });
    group.bench_function("cached_blind_index_32B_casefold", |b| {
        b.iter(|| {
            let key = entry.index_key(1, "email").unwrap();
            index_of(
                &key,
                32,
                Normalization::CaseFoldTrim,
                black_box(b"alice.smith@example.com.....xyz"),
            )
            .unwrap()
        })
    });
    let plaintext = [0xa5u8; 64];
    group.bench_function("cached_deterministic_seal_64B", |b| {
        b.iter(|| {
            let key = entry.deterministic_key(1, CONTEXT).unwrap();
            siv::seal_deterministic(&key, 1, TENANT, CONTEXT, AAD, black_box(&plaintext)).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, seal_and_open, derivation, pieces, wire, searchable);
criterion_main!(benches);
