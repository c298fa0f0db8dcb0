"""The Python client over TLS and mutual TLS to the real server binary."""

import datetime
import ipaddress
import tempfile
import unittest
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tenant_kms_client import Client, RetryPolicy
from test_server import Server


def _name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(subject, issuer, public_key, signing_key, ca=False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


class Pki:
    """A CA and PEM files in a temporary directory."""

    def __init__(self, name):
        self.dir = tempfile.TemporaryDirectory()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert(name, name, self.key.public_key(), self.key, ca=True)
        self.ca_pem = self.write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        self.name = name

    def write(self, name, data: bytes) -> str:
        path = Path(self.dir.name) / name
        path.write_bytes(data)
        return str(path)

    def issue(self, prefix, server):
        key = ec.generate_private_key(ec.SECP256R1())
        sans = ([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                if server else [x509.DNSName(prefix)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = _cert(prefix, self.name, key.public_key(), self.key, sans=sans, usage=usage)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self.write(prefix + ".pem", cert.public_bytes(serialization.Encoding.PEM)),
                self.write(prefix + ".key", key_pem))


class Tls(unittest.TestCase):
    def test_mutual_tls_with_a_named_ca_and_a_refused_foreign_ca(self):
        pki = Pki("py-test-ca")
        server_cert, server_key = pki.issue("server", True)
        client_cert, client_key = pki.issue("app", False)
        server = Server(extra=["--tls-cert", server_cert, "--tls-key", server_key,
                               "--client-ca", pki.ca_pem])
        try:
            # host:port plus a CA: TLS.
            with Client(server.addr, token=server.token, ca_cert=pki.ca_pem,
                        client_cert=client_cert, client_key=client_key) as client:
                client.create_tenant(tenant_id="tls-acme")
            other = Pki("other-ca")
            with Client(server.addr, token=server.token, ca_cert=other.ca_pem,
                        client_cert=client_cert, client_key=client_key,
                        retry=RetryPolicy.never()) as client:
                with self.assertRaises(grpc.RpcError) as refused:
                    client.list_tenants(timeout=10)
                self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)
        finally:
            server.stop()

    def test_settings_that_cannot_work_are_refused_up_front(self):
        with self.assertRaises(ValueError):
            Client("http://127.0.0.1:1", ca_cert="/nonexistent")
        with self.assertRaises(ValueError):
            Client("https://127.0.0.1:1")
        with self.assertRaises(ValueError) as missing:
            Client("127.0.0.1:1", token_file="/nonexistent/token")
        self.assertIn("/nonexistent/token", str(missing.exception))


if __name__ == "__main__":
    unittest.main()
