//! `vectors/envelope.json`: this implementation's known answers for docs/ENVELOPE.md, and the
//! malformed envelopes every implementation must refuse. The Python package checks the same
//! file (clients/python/tests/test_vectors.py).
//!
//! The file is generated here from fixed inputs and must equal what is committed; after a
//! deliberate change, `TENANT_KMS_WRITE_VECTORS=1 cargo test --release -p tenant-kms-client
//! --lib vectors` rewrites it (and a format change needs a new version, never an edit).

use std::io::{Read, Write};

use serde_json::{Value, json};

use super::format::{self, DataKey, Header, SALT_LEN, SegmentKey, TAG_LEN};
use super::stream::{DecryptingReader, EncryptingWriter, read_header};
use crate::error::Error;

const SCHEMA: &str = "tenant-kms/v1/vectors/envelope";

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vectors/envelope.json")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Case {
    name: &'static str,
    segment_size: u32,
    plaintext_len: usize,
}

const VALID: &[Case] = &[
    Case {
        name: "empty",
        segment_size: 16,
        plaintext_len: 0,
    },
    Case {
        name: "one-partial-segment",
        segment_size: 16,
        plaintext_len: 15,
    },
    Case {
        name: "one-full-segment",
        segment_size: 16,
        plaintext_len: 16,
    },
    Case {
        name: "three-segments-last-partial",
        segment_size: 16,
        plaintext_len: 40,
    },
    Case {
        name: "three-full-segments",
        segment_size: 16,
        plaintext_len: 48,
    },
    Case {
        name: "default-segment-size",
        segment_size: format::DEFAULT_SEGMENT_SIZE,
        plaintext_len: 1000,
    },
];

fn data_key() -> DataKey {
    DataKey::from_slice(&pattern(32, 1)).unwrap()
}

fn header(segment_size: u32) -> Header {
    Header {
        segment_size,
        salt: pattern(SALT_LEN, 2).try_into().unwrap(),
        tenant_id: "acme".into(),
        context: "crm.attachments".into(),
        // Opaque to the envelope format; a real one is a v1 wrapped data key (FORMAT.md).
        wrapped_key: pattern(62, 3),
    }
}

fn seal(header: &Header, plaintext: &[u8]) -> Vec<u8> {
    let mut writer = EncryptingWriter::new(Vec::new(), &data_key(), header, None).unwrap();
    writer.write_all(plaintext).unwrap();
    writer.finish().unwrap()
}

/// Seals explicit segments with explicit last flags (for the non-canonical cases).
fn seal_segments(header: &Header, segments: &[(&[u8], bool)]) -> Vec<u8> {
    let bytes = header.encode().unwrap();
    let key = SegmentKey::derive(&data_key(), &bytes).unwrap();
    let mut out = bytes;
    for (index, (plain, last)) in segments.iter().enumerate() {
        let mut segment = plain.to_vec();
        key.seal(index as u64, *last, &mut segment).unwrap();
        out.extend_from_slice(&segment);
    }
    out
}

/// Opens `envelope` with the format alone (no tenant or context check).
fn open(envelope: &[u8], key: &DataKey) -> Result<Vec<u8>, Error> {
    let mut input = envelope;
    let (header, bytes) = read_header(&mut input)?;
    let mut reader = DecryptingReader::new(input, key, &header, &bytes)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out)?;
    Ok(out)
}

