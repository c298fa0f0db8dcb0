"""The envelope stream, the data-key cache and the retry policy, without a server."""

import io
import os
import unittest

import grpc

from tenant_kms_client.envelope import (TAG_LEN, CachePolicy, DataKeyCache, DecryptError,
                                        DecryptingReader, EncryptingWriter, FormatError, Header,
                                        open_envelope, read_header)
from tenant_kms_client.retry import RetryPolicy

KEY = bytes(range(32))


def header(size=16):
    return Header(size, os.urandom(32), "acme", "crm.files", b"\xab" * 40)


def seal(plaintext, size=16, length=None):
    out = io.BytesIO()
    writer = EncryptingWriter(out, KEY, header(size), length)
    writer.write(plaintext)
    writer.finish()
    return out.getvalue()


class Stream(unittest.TestCase):
    def test_round_trips_at_and_around_segment_boundaries(self):
        head = len(header().encode())
        for n in (0, 1, 15, 16, 17, 32, 33, 100):
            data = os.urandom(n)
            sealed = seal(data)
            segments = max(1, (n + 15) // 16)
            self.assertEqual(len(sealed), head + n + segments * TAG_LEN, n)
            self.assertEqual(open_envelope(KEY, sealed), data, n)

    def test_streaming_reads_return_only_authenticated_segments(self):
        sealed = seal(b"x" * 40)
        stream = io.BytesIO(sealed[:-1])
        h, raw = read_header(stream)
        reader = DecryptingReader(stream, KEY, h, raw)
        self.assertEqual(reader.read(16), b"x" * 16)
        with self.assertRaises(DecryptError):
            reader.read()

    def test_declared_lengths_are_enforced(self):
        with self.assertRaises(FormatError):
            seal(b"12345", length=4)
        out = io.BytesIO()
        writer = EncryptingWriter(out, KEY, header(), 4)
        writer.write(b"123")
        with self.assertRaises(FormatError):
            writer.finish()


class Cache(unittest.TestCase):
    def setUp(self):
        self.now = 0.0
        self.cache = DataKeyCache(CachePolicy(max_age=60, max_messages=3, max_bytes=100,
                                              capacity=2), clock=lambda: self.now)

    def test_messages_bytes_age_and_unknown_lengths(self):
        c = self.cache
        self.assertIsNone(c.encryption_key("t", "c", 1))
        c.insert_encryption_key("t", "c", b"k" * 32, b"w", 10)
        self.assertIsNone(c.encryption_key("t", "c", None), "unknown length")
        self.assertEqual(c.encryption_key("t", "c", 10), (b"k" * 32, b"w"))
        self.assertIsNotNone(c.encryption_key("t", "c", 10))
        self.assertIsNone(c.encryption_key("t", "c", 10), "fourth message")
        c.insert_encryption_key("t", "c", b"k" * 32, b"w", 60)
        self.assertIsNone(c.encryption_key("t", "c", 41), "101 bytes")
        c.insert_decryption_key("t", "c", b"w", b"k" * 32)
        self.assertIsNone(c.decryption_key("t", "d", b"w"))
        self.now = 59.9
        self.assertEqual(c.decryption_key("t", "c", b"w"), b"k" * 32)
        self.now = 60
        self.assertIsNone(c.decryption_key("t", "c", b"w"), "aged out")

    def test_capacity_evicts_the_oldest(self):
        for i, ctx in enumerate("abc"):
            self.now = i
            self.cache.insert_encryption_key("t", ctx, b"k" * 32, b"w", 1)
        self.assertIsNone(self.cache.encryption_key("t", "a", 1))
        self.assertIsNotNone(self.cache.encryption_key("t", "c", 1))


class FakeError(grpc.RpcError):
    def __init__(self, code, hint=None):
        self._code, self._hint = code, hint

    def code(self):
        return self._code

    def trailing_metadata(self):
        return (("retry-after-ms", self._hint),) if self._hint is not None else ()


class Retry(unittest.TestCase):
    def test_delays_follow_the_rust_rules(self):
        p = RetryPolicy(max_attempts=10)
        unavailable, exhausted = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED
        self.assertEqual(p.delay(False, exhausted, 0.25, 0, 0.0), 0.25)
        self.assertIsNone(p.delay(True, exhausted, None, 0, 0.5), "no hint: final")
        self.assertIsNone(p.delay(True, exhausted, 60.0, 0, 0.5), "hint past max_hint")
        self.assertAlmostEqual(p.delay(True, unavailable, None, 0, 1.0), 0.05)
        self.assertAlmostEqual(p.delay(True, unavailable, None, 4, 1.0), 0.8)
        self.assertAlmostEqual(p.delay(True, unavailable, None, 7, 1.0), 2.0)
        self.assertIsNone(p.delay(False, unavailable, None, 0, 0.5))
        self.assertIsNone(p.delay(True, grpc.StatusCode.DEADLINE_EXCEEDED, None, 0, 0.5))

    def test_run_counts_attempts(self):
        p, calls, sleeps = RetryPolicy(), [], []

        def failing():
            calls.append(1)
            raise FakeError(grpc.StatusCode.UNAVAILABLE)

        with self.assertRaises(grpc.RpcError):
            p.run("GetTenant", failing, sleep=sleeps.append)
        self.assertEqual(len(calls), p.max_attempts)
        calls.clear()
        with self.assertRaises(grpc.RpcError):
            p.run("RotateTenantKey", failing, sleep=sleeps.append)
        self.assertEqual(len(calls), 1, "not idempotent")

        answers = iter([FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "5"), "ok"])

        def hinted():
            answer = next(answers)
            if isinstance(answer, Exception):
                raise answer
            return answer

        sleeps.clear()
        self.assertEqual(p.run("CreateTenant", hinted, sleep=sleeps.append, rng=lambda: 0.0),
                         "ok")
        self.assertEqual(sleeps, [0.005])


if __name__ == "__main__":
    unittest.main()
