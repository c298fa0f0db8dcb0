"""Client: one method per RPC of the three services, with token, TLS and retries.

Methods are snake_case RPC names (``encrypt``, ``generate_data_key``, ``list_audit_events``, ...),
made from the services' descriptors so every RPC has one. Each takes the request message or
its fields as keyword arguments and returns the response message::

    client = Client.from_env()
    sealed = client.encrypt(tenant_id="acme", context="crm.email", plaintext=b"a@example.com")

The environment names are the CLI's: TENANT_KMS_ADDR, TENANT_KMS_TOKEN (the token itself),
TENANT_KMS_TOKEN_FILE, TENANT_KMS_CA_CERT, TENANT_KMS_CLIENT_CERT, TENANT_KMS_CLIENT_KEY.
"""

import os
import re
from pathlib import Path
from typing import Mapping, Optional

import grpc

from tenantkms.v1 import audit_pb2_grpc, keys_pb2, keys_pb2_grpc, tenants_pb2, tenants_pb2_grpc
from tenantkms.v1 import audit_pb2

from .retry import RetryPolicy

DEFAULT_ADDR = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 << 20

_SERVICES = (
    (keys_pb2, "KeyService", keys_pb2_grpc.KeyServiceStub),
    (tenants_pb2, "TenantService", tenants_pb2_grpc.TenantServiceStub),
    (audit_pb2, "AuditService", audit_pb2_grpc.AuditServiceStub),
)


def snake_case(name: str) -> str:
    """GenerateDataKey -> generate_data_key."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _read(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None


class Client:
    """A connection to one tenant-kms server; safe to share between threads."""

    def __init__(self, addr: str = DEFAULT_ADDR, token: Optional[str] = None,
                 token_file=None, ca_cert=None, client_cert=None, client_key=None,
                 retry: Optional[RetryPolicy] = None):
        """``addr`` is ``host:port`` or a URL (``http://``, ``https://``); TLS is used for
        https:// and for ``host:port`` once ``ca_cert`` (a PEM file) is given. No operating
        system roots are trusted. ``client_cert``/``client_key`` (PEM files) add mutual TLS.
        The token is ``token``, else the contents of ``token_file``."""
        if token is None and token_file is not None:
            token = _read(token_file).decode("ascii", "strict").strip()
        self._metadata = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        self.retry = retry or RetryPolicy()
        target, https = self._target(addr, ca_cert is not None)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if https:
            if ca_cert is None:
                raise ValueError("an https:// address needs ca_cert")
            if (client_cert is None) != (client_key is None):
                raise ValueError("client_cert and client_key go together")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert),
                private_key=_read(client_key) if client_key else None,
                certificate_chain=_read(client_cert) if client_cert else None)
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            if ca_cert is not None or client_cert is not None:
                raise ValueError(f"a CA or client certificate needs an https:// address, not {addr}")
            self._channel = grpc.insecure_channel(target, options)
        self._stubs = {name: stub(self._channel) for _, name, stub in _SERVICES}

    @staticmethod
    def _target(addr: str, tls: bool):
        for scheme, https in (("https://", True), ("http://", False)):
            if addr.startswith(scheme):
                return addr[len(scheme):].rstrip("/"), https
        return addr, tls

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> "Client":
        """A client configured from the environment (or the given mapping); TENANT_KMS_TOKEN
        wins over TENANT_KMS_TOKEN_FILE."""
        env = os.environ if environ is None else environ

        def get(name):
            return env.get(name) or None

        settings = dict(addr=get("TENANT_KMS_ADDR") or DEFAULT_ADDR, token=get("TENANT_KMS_TOKEN"),
                        token_file=get("TENANT_KMS_TOKEN_FILE"), ca_cert=get("TENANT_KMS_CA_CERT"),
                        client_cert=get("TENANT_KMS_CLIENT_CERT"),
                        client_key=get("TENANT_KMS_CLIENT_KEY"))
        settings.update(overrides)
        return cls(**settings)

    def close(self):
        """Closes the channel."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, service: str, rpc: str, request, timeout: Optional[float] = None,
             metadata=()):
        """Calls ``service.rpc`` with ``request`` under the retry policy."""
        method = getattr(self._stubs[service], rpc)
        return self.retry.run(rpc, lambda: method(request, timeout=timeout,
                                                  metadata=self._metadata + tuple(metadata)))


def _typed(service: str, rpc: str, request_type):
    def method(self, request=None, *, timeout: Optional[float] = None, metadata=(), **fields):
        if request is None:
            request = request_type(**fields)
        elif fields:
            raise TypeError("give the request message or its fields, not both")
        return self.call(service, rpc, request, timeout=timeout, metadata=metadata)

    method.__name__ = snake_case(rpc)
    method.__doc__ = (f"Calls {service}.{rpc} with a {request_type.__name__} (or its fields as "
                      f"keyword arguments); see the proto for its status codes.")
    return method


for _module, _service, _ in _SERVICES:
    for _method in _module.DESCRIPTOR.services_by_name[_service].methods:
        _request = getattr(_module, _method.input_type.name)
        setattr(Client, snake_case(_method.name), _typed(_service, _method.name, _request))
