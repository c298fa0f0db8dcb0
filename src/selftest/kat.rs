//! Known-answer tests with their sources: AES-256-GCM from the GCM specification (McGrew and
//! Viega, "The Galois/Counter Mode of Operation", test cases 13, 14 and 16, also in NIST's
//! GCM validation data), HKDF-SHA256 from RFC 5869 appendix A.1–A.3, and the wire format
//! from our own vector files.

use super::vectors::{self, Embedded};
use super::{CaseOutcome, SuiteReport};
use crate::crypto::aead::{AeadKey, NONCE_LEN, TAG_LEN};
use crate::crypto::envelope::Purpose;
use crate::crypto::kdf::{self, MAX_OUTPUT_LEN};

/// One AES-GCM known answer, hex-encoded.
struct GcmKat {
    name: &'static str,
    key: &'static str,
    nonce: &'static str,
    aad: &'static str,
    plaintext: &'static str,
    ciphertext_and_tag: &'static str,
}

/// GCM spec test cases 13, 14 and 16 (AES-256, 96-bit IV, 128-bit tag).
const GCM_KATS: &[GcmKat] = &[
    GcmKat {
        name: "GCM spec test case 13 (empty plaintext)",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        nonce: "000000000000000000000000",
        aad: "",
        plaintext: "",
        ciphertext_and_tag: "530f8afbc74536b9a963b4f1c4cb738b",
    },
    GcmKat {
        name: "GCM spec test case 14 (one block)",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        nonce: "000000000000000000000000",
        aad: "",
        plaintext: "00000000000000000000000000000000",
        ciphertext_and_tag: "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
    },
    GcmKat {
        name: "GCM spec test case 16 (AAD, partial block)",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        nonce: "cafebabefacedbaddecaf888",
        aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        plaintext: "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                    1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        ciphertext_and_tag: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
                             76fc6ece0f4e1768cddf8853bb2d551b",
    },
];

/// One HKDF-SHA256 known answer, hex-encoded.
struct HkdfKat {
    name: &'static str,
    ikm: &'static str,
    salt: &'static str,
    info: &'static str,
    okm: &'static str,
}

