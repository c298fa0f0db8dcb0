//! Searchable-column self-tests (docs/FORMAT.md section 10), through the production code
//! (`crypto::siv`, `crypto::blind_index`): RFC 5297 Appendix A and every vector of
//! `vectors/blind_index.json` and `vectors/deterministic_value.json`, embedded in the binary.

use serde_json::Value;

use super::{CaseOutcome, SuiteReport};
use crate::crypto::blind_index::{self, IndexKey, Normalization};
use crate::crypto::format;
use crate::crypto::secret::SecretKey;
use crate::crypto::siv::{self, SivKey};

/// `vectors/blind_index.json`.
pub const BLIND_INDEX_JSON: &str = include_str!("../../vectors/blind_index.json");
/// `vectors/deterministic_value.json`.
pub const DETERMINISTIC_VALUE_JSON: &str = include_str!("../../vectors/deterministic_value.json");

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text.replace([' ', '\n'], "")).map_err(|_| format!("bad hex {text}"))
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a str, String> {
    v[name].as_str().ok_or_else(|| format!("missing {name}"))
}

fn bytes(v: &Value, name: &str) -> Result<Vec<u8>, String> {
    unhex(field(v, name)?)
}

fn number(v: &Value, name: &str) -> Result<u32, String> {
    v[name]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("missing {name}"))
}

fn check(ok: bool, why: impl FnOnce() -> String) -> Result<CaseOutcome, String> {
    Ok(if ok {
        CaseOutcome::Passed
    } else {
        CaseOutcome::Failed(why())
    })
}

/// RFC 5297 Appendix A.1 (deterministic) and A.2 (several header components), sealed and
/// opened through `SivKey`, and A.1 with a flipped bit refused.
pub fn rfc5297() -> SuiteReport {
    let mut report = SuiteReport::new("RFC 5297 A.1-A.2 AES-SIV");
    let cases: [(&str, &str, &[&str], &str, &str); 2] = [
        (
            "A.1",
            "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
            &["101112131415161718191a1b1c1d1e1f2021222324252627"],
            "112233445566778899aabbccddee",
            "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c",
        ),
        (
            "A.2",
            "7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f",
            &[
                "00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100",
                "102030405060708090a0",
                "09f911029d74e35bd84156c5635688c0",
            ],
            "7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553",
            "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d",
        ),
    ];
    for (name, key, headers, pt, out) in cases {
        let outcome = (|| {
            let key = SivKey::from_slice(&unhex(key)?).map_err(|_| "key refused".to_owned())?;
            let headers: Vec<Vec<u8>> =
                headers.iter().map(|h| unhex(h)).collect::<Result<_, _>>()?;
            let headers: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
            let (pt, out) = (unhex(pt)?, unhex(out)?);
            let sealed = key
                .encrypt(&headers, &pt)
                .map_err(|_| "seal failed".to_owned())?;
            let opened = key
                .decrypt(&headers, &out)
                .map_err(|_| "open failed".to_owned())?;
            let mut bad = out.clone();
            if let Some(b) = bad.last_mut() {
                *b ^= 1;
            }
            check(
                sealed == out
                    && opened.expose_secret() == pt
                    && key.decrypt(&headers, &bad).is_err(),
                || format!("{name}: output differs"),
            )
        })();
        report.record(outcome.unwrap_or_else(CaseOutcome::Failed));
    }
    report
}

fn blind_index_valid(v: &Value) -> Result<CaseOutcome, String> {
    let name = field(v, "name")?;
    let norm = Normalization::parse(field(v, "normalization")?).ok_or("bad normalization")?;
    let tk = SecretKey::from_slice(&bytes(v, "tenant_key")?).map_err(|_| "bad tenant key")?;
    let key = IndexKey::derive(&tk, field(v, "tenant_id")?, field(v, "index_name")?)
        .map_err(|_| "derivation failed")?;
    let bits = blind_index::check_bits(number(v, "bits")?).map_err(|_| "bits refused")?;
    let index = blind_index::index_of(&key, bits, norm, &bytes(v, "value")?)
        .map_err(|_| format!("{name}: refused"))?;
    check(index == bytes(v, "index")?, || {
        format!("{name}: index differs")
    })
}