fn generate() -> Value {
    let mut valid = Vec::new();
    for case in VALID {
        let header = header(case.segment_size);
        let plaintext = pattern(case.plaintext_len, 4);
        let header_bytes = header.encode().unwrap();
        let segment_key = format::segment_key_bytes(&data_key(), &header_bytes).unwrap();
        valid.push(json!({
            "name": case.name,
            "data_key": hex::encode(data_key().expose()),
            "segment_size": case.segment_size,
            "salt": hex::encode(header.salt),
            "tenant_id": header.tenant_id,
            "context": header.context,
            "wrapped_key": hex::encode(&header.wrapped_key),
            "plaintext": hex::encode(&plaintext),
            "header": hex::encode(&header_bytes),
            "segment_key": hex::encode(segment_key.as_ref()),
            "envelope": hex::encode(seal(&header, &plaintext)),
        }));
    }

    let h16 = header(16);
    let head = h16.encode().unwrap().len();
    let seg = 16 + TAG_LEN;
    let base = seal(&h16, &pattern(48, 4));
    let mut invalid: Vec<(&str, &str, Vec<u8>, &str)> = Vec::new();
    let mut push = |name, why, bytes, error| invalid.push((name, why, bytes, error));
    push(
        "last-segment-dropped",
        "the segment before it is not marked last",
        base[..head + 2 * seg].to_vec(),
        "crypto_error",
    );
    push(
        "cut-inside-segment",
        "the last segment is shorter than its tag says",
        base[..base.len() - 1].to_vec(),
        "crypto_error",
    );
    let mut swapped = base.clone();
    swapped[head..head + seg].copy_from_slice(&base[head + seg..head + 2 * seg]);
    swapped[head + seg..head + 2 * seg].copy_from_slice(&base[head..head + seg]);
    push(
        "segments-swapped",
        "segment 0 and 1 exchanged: the index is in the nonce",
        swapped,
        "crypto_error",
    );
    let mut appended = base.clone();
    appended.extend_from_slice(&base[base.len() - seg..]);
    push(
        "segment-appended",
        "a copy of the last segment after it",
        appended,
        "crypto_error",
    );
    let mut trailing = base.clone();
    trailing.push(0);
    push(
        "trailing-byte",
        "one byte after the last segment",
        trailing,
        "crypto_error",
    );
    let mut other_salt = h16.clone();
    other_salt.salt[0] ^= 1;
    let mut spliced = other_salt.encode().unwrap();
    spliced.extend_from_slice(&base[head..]);
    push(
        "salt-changed",
        "another salt derives another key",
        spliced,
        "crypto_error",
    );
    let mut other_context = h16.clone();
    other_context.context = "crm.attachmentz".into();
    let mut spliced = other_context.encode().unwrap();
    spliced.extend_from_slice(&base[head..]);
    push(
        "context-changed",
        "the header is in the key derivation",
        spliced,
        "crypto_error",
    );
    let mut other_size = h16.clone();
    other_size.segment_size = 24;
    let mut spliced = other_size.encode().unwrap();
    spliced.extend_from_slice(&base[head..]);
    push(
        "segment-size-changed",
        "segments are cut elsewhere and the key differs",
        spliced,
        "crypto_error",
    );
    let other_message = seal(&other_salt, &pattern(48, 4));
    let mut spliced = base.clone();
    spliced[head + seg..head + 2 * seg].copy_from_slice(&other_message[head + seg..head + 2 * seg]);
    push(
        "segment-from-another-message",
        "segment 1 of a message with another salt",
        spliced,
        "crypto_error",
    );
    let mut flipped = base.clone();
    flipped[head + seg - 1] ^= 0x80;
    push(
        "tag-bit-flipped",
        "segment 0's tag",
        flipped,
        "crypto_error",
    );
    let block = pattern(16, 4);
    let empty: &[u8] = &[];
    push(
        "empty-last-after-full",
        "a second encoding of a 16-byte message: an empty last segment after a full one",
        seal_segments(&h16, &[(block.as_slice(), false), (empty, true)]),
        "crypto_error",
    );
    push(
        "first-of-two-marked-last",
        "segment 0 sealed as the last one, then another segment",
        seal_segments(&h16, &[(block.as_slice(), true), (&block[..4], true)]),
        "crypto_error",
    );
    push(
        "last-not-marked",
        "a single segment not sealed as the last one",
        seal_segments(&h16, &[(&block[..4], false)]),
        "crypto_error",
    );
    push(
        "header-only",
        "no segment at all (not even an empty last one)",
        base[..head].to_vec(),
        "crypto_error",
    );
    push(
        "header-cut",
        "the input ends inside the header",
        base[..head - 1].to_vec(),
        "format_error",
    );
    let mut magic = base.clone();
    magic[0] = b'T';
    push("wrong-magic", "not an envelope", magic, "format_error");
    let mut version = base.clone();
    version[8] = 2;
    push(
        "unknown-version",
        "version 2 is not defined",
        version,
        "format_error",
    );
    let mut small = base.clone();
    small[9..13].copy_from_slice(&15u32.to_be_bytes());
    push("segment-size-too-small", "below 16", small, "format_error");
    let mut large = base.clone();
    large[9..13].copy_from_slice(&((16u32 << 20) + 1).to_be_bytes());
    push(
        "segment-size-too-large",
        "above 16 MiB",
        large,
        "format_error",
    );
    let mut empty_field = h16.encode().unwrap();
    let tenant_len_at = 8 + 1 + 4 + SALT_LEN;
    empty_field.truncate(tenant_len_at);
    empty_field.extend_from_slice(&[0, 0]);
    empty_field.extend_from_slice(&base[tenant_len_at + 2 + 4..]);
    push(
        "empty-tenant",
        "a header field of length 0",
        empty_field,
        "format_error",
    );

    let invalid: Vec<Value> = invalid
        .into_iter()
        .map(|(name, why, bytes, error)| {
            json!({
                "name": name,
                "alteration": why,
                "data_key": hex::encode(data_key().expose()),
                "envelope": hex::encode(bytes),
                "expected_error": error,
            })
        })
        .collect();
    json!({
        "schema": SCHEMA,
        "description": "Envelope format v1 (docs/ENVELOPE.md). valid: from the inputs, derive header, segment_key and envelope exactly, and open envelope back to plaintext. invalid: opening with data_key must fail; expected_error says where: 'format_error' (the header is refused before any key is used) or 'crypto_error' (a segment does not open, or the stream is truncated or extended: one opaque error). Generated by: TENANT_KMS_WRITE_VECTORS=1 cargo test --release -p tenant-kms-client --lib vectors",
        "valid": valid,
        "invalid": invalid,
    })
}

