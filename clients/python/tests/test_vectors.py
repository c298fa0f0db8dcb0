"""vectors/envelope.json, written by the Rust crate, reproduced byte for byte and refused as
recorded by this implementation."""

import io
import json
import unittest
from pathlib import Path

from tenant_kms_client.envelope import (DecryptError, EncryptingWriter, FormatError, Header,
                                        open_envelope, segment_key)

VECTORS = Path(__file__).resolve().parents[3] / "vectors" / "envelope.json"


class EnvelopeVectors(unittest.TestCase):
    def setUp(self):
        self.file = json.loads(VECTORS.read_text())
        self.assertEqual(self.file["schema"], "tenant-kms/v1/vectors/envelope")

    def test_valid_vectors_are_reproduced_exactly_and_open(self):
        self.assertGreaterEqual(len(self.file["valid"]), 6)
        for v in self.file["valid"]:
            with self.subTest(v["name"]):
                header = Header(v["segment_size"], bytes.fromhex(v["salt"]), v["tenant_id"],
                                v["context"], bytes.fromhex(v["wrapped_key"]))
                key = bytes.fromhex(v["data_key"])
                self.assertEqual(header.encode().hex(), v["header"])
                self.assertEqual(segment_key(key, header.encode()).hex(), v["segment_key"])
                out = io.BytesIO()
                writer = EncryptingWriter(out, key, header)
                plaintext = bytes.fromhex(v["plaintext"])
                for at in range(0, len(plaintext), 7):
                    writer.write(plaintext[at:at + 7])
                writer.finish()
                self.assertEqual(out.getvalue().hex(), v["envelope"])
                self.assertEqual(open_envelope(key, bytes.fromhex(v["envelope"])), plaintext)

    def test_invalid_vectors_are_refused_where_recorded(self):
        self.assertGreaterEqual(len(self.file["invalid"]), 18)
        expected = {"format_error": FormatError, "crypto_error": DecryptError}
        for v in self.file["invalid"]:
            with self.subTest(v["name"]):
                with self.assertRaises(expected[v["expected_error"]]):
                    open_envelope(bytes.fromhex(v["data_key"]), bytes.fromhex(v["envelope"]))


if __name__ == "__main__":
    unittest.main()
