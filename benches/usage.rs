//! The hot-path cost of usage accounting: what `UsageMeter::record` adds to each finished call
//! (issue 16: measured, not assumed), with a key seen before (the steady state) over 1, 100
//! and 10 000 distinct tenants, plus the caller-name formatting `Call::finish` does for it.
//!
//! `cargo bench --bench usage` (add `-- --quick` for a fast pass). One core, in process; no
//! flush runs during the measurement (the meter's flush is on its own task in the server).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tenant_kms::clock::ManualClock;
use tenant_kms::usage::{SqliteUsageStore, UsageCounts, UsageMeter, UsagePolicy};

fn record(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteUsageStore::open(&dir.path().join("usage.db")).unwrap());
    let clock = ManualClock::at_micros(1_800_000_000_000_000);
    let meter = UsageMeter::new(UsagePolicy::default(), clock, store);
    let counts = UsageCounts {
        calls: 1,
        items: 1,
        request_bytes: 96,
        response_bytes: 120,
        ..Default::default()
    };
    let mut group = c.benchmark_group("usage");
    for tenants in [1usize, 100, 10_000] {
        let names: Vec<String> = (0..tenants).map(|i| format!("tenant-{i:06}")).collect();
        for name in &names {
            meter.record(name, "token:0123456789abcdef", "Decrypt", "ok", &counts);
        }
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("record", tenants), &names, |b, names| {
            b.iter(|| {
                i = (i + 1) % names.len();
                meter.record(
                    black_box(&names[i]),
                    black_box("token:0123456789abcdef"),
                    "Decrypt",
                    "ok",
                    &counts,
                );
            });
        });
    }
    group.bench_function("caller_name", |b| {
        b.iter(|| black_box(format!("token:{}", black_box("0123456789abcdef"))))
    });
    group.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
