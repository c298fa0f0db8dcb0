#!/usr/bin/env python3
"""A second implementation of the tenant-kms v1 wire format, written from docs/FORMAT.md alone.

Uses only the `cryptography` package (HKDF-SHA256, AES-256-GCM, HMAC-SHA256, AES-SIV) and the
standard library's `unicodedata` (for the casefold_trim normalization of blind indexes). For every vector
in vectors/*.json it derives every key and intermediate value itself, produces the exact
bytes (with the vector's nonce) and opens them; every invalid vector must be refused by its own
parser and opener. Prints one line per file and exits non-zero on any mismatch.

    python3 tests/interop/check_vectors.py [VECTOR_DIR]
"""

import json
import struct
import unicodedata
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# FORMAT.md section 2.
FIELD = b"tenant-kms/v1/field"
DATA_KEY = b"tenant-kms/v1/data-key"
TENANT_KEY_WRAP = b"tenant-kms/v1/tenant-key-wrap"
KEY_CHECK = b"tenant-kms/v1/key-check"
AUDIT_KEY_WRAP = b"tenant-kms/v1/audit-key-wrap"
AUDIT_CHAIN = b"tenant-kms/v1/audit-chain"
AAD_FINGERPRINT = b"tenant-kms/v1/aad-fingerprint"

ALGORITHMS = {1: FIELD, 2: DATA_KEY}  # FORMAT.md 4.1
HEADER_LEN, TAG_LEN, NONCE_LEN = 18, 16, 12


class Refused(Exception):
    """The one opaque error (FORMAT.md 4.3)."""


def be32(n):
    return struct.pack(">I", n)


def lp(data):
    return be32(len(data)) + data