#[test]
fn envelope_vectors_match_the_committed_file_and_open_as_recorded() {
    let generated = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
    if std::env::var_os("TENANT_KMS_WRITE_VECTORS").is_some() {
        std::fs::write(path(), &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path()).expect("vectors/envelope.json");
    assert!(
        committed == generated,
        "vectors/envelope.json differs from what this code produces"
    );
    let file: Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(file["schema"], SCHEMA);
    let valid = file["valid"].as_array().unwrap();
    assert_eq!(valid.len(), VALID.len());
    for v in valid {
        let key =
            DataKey::from_slice(&hex::decode(v["data_key"].as_str().unwrap()).unwrap()).unwrap();
        let envelope = hex::decode(v["envelope"].as_str().unwrap()).unwrap();
        let plaintext = hex::decode(v["plaintext"].as_str().unwrap()).unwrap();
        assert_eq!(open(&envelope, &key).unwrap(), plaintext, "{}", v["name"]);
    }
    let invalid = file["invalid"].as_array().unwrap();
    assert!(invalid.len() >= 18);
    for v in invalid {
        let key =
            DataKey::from_slice(&hex::decode(v["data_key"].as_str().unwrap()).unwrap()).unwrap();
        let envelope = hex::decode(v["envelope"].as_str().unwrap()).unwrap();
        let outcome = match open(&envelope, &key) {
            Ok(_) => "opened",
            Err(Error::Format(_)) => "format_error",
            Err(Error::Decrypt) => "crypto_error",
            Err(other) => panic!("{}: unexpected {other}", v["name"]),
        };
        assert_eq!(
            outcome,
            v["expected_error"].as_str().unwrap(),
            "{}",
            v["name"]
        );
    }
}

#[test]
fn a_wrong_data_key_does_not_open_a_valid_vector() {
    let envelope = seal(&header(16), &pattern(40, 4));
    let wrong = DataKey::from_slice(&[0; 32]).unwrap();
    assert!(matches!(open(&envelope, &wrong), Err(Error::Decrypt)));
}
