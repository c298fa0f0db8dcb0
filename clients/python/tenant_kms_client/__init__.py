"""tenant-kms client: generated gRPC stubs (package ``tenantkms.v1``), a Client with token, TLS
and retries, and the streaming envelope format of docs/ENVELOPE.md (interoperable byte for
byte with the Rust crate ``tenant-kms-client``)."""

from .client import Client
from .envelope import (CachePolicy, DataKeyCache, DecryptError, Envelope, FormatError,
                       open_envelope)
from .retry import RetryPolicy

__all__ = ["Client", "Envelope", "DataKeyCache", "CachePolicy", "RetryPolicy", "FormatError",
           "DecryptError", "open_envelope"]
