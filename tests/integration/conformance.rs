//! The crypto conformance suite (issue 5): the seal/open and derive functions the service uses
//! (not a parallel copy) against public test suites, our own wire-format vectors, property and
//! differential tests, and the self-test.
//!
//! - `wycheproof`: Wycheproof AES-GCM through `AeadKey`, Wycheproof HKDF-SHA256 and RFC 5869
//!   through `crypto::kdf`.
//! - `vectors`: `vectors/*.json` (docs/FORMAT.md), their generator, and FORMAT.md itself.
//! - `properties`: proptest round trips, single-bit flips, ring vs RustCrypto `aes-gcm`.
//! - `nonces`: 10^6 seals from 16 threads repeat no nonce (release builds only).
//! - `selftest`: the power-on and full self-tests and the `tenant-kms selftest` command.
//!
//! Each suite prints its counts with [`report`], which shows even without `--nocapture`.

// Tests may panic on a broken invariant: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "conformance/nonces.rs"]
mod nonces;
#[path = "conformance/properties.rs"]
mod properties;
#[path = "conformance/selftest.rs"]
mod selftest;
#[path = "conformance/vectors.rs"]
mod vectors;
#[path = "conformance/wycheproof.rs"]
mod wycheproof;

use std::io::Write;

/// Prints one line of counts to stderr.
///
/// The test harness captures `println!`/`eprintln!` of passing tests, so counts printed that
/// way never reach a CI log. A direct write to the stderr handle is not captured: these lines
/// show in a plain `cargo test` run.
pub fn report(line: &str) {
    // One write of the whole line, so it does not interleave with the harness's output.
    let text = format!("conformance: {line}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