def hkdf(ikm, info):
    """HKDF-SHA256, no salt, 32 bytes (FORMAT.md 1)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def master_key_info(label, m):
    return lp(label) + be32(m)


def value_info(label, tenant, context):
    return lp(label) + lp(tenant.encode()) + lp(context.encode())


def additional_data(label, header, tenant, context, aad):
    return lp(label) + header + lp(tenant.encode()) + lp(context.encode()) + lp(aad)


def tenant_wrap_aad(tenant, v, m):
    return lp(TENANT_KEY_WRAP) + lp(tenant.encode()) + be32(v) + be32(m)


def audit_wrap_aad(m):
    return lp(AUDIT_KEY_WRAP) + be32(m)


def seal_value(tenant_key, label, alg, v, nonce, tenant, context, aad, plaintext):
    header = bytes([1, alg]) + be32(v) + nonce
    key = hkdf(tenant_key, value_info(label, tenant, context))
    ad = additional_data(label, header, tenant, context, aad)
    return header + AESGCM(key).encrypt(nonce, plaintext, ad)


def open_value(tenant_keys, alg, tenant, context, aad, ct):
    """FORMAT.md 4.3, steps 1-4; `tenant_keys` maps version -> key."""
    if len(ct) < HEADER_LEN + TAG_LEN or ct[0] != 1 or ct[1] not in ALGORITHMS:
        raise Refused("parse")
    (v,) = struct.unpack(">I", ct[2:6])
    if v == 0 or ct[1] != alg or v not in tenant_keys:
        raise Refused("header")
    header, nonce = ct[:HEADER_LEN], ct[6:HEADER_LEN]
    label = ALGORITHMS[alg]
    key = hkdf(tenant_keys[v], value_info(label, tenant, context))
    try:
        return AESGCM(key).decrypt(nonce, ct[HEADER_LEN:], additional_data(label, header, tenant, context, aad))
    except InvalidTag as e:
        raise Refused("tag") from e


def wrap(wrapping_key, nonce, aad, secret):
    return nonce + AESGCM(wrapping_key).encrypt(nonce, secret, aad)


def unwrap(wrapping_key, aad, wrapped):
    if len(wrapped) != NONCE_LEN + 32 + TAG_LEN:
        raise Refused("length")
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[:NONCE_LEN], wrapped[NONCE_LEN:], aad)
    except InvalidTag as e:
        raise Refused("tag") from e


def hmac_sha256(key, data):
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def h(text):
    return bytes.fromhex(text)


def expect(name, what, got, want):
    if got != want:
        raise AssertionError(f"{name}: {what} differs")


def expect_refused(name, fn):
    try:
        fn()
    except Refused:
        return
    raise AssertionError(f"{name}: accepted, must be refused")


def check_key_check(v):
    mk, m = h(v["master_key"]), v["master_version"]
    for label, info_key, value_key in [
        (KEY_CHECK, "key_check_info", "key_check_value"),
        (TENANT_KEY_WRAP, "tenant_key_wrapping_info", "tenant_key_wrapping_key"),
        (AUDIT_KEY_WRAP, "audit_key_wrapping_info", "audit_key_wrapping_key"),
    ]:
        info = master_key_info(label, m)
        expect(v["name"], info_key, info, h(v[info_key]))
        expect(v["name"], value_key, hkdf(mk, info), h(v[value_key]))


def check_key_check_invalid(v):
    assert v["expected_error"] == "key_check_mismatch"
    kcv = hkdf(h(v["master_key"]), master_key_info(KEY_CHECK, v["master_version"]))
    if kcv == h(v["key_check_value"]):
        raise AssertionError(f"{v['name']}: check value matched")


def check_tenant_wrap(v):
    m, tenant, kv = v["master_version"], v["tenant_id"], v["key_version"]
    wk = hkdf(h(v["master_key"]), master_key_info(TENANT_KEY_WRAP, m))
    aad = tenant_wrap_aad(tenant, kv, m)
    expect(v["name"], "wrapping_key", wk, h(v["wrapping_key"]))
    expect(v["name"], "aad", aad, h(v["aad"]))
    expect(v["name"], "wrapped", wrap(wk, h(v["nonce"]), aad, h(v["tenant_key"])), h(v["wrapped"]))
    expect(v["name"], "unwrapped", unwrap(wk, aad, h(v["wrapped"])), h(v["tenant_key"]))


def check_tenant_wrap_invalid(v):
    assert v["expected_error"] == "crypto_error"
    m = v["master_version"]
    wk = hkdf(h(v["master_key"]), master_key_info(TENANT_KEY_WRAP, m))
    aad = tenant_wrap_aad(v["tenant_id"], v["key_version"], m)
    expect_refused(v["name"], lambda: unwrap(wk, aad, h(v["wrapped"])))


def check_audit_wrap(v):
    m = v["master_version"]
    wk = hkdf(h(v["master_key"]), master_key_info(AUDIT_KEY_WRAP, m))
    aad = audit_wrap_aad(m)
    expect(v["name"], "wrapping_key", wk, h(v["wrapping_key"]))
    expect(v["name"], "aad", aad, h(v["aad"]))
    expect(v["name"], "wrapped", wrap(wk, h(v["nonce"]), aad, h(v["audit_key"])), h(v["wrapped"]))
    audit = unwrap(wk, aad, h(v["wrapped"]))
    expect(v["name"], "unwrapped", audit, h(v["audit_key"]))
    # FORMAT.md 6: chain and fingerprint keys take the bare label as info.
    expect(v["name"], "chain_key", hkdf(audit, AUDIT_CHAIN), h(v["chain_key"]))
    fpk = hkdf(audit, AAD_FINGERPRINT)
    expect(v["name"], "fingerprint_key", fpk, h(v["fingerprint_key"]))
    fingerprint = hmac_sha256(fpk, h(v["example_aad"]))[:16].hex() if v["example_aad"] else ""
    expect(v["name"], "example_aad_fingerprint", fingerprint, v["example_aad_fingerprint"])


def check_audit_wrap_invalid(v):
    assert v["expected_error"] == "crypto_error"
    m = v["master_version"]
    wk = hkdf(h(v["master_key"]), master_key_info(AUDIT_KEY_WRAP, m))
    expect_refused(v["name"], lambda: unwrap(wk, audit_wrap_aad(m), h(v["wrapped"])))


def value_checks(alg):
    label = ALGORITHMS[alg]

    def valid(v):
        tk, tenant, context, aad = h(v["tenant_key"]), v["tenant_id"], v["context"], h(v["aad"])
        nonce, kv = h(v["nonce"]), v["key_version"]
        info = value_info(label, tenant, context)
        header = bytes([1, alg]) + be32(kv) + nonce
        expect(v["name"], "info", info, h(v["info"]))
        expect(v["name"], "value_key", hkdf(tk, info), h(v["value_key"]))
        expect(v["name"], "header", header, h(v["header"]))
        expect(v["name"], "additional_data", additional_data(label, header, tenant, context, aad),
               h(v["additional_data"]))
        ct = seal_value(tk, label, alg, kv, nonce, tenant, context, aad, h(v["plaintext"]))
        expect(v["name"], "ciphertext", ct, h(v["ciphertext"]))
        opened = open_value({kv: tk}, alg, tenant, context, aad, h(v["ciphertext"]))
        expect(v["name"], "plaintext", opened, h(v["plaintext"]))

    def invalid(v):
        assert v["expected_error"] == "crypto_error"
        keys = {k["version"]: h(k["key"]) for k in v["tenant_keys"]}
        expect_refused(v["name"], lambda: open_value(keys, alg, v["tenant_id"], v["context"],
                                                     h(v["aad"]), h(v["ciphertext"])))

    return valid, invalid


# FORMAT.md "Blind indexes" and "Deterministic values" (searchable columns).
BLIND_INDEX = b"tenant-kms/v1/blind-index"
DETERMINISTIC = b"tenant-kms/v1/deterministic"

# The characters with the Unicode White_Space property (PropList.txt), which casefold_trim
# removes at both ends. Spelled out: Python's str.strip() uses a different set.
WHITE_SPACE = "".join(map(chr, [
    0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
    0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
]))


class NotUtf8(Exception):
    """casefold_trim refuses bytes that are not UTF-8."""


def normalize(name, value):
    if name == "exact":
        return value
    if name != "casefold_trim":
        raise ValueError(name)
    try:
        text = value.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise NotUtf8() from e
    text = text.strip(WHITE_SPACE)
    folded = unicodedata.normalize("NFD", text).casefold()
    return unicodedata.normalize("NFC", folded).encode("utf-8")


def truncate_bits(mac, bits):
    if not 8 <= bits <= 256:
        raise ValueError("bits out of range")
    out = bytearray(mac[: (bits + 7) // 8])
    if bits % 8:
        out[-1] &= (0xFF << (8 - bits % 8)) & 0xFF
    return bytes(out)


def check_blind_index(v):
    tk, tenant, index_name = h(v["tenant_key"]), v["tenant_id"], v["index_name"]
    info = lp(BLIND_INDEX) + lp(tenant.encode()) + lp(index_name.encode())
    expect(v["name"], "info", info, h(v["info"]))
    ik = hkdf(tk, info)
    expect(v["name"], "index_key", ik, h(v["index_key"]))
    normalized = normalize(v["normalization"], h(v["value"]))
    expect(v["name"], "normalized", normalized, h(v["normalized"]))
    mac = hmac_sha256(ik, normalized)
    expect(v["name"], "mac", mac, h(v["mac"]))
    expect(v["name"], "index", truncate_bits(mac, v["bits"]), h(v["index"]))


def check_blind_index_invalid(v):
    if v["expected_error"] == "bits_out_of_range":
        try:
            truncate_bits(bytes(32), v["bits"])
        except ValueError:
            return
    elif v["expected_error"] == "not_utf8":
        try:
            normalize(v["normalization"], h(v["value"]))
        except NotUtf8:
            return
    raise AssertionError(f"{v['name']}: accepted, must be refused")


def deterministic_key(tenant_key, tenant, context):
    info = value_info(DETERMINISTIC, tenant, context)
    return info, HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(tenant_key)


def open_deterministic(tenant_keys, tenant, context, aad, ct):
    """FORMAT.md "Deterministic values": parse, then AES-SIV with the one AD component."""
    if len(ct) < HEADER_LEN + TAG_LEN or ct[0] != 1 or ct[1] != 3 or ct[6:HEADER_LEN] != bytes(12):
        raise Refused("parse")
    (v,) = struct.unpack(">I", ct[2:6])
    if v == 0 or v not in tenant_keys:
        raise Refused("header")
    _, key = deterministic_key(tenant_keys[v], tenant, context)
    ad = additional_data(DETERMINISTIC, ct[:HEADER_LEN], tenant, context, aad)
    try:
        return AESSIV(key).decrypt(ct[HEADER_LEN:], [ad])
    except InvalidTag as e:
        raise Refused("tag") from e


def check_deterministic(v):
    tk, tenant, context, aad = h(v["tenant_key"]), v["tenant_id"], v["context"], h(v["aad"])
    kv = v["key_version"]
    info, key = deterministic_key(tk, tenant, context)
    expect(v["name"], "info", info, h(v["info"]))
    expect(v["name"], "deterministic_key", key, h(v["deterministic_key"]))
    header = bytes([1, 3]) + be32(kv) + bytes(12)
    expect(v["name"], "header", header, h(v["header"]))
    ad = additional_data(DETERMINISTIC, header, tenant, context, aad)
    expect(v["name"], "additional_data", ad, h(v["additional_data"]))
    ct = header + AESSIV(key).encrypt(h(v["plaintext"]), [ad])
    expect(v["name"], "ciphertext", ct, h(v["ciphertext"]))
    opened = open_deterministic({kv: tk}, tenant, context, aad, h(v["ciphertext"]))
    expect(v["name"], "plaintext", opened, h(v["plaintext"]))


def check_deterministic_invalid(v):
    assert v["expected_error"] == "crypto_error"
    keys = {k["version"]: h(k["key"]) for k in v["tenant_keys"]}
    expect_refused(v["name"], lambda: open_deterministic(keys, v["tenant_id"], v["context"],
                                                         h(v["aad"]), h(v["ciphertext"])))


FILES = {
    "key_check.json": ("tenant-kms/v1/vectors/key-check", check_key_check, check_key_check_invalid),
    "tenant_key_wrap.json": ("tenant-kms/v1/vectors/tenant-key-wrap", check_tenant_wrap,
                             check_tenant_wrap_invalid),
    "audit_key_wrap.json": ("tenant-kms/v1/vectors/audit-key-wrap", check_audit_wrap,
                            check_audit_wrap_invalid),
    "field_value.json": ("tenant-kms/v1/vectors/field-value", *value_checks(1)),
    "data_key.json": ("tenant-kms/v1/vectors/data-key", *value_checks(2)),
    "blind_index.json": ("tenant-kms/v1/vectors/blind-index", check_blind_index,
                         check_blind_index_invalid),
    "deterministic_value.json": ("tenant-kms/v1/vectors/deterministic-value", check_deterministic,
                                 check_deterministic_invalid),
}


def main():
    vector_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "vectors"
    passed, failed = 0, 0
    for name, (schema, valid, invalid) in FILES.items():
        data = json.loads((vector_dir / name).read_text())
        if data["schema"] != schema or not data["valid"] or not data["invalid"]:
            print(f"interop: {name}: unexpected schema or empty file")
            failed += 1
            continue
        counts = [0, 0]
        for kind, check in ((0, valid), (1, invalid)):
            for vector in data["valid" if kind == 0 else "invalid"]:
                try:
                    check(vector)
                    counts[kind] += 1
                    passed += 1
                except (AssertionError, Refused, KeyError, ValueError) as e:
                    print(f"interop: FAILED {name}: {vector.get('name')}: {e!r}")
                    failed += 1
        print(f"interop: {name}: {counts[0]} valid reproduced and opened, {counts[1]} invalid refused")
    print(f"interop: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