fn blind_index_invalid(v: &Value) -> Result<CaseOutcome, String> {
    let name = field(v, "name")?;
    let refused = match field(v, "expected_error")? {
        "bits_out_of_range" => blind_index::check_bits(number(v, "bits")?).is_err(),
        "not_utf8" => Normalization::parse(field(v, "normalization")?)
            .ok_or("bad normalization")?
            .apply(&bytes(v, "value")?)
            .is_err(),
        other => return Err(format!("{name}: unknown expected_error {other}")),
    };
    check(refused, || format!("{name}: accepted, must be refused"))
}

fn deterministic_valid(v: &Value) -> Result<CaseOutcome, String> {
    let name = field(v, "name")?;
    let (tenant, context) = (field(v, "tenant_id")?, field(v, "context")?);
    let (aad, pt) = (bytes(v, "aad")?, bytes(v, "plaintext")?);
    let tk = SecretKey::from_slice(&bytes(v, "tenant_key")?).map_err(|_| "bad tenant key")?;
    let key = SivKey::derive(&tk, tenant, context).map_err(|_| "derivation failed")?;
    let ct = siv::seal_deterministic(&key, number(v, "key_version")?, tenant, context, &aad, &pt)
        .map_err(|_| format!("{name}: seal failed"))?;
    let opened = format::parse(&ct)
        .and_then(|p| siv::open_deterministic(&key, &p, tenant, context, &aad))
        .map_err(|_| format!("{name}: open failed"))?;
    check(
        ct == bytes(v, "ciphertext")? && opened.expose_secret() == pt,
        || format!("{name}: ciphertext differs"),
    )
}

fn deterministic_invalid(v: &Value) -> Result<CaseOutcome, String> {
    let name = field(v, "name")?;
    let (tenant, context) = (field(v, "tenant_id")?, field(v, "context")?);
    let (aad, ct) = (bytes(v, "aad")?, bytes(v, "ciphertext")?);
    let keys = v["tenant_keys"].as_array().ok_or("missing tenant_keys")?;
    let opened = format::parse(&ct).ok().and_then(|parsed| {
        let key = keys
            .iter()
            .find(|k| number(k, "version").ok() == Some(parsed.header.key_version))?;
        let tk = SecretKey::from_slice(&bytes(key, "key").ok()?).ok()?;
        let key = SivKey::derive(&tk, tenant, context).ok()?;
        siv::open_deterministic(&key, &parsed, tenant, context, &aad).ok()
    });
    check(opened.is_none(), || {
        format!("{name}: opened, must be refused")
    })
}

type Check = fn(&Value) -> Result<CaseOutcome, String>;

fn run_file(suite: &'static str, json: &str, valid: Check, invalid: Check) -> SuiteReport {
    let mut report = SuiteReport::new(suite);
    let file: Value = match serde_json::from_str(json) {
        Ok(file) => file,
        Err(e) => {
            report.record(CaseOutcome::Failed(format!("cannot parse: {e}")));
            return report;
        }
    };
    for (kind, check) in [("valid", valid), ("invalid", invalid)] {
        for v in file[kind].as_array().map(Vec::as_slice).unwrap_or_default() {
            report.record(check(v).unwrap_or_else(CaseOutcome::Failed));
        }
    }
    report
}

/// Every vector of the two searchable-column vector files.
pub fn vectors() -> Vec<SuiteReport> {
    vec![
        run_file(
            "vectors: blind_index.json",
            BLIND_INDEX_JSON,
            blind_index_valid,
            blind_index_invalid,
        ),
        run_file(
            "vectors: deterministic_value.json",
            DETERMINISTIC_VALUE_JSON,
            deterministic_valid,
            deterministic_invalid,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searchable_self_tests_pass() {
        let mut reports = vec![rfc5297()];
        reports.extend(vectors());
        for r in &reports {
            assert!(r.ok(), "{}: {:?}", r.suite, r.failures);
        }
        assert_eq!(reports[0].passed, 2);
        assert!(reports[1].passed >= 25 && reports[2].passed >= 18);
    }
}
