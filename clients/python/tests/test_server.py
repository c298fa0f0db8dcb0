"""The Python client against the real server binary (target/release/tenant-kms, or
TENANT_KMS_BIN), and envelopes exchanged with the Rust client (its `envelope` example,
target/release/examples/envelope or TENANT_KMS_ENVELOPE_EXAMPLE) through that server."""

import os
import subprocess
import tempfile
import threading
import unittest
from pathlib import Path

import grpc

from tenant_kms_client import (CachePolicy, Client, DataKeyCache, DecryptError, Envelope,
                               FormatError, RetryPolicy)
from tenant_kms_client.retry import retry_after

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("TENANT_KMS_BIN", REPO / "target" / "release" / "tenant-kms"))
RUST_ENVELOPE = Path(os.environ.get("TENANT_KMS_ENVELOPE_EXAMPLE",
                                    REPO / "target" / "release" / "examples" / "envelope"))


class Server:
    """`tenant-kms serve` on port 0 with a temporary data directory."""

    def __init__(self, config: str = "", extra=()):
        if not BIN.exists():
            raise RuntimeError(f"{BIN} is missing: run `cargo build --release` first")
        self.dir = tempfile.TemporaryDirectory()
        data = Path(self.dir.name) / "data"
        args = [str(BIN), "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0",
                "--min-deletion-window", "0s"]
        if config:
            path = Path(self.dir.name) / "tenant-kms.toml"
            path.write_text(config)
            args += ["--config", str(path)]
        args += list(extra)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        for line in self.process.stdout:
            if line.startswith("listening on "):
                self.addr = line.split("listening on ", 1)[1].strip()
                break
        else:
            raise RuntimeError(f"serve exited with {self.process.wait()}")
        # Keep draining stdout so the server never blocks on a full pipe.
        self.reader = threading.Thread(target=self.process.stdout.read, daemon=True)
        self.reader.start()
        self.token = (data / "admin.token").read_text().strip()

    def client(self, **settings) -> Client:
        return Client(self.addr, token=settings.pop("token", self.token), **settings)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        self.process.stdout.close()
        self.dir.cleanup()