/// RFC 5869 appendix A.1–A.3 (the SHA-256 cases).
const RFC5869: &[HkdfKat] = &[
    HkdfKat {
        name: "RFC 5869 A.1 (basic)",
        ikm: "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        salt: "000102030405060708090a0b0c",
        info: "f0f1f2f3f4f5f6f7f8f9",
        okm: "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    },
    HkdfKat {
        name: "RFC 5869 A.2 (longer inputs and outputs)",
        ikm: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
              202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\
              404142434445464748494a4b4c4d4e4f",
        salt: "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f\
               808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\
               a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
        info: "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf\
               d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef\
               f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        okm: "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
              59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
              cc30c58179ec3e87c14c01d5c1f3434f1d87",
    },
    HkdfKat {
        name: "RFC 5869 A.3 (zero-length salt and info)",
        ikm: "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        salt: "",
        info: "",
        okm: "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    },
];

fn unhex(name: &str, text: &str) -> Result<Vec<u8>, String> {
    hex::decode(text).map_err(|_| format!("{name}: bad hex in the embedded data"))
}

/// Runs one AES-GCM case through [`AeadKey`] and says how it ended.
///
/// A case outside tenant-kms's parameters (key not 256 bits, nonce not 96 bits, tag not 128
/// bits) must be refused by the API: `from_slice` refuses the key, `open_in_place` the nonce
/// or the short tag (`seal_in_place` takes a `[u8; 12]` nonce, so it cannot be given another
/// size at all). A case inside them must, when `valid`, seal to exactly `ct ‖ tag` and open
/// back to the plaintext, and when not `valid`, fail to open.
#[allow(clippy::too_many_arguments)]
pub fn aes_gcm_case(
    name: &str,
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    ciphertext_and_tag: &[u8],
    tag_len: usize,
    valid: bool,
) -> CaseOutcome {
    let fail = |why: &str| CaseOutcome::Failed(format!("{name}: {why}"));
    let aead = match AeadKey::from_slice(key) {
        Ok(aead) if key.len() == 32 => aead,
        Ok(_) => return fail("a key that is not 256 bits was accepted"),
        Err(_) if key.len() != 32 => return CaseOutcome::Refused,
        Err(_) => return fail("a 256-bit key was refused"),
    };
    if nonce.len() != NONCE_LEN || tag_len != TAG_LEN {
        let mut buf = ciphertext_and_tag.to_vec();
        return match aead.open_in_place(nonce, aad, &mut buf) {
            Err(_) => CaseOutcome::Refused,
            Ok(_) => fail("opened with a nonce or tag size tenant-kms does not use"),
        };
    }
    let Ok(nonce) = <[u8; NONCE_LEN]>::try_from(nonce) else {
        return fail("nonce length check");
    };
    let mut opened = ciphertext_and_tag.to_vec();
    let open = aead
        .open_in_place(&nonce, aad, &mut opened)
        .map(|p| p.to_vec());
    if !valid {
        return match open {
            Err(_) => CaseOutcome::Passed,
            Ok(_) => fail("an invalid ciphertext opened"),
        };
    }
    let mut sealed = plaintext.to_vec();
    if aead.seal_in_place(&nonce, aad, &mut sealed).is_err() {
        return fail("seal failed");
    }
    if sealed != ciphertext_and_tag {
        return fail("ct || tag differs");
    }
    match open {
        Ok(p) if p == plaintext => CaseOutcome::Passed,
        Ok(_) => fail("opened to a different plaintext"),
        Err(_) => fail("a valid ciphertext did not open"),
    }
}

/// Runs one HKDF-SHA256 case through [`kdf::hkdf_sha256`]: a valid case must give exactly
/// `okm`; an invalid one (an over-long output) must be an error.
pub fn hkdf_case(
    name: &str,
    ikm: &[u8],
    salt: &[u8],
    info: &[u8],
    size: usize,
    okm: &[u8],
    valid: bool,
) -> CaseOutcome {
    let mut out = vec![0u8; size];
    match (kdf::hkdf_sha256(Some(salt), ikm, info, &mut out), valid) {
        (Ok(()), true) if out == okm => CaseOutcome::Passed,
        (Ok(()), true) => CaseOutcome::Failed(format!("{name}: okm differs")),
        (Err(_), true) => CaseOutcome::Failed(format!("{name}: refused a valid request")),
        (Err(_), false) => CaseOutcome::Passed,
        (Ok(()), false) => CaseOutcome::Failed(format!("{name}: accepted an invalid request")),
    }
}

fn gcm_kat(kat: &GcmKat) -> Result<CaseOutcome, String> {
    let ct = unhex(kat.name, kat.ciphertext_and_tag)?;
    let outcome = aes_gcm_case(
        kat.name,
        &unhex(kat.name, kat.key)?,
        &unhex(kat.name, kat.nonce)?,
        &unhex(kat.name, kat.aad)?,
        &unhex(kat.name, kat.plaintext)?,
        &ct,
        TAG_LEN,
        true,
    );
    if outcome != CaseOutcome::Passed {
        return Ok(outcome);
    }
    // The same case with its last tag bit flipped must fail.
    let mut tampered = ct;
    if let Some(last) = tampered.last_mut() {
        *last ^= 1;
    }
    Ok(aes_gcm_case(
        kat.name,
        &unhex(kat.name, kat.key)?,
        &unhex(kat.name, kat.nonce)?,
        &unhex(kat.name, kat.aad)?,
        &[],
        &tampered,
        TAG_LEN,
        false,
    ))
}

/// Power-on AES-256-GCM: GCM spec test cases 13, 14, 16, each sealed, opened and (with a
/// flipped tag bit) refused.
pub fn aes_gcm_power_on() -> SuiteReport {
    let mut report = SuiteReport::new("power-on: AES-256-GCM KAT");
    for kat in GCM_KATS {
        report.record(gcm_kat(kat).unwrap_or_else(CaseOutcome::Failed));
    }
    report
}

fn hkdf_kat(kat: &HkdfKat) -> Result<CaseOutcome, String> {
    let okm = unhex(kat.name, kat.okm)?;
    Ok(hkdf_case(
        kat.name,
        &unhex(kat.name, kat.ikm)?,
        &unhex(kat.name, kat.salt)?,
        &unhex(kat.name, kat.info)?,
        okm.len(),
        &okm,
        true,
    ))
}

/// Power-on HKDF-SHA256: RFC 5869 A.1.
pub fn hkdf_power_on() -> SuiteReport {
    let mut report = SuiteReport::new("power-on: HKDF-SHA256 KAT");
    for kat in &RFC5869[..1] {
        report.record(hkdf_kat(kat).unwrap_or_else(CaseOutcome::Failed));
    }
    report
}

/// RFC 5869 A.1–A.3, and an output one byte longer than HKDF-SHA256 allows, which must be an
/// error rather than a truncated key.
pub fn rfc5869() -> SuiteReport {
    let mut report = SuiteReport::new("RFC 5869 A.1-A.3 HKDF-SHA256");
    for kat in RFC5869 {
        report.record(hkdf_kat(kat).unwrap_or_else(CaseOutcome::Failed));
    }
    report.record(hkdf_case(
        "output of 255*32+1 bytes",
        &[0x0b; 22],
        &[],
        &[],
        MAX_OUTPUT_LEN + 1,
        &[],
        false,
    ));
    report
}

/// Power-on wire format: the first valid vector of each of our vector files (key check value,
/// wrapped tenant key, wrapped audit key, field value, wrapped data key: exact bytes and the
/// open) and the first invalid field-value vector (refused).
pub fn wire_format_power_on() -> SuiteReport {
    let mut report = SuiteReport::new("power-on: wire format KAT");
    let embedded = match Embedded::load() {
        Ok(e) => e,
        Err(e) => {
            report.record(CaseOutcome::Failed(format!(
                "embedded vectors do not parse: {e}"
            )));
            return report;
        }
    };
    let mut record = |name: Option<&str>, result: Result<(), String>| {
        report.record(match (name, result) {
            (None, _) => CaseOutcome::Failed("an embedded vector file is empty".into()),
            (Some(_), Ok(())) => CaseOutcome::Passed,
            (Some(name), Err(why)) => CaseOutcome::Failed(format!("{name}: {why}")),
        });
    };
    let key_check = embedded.key_check.valid.first();
    record(
        key_check.map(|v| v.name.as_str()),
        key_check.map_or(Ok(()), vectors::check_key_check),
    );
    let wrap = embedded.tenant_key_wrap.valid.first();
    record(
        wrap.map(|v| v.name.as_str()),
        wrap.map_or(Ok(()), vectors::check_tenant_key_wrap),
    );
    let audit = embedded.audit_key_wrap.valid.first();
    record(
        audit.map(|v| v.name.as_str()),
        audit.map_or(Ok(()), vectors::check_audit_key_wrap),
    );
    let field = embedded.field_value.valid.first();
    record(
        field.map(|v| v.name.as_str()),
        field.map_or(Ok(()), |v| vectors::check_value(Purpose::Field, v)),
    );
    let data_key = embedded.data_key.valid.first();
    record(
        data_key.map(|v| v.name.as_str()),
        data_key.map_or(Ok(()), |v| vectors::check_value(Purpose::DataKey, v)),
    );
    let invalid = embedded.field_value.invalid.first();
    record(
        invalid.map(|v| v.name.as_str()),
        invalid.map_or(Ok(()), |v| vectors::check_value_invalid(Purpose::Field, v)),
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcm_kats_pass() {
        let report = aes_gcm_power_on();
        assert_eq!(report.passed, GCM_KATS.len(), "{:?}", report.failures);
    }

    #[test]
    fn a_wrong_known_answer_fails() {
        let kat = &GCM_KATS[2];
        let mut ct = unhex("x", kat.ciphertext_and_tag).unwrap();
        ct[0] ^= 0x80;
        let outcome = aes_gcm_case(
            "corrupted",
            &unhex("x", kat.key).unwrap(),
            &unhex("x", kat.nonce).unwrap(),
            &unhex("x", kat.aad).unwrap(),
            &unhex("x", kat.plaintext).unwrap(),
            &ct,
            TAG_LEN,
            true,
        );
        assert!(matches!(outcome, CaseOutcome::Failed(_)));
        let outcome = hkdf_case("corrupted", b"k", b"", b"", 3, &[0, 0, 0], true);
        assert!(matches!(outcome, CaseOutcome::Failed(_)));
    }

    #[test]
    fn other_sizes_are_refused() {
        let outcome = aes_gcm_case("k128", &[0; 16], &[0; 12], b"", b"", &[0; 16], 16, true);
        assert_eq!(outcome, CaseOutcome::Refused);
        let outcome = aes_gcm_case("n8", &[0; 32], &[0; 8], b"", b"", &[0; 16], 16, true);
        assert_eq!(outcome, CaseOutcome::Refused);
        let outcome = aes_gcm_case("t12", &[0; 32], &[0; 12], b"", b"", &[0; 12], 12, true);
        assert_eq!(outcome, CaseOutcome::Refused);
    }

    #[test]
    fn rfc5869_passes() {
        let report = rfc5869();
        assert_eq!(report.passed, 4, "{:?}", report.failures);
    }
}
