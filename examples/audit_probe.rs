#![allow(clippy::unwrap_used, missing_docs)]
use std::time::Instant;
use tenant_kms::audit::{AuditRecord, ChainKeys, Outcome};
use tenant_kms::crypto::secret::SecretKey;

fn rec(i: u64) -> AuditRecord {
    AuditRecord {
        time_micros: 1_700_000_000_000_000 + i as i64,
        request_id: format!("{:016x}", i.wrapping_mul(0x9e3779b97f4a7c15)),
        caller: "token:abcdef0123456789".into(),
        peer: "127.0.0.1:54321".into(),
        tenant_id: format!(
            "bench-{}",
            (i.wrapping_mul(2654435761))
                % std::env::var("TENANTS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(100u64)
        ),
        operation: "Encrypt".into(),
        contexts: vec!["bench.customers.email".into()],
        key_versions: vec![1],
        item_count: 1,
        outcome: Outcome::Ok,
        aad_fingerprint: "0123456789abcdef0123456789abcdef".into(),
        detail: String::new(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.get(1).map(|s| s == "fsync").unwrap_or(false);
    let extra = args.get(2).cloned().unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("audit-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = ChainKeys::derive(&SecretKey::from_slice(&[1; 32]).unwrap()).unwrap();
    let mut conn = tenant_kms::audit::sqlite::open(&dir.join("audit.db"), full).unwrap();
    if !extra.is_empty() {
        conn.execute_batch(&extra).unwrap();
    }
    let mut i = 0u64;
    // prefill
    for _ in 0..200 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                i += 1;
                rec(i)
            })
            .collect();
        tenant_kms::audit::sqlite::append(&mut conn, &keys, &batch).unwrap();
    }
    for batch_size in [1usize, 4, 16, 64, 256] {
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed().as_millis() < 1500 {
            let batch: Vec<_> = (0..batch_size)
                .map(|_| {
                    i += 1;
                    rec(i)
                })
                .collect();
            tenant_kms::audit::sqlite::append(&mut conn, &keys, &batch).unwrap();
            n += batch_size;
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "batch {batch_size:>4}: {us:7.2} µs/record, {:7.1} µs/commit",
            us * batch_size as f64
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