class AgainstServer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        cls.client = cls.server.client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def tenant(self, name):
        self.client.create_tenant(tenant_id=name)
        return name

    def test_typed_calls_reach_the_server_and_refusals_keep_their_code(self):
        t = self.tenant("py-typed")
        sealed = self.client.encrypt(tenant_id=t, context="crm.email", plaintext=b"a@b.c")
        opened = self.client.decrypt(tenant_id=t, context="crm.email",
                                     ciphertext=sealed.ciphertext)
        self.assertEqual(opened.plaintext, b"a@b.c")
        key = self.client.generate_data_key(tenant_id=t, context="files")
        again = self.client.decrypt_data_key(tenant_id=t, context="files",
                                             wrapped_key=key.wrapped_key)
        self.assertEqual(again.plaintext_key, key.plaintext_key)
        self.assertEqual(self.client.rotate_tenant_key(tenant_id=t).primary_version, 2)
        versions = self.client.list_key_versions(tenant_id=t).versions
        self.assertEqual(sorted(v.version for v in versions), [1, 2])
        self.assertTrue(self.client.verify_audit_chain().ok)
        with self.assertRaises(grpc.RpcError) as refused:
            self.client.create_tenant(tenant_id=t)
        self.assertEqual(refused.exception.code(), grpc.StatusCode.ALREADY_EXISTS)
        with self.assertRaises(grpc.RpcError) as invalid:
            self.client.encrypt(tenant_id=t, context="", plaintext=b"x")
        self.assertEqual(invalid.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_token_from_the_environment_and_a_bad_token_refused(self):
        env = {"TENANT_KMS_ADDR": self.server.addr, "TENANT_KMS_TOKEN": self.server.token}
        with Client.from_env(env) as client:
            self.assertIsNotNone(client.list_tenants(page_size=1))
        with self.server.client(token="tkms_not_a_token") as wrong:
            with self.assertRaises(grpc.RpcError) as refused:
                wrong.list_tenants()
            self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAUTHENTICATED)

    def test_envelopes_of_values_and_files(self):
        t = self.tenant("py-envelope")
        envelope = Envelope(self.client, segment_size=1024)
        value = os.urandom(10_000)
        sealed = envelope.encrypt_value(t, "crm.files", value)
        self.assertEqual(envelope.decrypt_value(t, "crm.files", sealed), value)
        with self.assertRaises(FormatError):
            envelope.decrypt_value(t, "crm.other", sealed)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "plain").write_bytes(os.urandom(300_000))
            self.assertEqual(envelope.encrypt_file(t, "crm.files", d / "plain", d / "sealed"),
                             300_000)
            envelope.decrypt_file(t, "crm.files", d / "sealed", d / "opened")
            self.assertEqual((d / "opened").read_bytes(), (d / "plain").read_bytes())
            self.assertEqual((d / "opened").stat().st_mode & 0o777, 0o600)
            (d / "cut").write_bytes((d / "sealed").read_bytes()[:-1100])
            with self.assertRaises(DecryptError):
                envelope.decrypt_file(t, "crm.files", d / "cut", d / "from-cut")
            self.assertFalse((d / "from-cut").exists())
            self.assertEqual([p.name for p in d.iterdir() if ".partial-" in p.name], [])

    def test_the_cache_spares_data_key_calls_within_its_limits(self):
        t = self.tenant("py-cache")
        now = [0.0]
        cache = DataKeyCache(CachePolicy(max_age=60, max_messages=3), clock=lambda: now[0])
        envelope = Envelope(self.client, cache=cache)

        def key_calls():
            events = self.client.list_audit_events(tenant_id=t, page_size=1000).events
            return sum(e.operation in ("GenerateDataKey", "DecryptDataKey") for e in events)

        sealed = [envelope.encrypt_value(t, "c", bytes([i]) * 100) for i in range(4)]
        self.assertEqual(key_calls(), 2)
        for s in sealed:
            envelope.decrypt_value(t, "c", s)
        self.assertEqual(key_calls(), 4)
        now[0] = 60
        envelope.encrypt_value(t, "c", b"x")
        self.assertEqual(key_calls(), 5)

    def test_envelopes_cross_between_python_and_rust(self):
        if not RUST_ENVELOPE.exists():
            self.fail(f"{RUST_ENVELOPE} is missing: cargo build --release -p tenant-kms-client "
                      "--example envelope")
        t = self.tenant("py-interop")
        env = dict(os.environ, TENANT_KMS_ADDR=self.server.addr, TENANT_KMS_TOKEN=self.server.token)
        value = os.urandom(200_000)
        from_python = Envelope(self.client).encrypt_value(t, "crm.files", value)
        opened = subprocess.run([str(RUST_ENVELOPE), "decrypt", t, "crm.files"], input=from_python,
                                env=env, capture_output=True, check=True)
        self.assertEqual(opened.stdout, value)
        from_rust = subprocess.run([str(RUST_ENVELOPE), "encrypt", t, "crm.files"], input=value,
                                   env=env, capture_output=True, check=True).stdout
        self.assertEqual(Envelope(self.client).decrypt_value(t, "crm.files", from_rust), value)
        tampered = bytearray(from_python)
        tampered[-1] ^= 1
        refused = subprocess.run([str(RUST_ENVELOPE), "decrypt", t, "crm.files"],
                                 input=bytes(tampered), env=env, capture_output=True)
        self.assertNotEqual(refused.returncode, 0)
        self.assertEqual(refused.stdout, b"")


class RateLimited(unittest.TestCase):
    def test_refusals_with_retry_after_ms_are_retried_after_the_hint(self):
        server = Server("rate_limit_per_second = 2.0\nrate_limit_burst = 1\n")
        try:
            impatient = server.client(retry=RetryPolicy.never())
            hint = None
            for _ in range(3):
                try:
                    impatient.list_tenants()
                except grpc.RpcError as error:
                    self.assertEqual(error.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                    hint = retry_after(error)
                    break
            self.assertIsNotNone(hint, "a burst past the limit is refused with a hint")
            self.assertTrue(0 < hint <= 1.0)
            patient = server.client()
            for i in range(3):
                patient.create_tenant(tenant_id=f"rl-{i}")
        finally:
            server.stop()


if __name__ == "__main__":
    unittest.main()
