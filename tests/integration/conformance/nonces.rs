//! 10^6 seals from 16 threads repeat no nonce.
//!
//! Each thread seals through `envelope::seal_value`, which draws its nonce from
//! `crypto::aead::random_nonce` (the thread-local CSPRNG), exactly as the service's handlers
//! do; 16 threads means 16 independently seeded generators, the case where bad seeding would
//! show. The nonces are read back from the ciphertext headers, sorted and compared.
//! A collision among 10^6 random 96-bit values has probability about 2^-57: any repeat is a
//! bug, not bad luck. Release builds only (about a second); debug builds skip it.

use tenant_kms::crypto::aead::NONCE_LEN;
use tenant_kms::crypto::envelope::{self, Purpose};
use tenant_kms::crypto::format;
use tenant_kms::crypto::secret::SecretKey;

use super::report;

const THREADS: usize = 16;
const TOTAL: usize = 1_000_000;

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "10^6 seals: runs under `cargo test --release`"
)]
fn a_million_seals_from_16_threads_repeat_no_nonce() {
    let tk = SecretKey::from_slice(&[0x5a; 32]).unwrap();
    let key = envelope::derive_value_key(&tk, Purpose::Field, "acme", "crm.email").unwrap();
    let per_thread = TOTAL / THREADS;
    let mut nonces: Vec<[u8; NONCE_LEN]> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let key = &key;
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(per_thread);
                    for i in 0..per_thread {
                        let ct = envelope::seal_value(
                            key,
                            Purpose::Field,
                            1,
                            "acme",
                            "crm.email",
                            b"",
                            &(i as u64).to_be_bytes(),
                        )
                        .unwrap();
                        let parsed = format::parse(&ct).unwrap();
                        mine.push(parsed.header.nonce);
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(nonces.len(), TOTAL);
    nonces.sort_unstable();
    let repeats = nonces.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(repeats, 0, "{repeats} repeated nonces among {TOTAL}");
    report(&format!(
        "nonces: {TOTAL} seals from {THREADS} threads, {} distinct nonces, 0 repeated",
        nonces.len()
    ));
}
