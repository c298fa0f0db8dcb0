//! Criterion benchmark of the anomaly detectors' cost per call (issue 16: target ≤ 1 µs of
//! server CPU per call): [`Detectors::observe`] for the calls a server sees most (a decrypt,
//! an encrypt, a refusal, a batch) with 10,000 callers × tenants already tracked, on the
//! system clock as in production, plus the throttle check every authenticated call makes, and
//! the naming of a client certificate that `new_peer` adds to each call over mTLS.
//!
//! `cargo bench --bench detect` (add `-- --quick` for a fast pass). Figures are for one core
//! of this machine; docs/PERFORMANCE.md lists them with the command.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tenant_kms::detect::{Detectors, Observation, Policy};

const CALLERS: usize = 100;
const TENANTS: usize = 100;

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

fn warmed() -> (Detectors, Vec<String>, Vec<String>) {
    let detectors = Detectors::new(Policy::default(), tenant_kms::clock::system());
    let callers = names("token:", CALLERS);
    let tenants = names("tenant-", TENANTS);
    for caller in &callers {
        for tenant in &tenants {
            detectors.observe(&observation(caller, tenant, 1, false));
        }
    }
    (detectors, callers, tenants)
}

fn observation<'a>(
    caller: &'a str,
    tenant: &'a str,
    decrypted: u64,
    refused: bool,
) -> Observation<'a> {
    Observation {
        caller,
        tenant: Some(tenant),
        peer: "10.1.2.3",
        peer_certificate: None,
        decrypted,
        failed_opens: 0,
        refused,
        created_tenant: false,
    }
}

fn bench(c: &mut Criterion) {
    let (detectors, callers, tenants) = warmed();
    let mut group = c.benchmark_group("detect");
    let mut i = 0usize;
    let mut next = || {
        i = i.wrapping_add(7919);
        (&callers[i % CALLERS], &tenants[(i / CALLERS) % TENANTS])
    };
    group.bench_function("observe_decrypt", |b| {
        b.iter(|| {
            let (caller, tenant) = next();
            black_box(detectors.observe(black_box(&observation(caller, tenant, 1, false))))
        })
    });
    group.bench_function("observe_encrypt", |b| {
        b.iter(|| {
            let (caller, tenant) = next();
            black_box(detectors.observe(black_box(&observation(caller, tenant, 0, false))))
        })
    });
    group.bench_function("observe_batch_of_100", |b| {
        b.iter(|| {
            let (caller, tenant) = next();
            black_box(detectors.observe(black_box(&observation(caller, tenant, 100, false))))
        })
    });
    group.bench_function("check_throttle", |b| {
        b.iter(|| {
            let (caller, _) = next();
            black_box(detectors.check_throttle(black_box(caller))).ok()
        })
    });
    // Over mTLS, the `new_peer` detector's extra work per call: naming the client certificate.
    let der = rcgen::generate_simple_self_signed(vec!["ingest.svc.internal".to_owned()])
        .unwrap()
        .cert
        .der()
        .to_vec();
    group.bench_function("peer_identity_of_a_client_certificate", |b| {
        b.iter(|| black_box(tenant_kms::auth::cert::peer_identity(black_box(&der))))
    });
    // What a call pays: the certificate of its connection, named on an earlier call.
    group.bench_function("peer_certificate_seen_before", |b| {
        b.iter(|| black_box(detectors.peer_certificate(black_box(&der))))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
