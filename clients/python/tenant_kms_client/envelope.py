"""The envelope format of docs/ENVELOPE.md, byte for byte as the Rust client writes it.

Large values and files are sealed locally under a data key from GenerateDataKey, one segment
in memory at a time:

    header   = "tkms-env" || 0x01 || be32(segment_size) || salt[32]
               || be16(len) tenant_id || be16(len) context || be16(len) wrapped_key
    K        = HKDF-SHA256(ikm=data_key, salt=none, info=lp(LABEL) || header)
    segment i = AES-256-GCM(K, nonce = 0^7 || be32(i) || last, aad = "", plaintext_i)

Every segment but the last holds exactly segment_size plaintext bytes; the last holds 0 to
segment_size (0 only when it is the only one).
"""

import io
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"tkms-env"
VERSION = 1
SEGMENT_KEY_LABEL = b"tenant-kms/v1/envelope-segment-key"
SALT_LEN = 32
TAG_LEN = 16
KEY_LEN = 32
MIN_SEGMENT, MAX_SEGMENT = 16, 16 << 20
DEFAULT_SEGMENT_SIZE = 64 << 10
MAX_FIELD_LEN = 1024
MAX_SEGMENTS = 1 << 32
FIXED_LEN = len(MAGIC) + 1 + 4 + SALT_LEN


class FormatError(ValueError):
    """Input that is not an envelope (magic, version, lengths), or whose header names another
    tenant or context than expected."""


class DecryptError(ValueError):
    """An envelope that does not open: one error whatever the cause."""


@dataclass
class Header:
    """Everything a reader needs besides the data key."""

    segment_size: int
    salt: bytes
    tenant_id: str
    context: str
    wrapped_key: bytes

    def encode(self) -> bytes:
        if not MIN_SEGMENT <= self.segment_size <= MAX_SEGMENT:
            raise FormatError("segment size out of range")
        if len(self.salt) != SALT_LEN:
            raise FormatError("salt")
        out = MAGIC + bytes([VERSION]) + struct.pack(">I", self.segment_size) + self.salt
        for part in (self.tenant_id.encode(), self.context.encode(), self.wrapped_key):
            if not 0 < len(part) <= MAX_FIELD_LEN:
                raise FormatError("a header field is empty or too long")
            out += struct.pack(">H", len(part)) + part
        return out


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise FormatError("truncated header")
        data += chunk
    return data


def read_header(stream: BinaryIO) -> Tuple[Header, bytes]:
    """Reads a header, leaving ``stream`` at the first segment; returns it with its bytes."""
    raw = _read_exact(stream, FIXED_LEN)
    if raw[:len(MAGIC)] != MAGIC:
        raise FormatError("wrong magic")
    if raw[len(MAGIC)] != VERSION:
        raise FormatError(f"unsupported version {raw[len(MAGIC)]}")
    (segment_size,) = struct.unpack(">I", raw[len(MAGIC) + 1:len(MAGIC) + 5])
    if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
        raise FormatError("segment size out of range")
    fields = []
    for _ in range(3):
        length_bytes = _read_exact(stream, 2)
        (length,) = struct.unpack(">H", length_bytes)
        if not 0 < length <= MAX_FIELD_LEN:
            raise FormatError("a header field is empty or too long")
        value = _read_exact(stream, length)
        raw += length_bytes + value
        fields.append(value)
    try:
        tenant, context = fields[0].decode(), fields[1].decode()
    except UnicodeDecodeError:
        raise FormatError("a header name is not UTF-8") from None
    salt = raw[len(MAGIC) + 5:FIXED_LEN]
    return Header(segment_size, salt, tenant, context, fields[2]), raw


def segment_key(data_key: bytes, header_bytes: bytes) -> bytes:
    """K = HKDF-SHA256(data_key, no salt, lp(label) || header) (RFC 5869)."""
    info = struct.pack(">I", len(SEGMENT_KEY_LABEL)) + SEGMENT_KEY_LABEL + header_bytes
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=info).derive(data_key)


def segment_nonce(index: int, last: bool) -> bytes:
    """0^7 || be32(index) || last (STREAM)."""
    if not 0 <= index < MAX_SEGMENTS:
        raise FormatError("too many segments")
    return bytes(7) + struct.pack(">I", index) + bytes([1 if last else 0])


class EncryptingWriter(io.RawIOBase):
    """Writes an envelope to ``output``: the header at once, each segment once it is known not
    to be the last. ``finish()`` seals the last one (without it the envelope reads as truncated)."""

    def __init__(self, output: BinaryIO, data_key: bytes, header: Header,
                 length: Optional[int] = None):
        super().__init__()
        header_bytes = header.encode()
        self._aead = AESGCM(segment_key(data_key, header_bytes))
        self._output = output
        self._size = header.segment_size
        self._buffer = bytearray()
        self._index = 0
        self._remaining = length
        output.write(header_bytes)

    def writable(self):
        return True

    def _emit(self, last: bool):
        sealed = self._aead.encrypt(segment_nonce(self._index, last), bytes(self._buffer), None)
        self._output.write(sealed)
        self._buffer[:] = bytes(len(self._buffer))
        del self._buffer[:]
        self._index += 1

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self._remaining is not None:
            if len(data) > self._remaining:
                raise FormatError("the input is longer than the length it declared")
            self._remaining -= len(data)
        at = 0
        while at < len(data):
            if len(self._buffer) == self._size:
                self._emit(False)
            take = min(self._size - len(self._buffer), len(data) - at)
            self._buffer += data[at:at + take]
            at += take
        return len(data)

    def finish(self) -> BinaryIO:
        """Seals the last segment and returns the output."""
        if self._remaining:
            raise FormatError("the input ended before the length it declared")
        self._emit(True)
        self._output.flush()
        return self._output


class DecryptingReader(io.RawIOBase):
    """Reads the plaintext of an envelope whose header was read by ``read_header``; a segment's
    bytes are returned only after it authenticated. Truncation, reordering or extension raises
    DecryptError when detected: the output counts only once reading reached the end."""

    def __init__(self, stream: BinaryIO, data_key: bytes, header: Header, header_bytes: bytes):
        super().__init__()
        self._stream = stream
        self._aead = AESGCM(segment_key(data_key, header_bytes))
        self._sealed = header.segment_size + TAG_LEN
        self._index = 0
        self._lookahead = b""
        self._plain = b""
        self._done = False

    def readable(self):
        return True

    def _next_segment(self):
        segment = self._lookahead
        self._lookahead = b""
        while len(segment) < self._sealed:
            chunk = self._stream.read(self._sealed - len(segment))
            if not chunk:
                break
            segment += chunk
        last = len(segment) < self._sealed
        if not last:
            self._lookahead = self._stream.read(1)
            last = not self._lookahead
        if len(segment) < TAG_LEN or (last and self._index > 0 and len(segment) == TAG_LEN):
            raise DecryptError("the envelope does not open")
        try:
            self._plain = self._aead.decrypt(segment_nonce(self._index, last), segment, None)
        except (InvalidTag, FormatError):
            raise DecryptError("the envelope does not open") from None
        self._index += 1
        self._done = last

    def readinto(self, buffer) -> int:
        while not self._plain and not self._done:
            self._next_segment()
        n = min(len(buffer), len(self._plain))
        buffer[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n


def open_envelope(data_key: bytes, envelope: bytes) -> bytes:
    """Opens an envelope held in memory with a known data key (no server)."""
    stream = io.BytesIO(envelope)
    header, header_bytes = read_header(stream)
    return DecryptingReader(stream, data_key, header, header_bytes).read()


# ---- the data-key cache (as the AWS Encryption SDK's caching CMM) ----

@dataclass
class CachePolicy:
    """Limits per cached key, and keys kept of each kind."""

    max_age: float = 300.0
    max_messages: int = 1000
    max_bytes: int = 1 << 30
    capacity: int = 100


@dataclass
class _Entry:
    key: bytes
    wrapped: bytes
    created: float
    messages: int = 1
    bytes: int = 0


@dataclass
class DataKeyCache:
    """Data keys re-used within CachePolicy's limits (clients/rust/src/envelope/cache.rs has
    the same rules). A cache hit is not a server call: neither authorized nor audited again,
    and a disabled key version keeps working for cached keys until they expire."""

    policy: CachePolicy = field(default_factory=CachePolicy)
    clock: Callable[[], float] = time.monotonic
    _encrypt: Dict[tuple, _Entry] = field(default_factory=dict)
    _decrypt: Dict[tuple, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _usable(self, entry: _Entry, length: int) -> bool:
        return (self.clock() - entry.created < self.policy.max_age
                and entry.messages < self.policy.max_messages
                and entry.bytes + length <= self.policy.max_bytes)

    def _evict(self, table: dict):
        while table and len(table) >= max(self.policy.capacity, 1):
            del table[min(table, key=lambda k: table[k].created)]

    def encryption_key(self, tenant: str, context: str, length: Optional[int]):
        if length is None:
            return None
        with self._lock:
            entry = self._encrypt.get((tenant, context))
            if entry is None:
                return None
            if not self._usable(entry, length):
                del self._encrypt[(tenant, context)]
                return None
            entry.messages += 1
            entry.bytes += length
            return entry.key, entry.wrapped

    def insert_encryption_key(self, tenant, context, key, wrapped, length):
        if length is None or self.policy.max_messages <= 1 or length >= self.policy.max_bytes:
            return
        with self._lock:
            self._evict(self._encrypt)
            self._encrypt[(tenant, context)] = _Entry(key, wrapped, self.clock(), 1, length)

    def decryption_key(self, tenant, context, wrapped):
        with self._lock:
            entry = self._decrypt.get((tenant, context, wrapped))
            if entry is None:
                return None
            if not self._usable(entry, 0):
                del self._decrypt[(tenant, context, wrapped)]
                return None
            entry.messages += 1
            return entry.key

    def insert_decryption_key(self, tenant, context, wrapped, key):
        if self.policy.max_messages <= 1:
            return
        with self._lock:
            self._evict(self._decrypt)
            self._decrypt[(tenant, context, wrapped)] = _Entry(key, wrapped, self.clock())


class Envelope:
    """Seals and opens envelopes through a Client (optionally with a DataKeyCache)."""

    def __init__(self, client, cache: Optional[DataKeyCache] = None,
                 segment_size: int = DEFAULT_SEGMENT_SIZE):
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise ValueError(f"segment size {segment_size} is outside 16 B to 16 MiB")
        self.client, self.cache, self.segment_size = client, cache, segment_size

    def _encryption_key(self, tenant, context, length):
        hit = self.cache.encryption_key(tenant, context, length) if self.cache else None
        if hit:
            return hit
        answer = self.client.generate_data_key(tenant_id=tenant, context=context)
        if self.cache:
            self.cache.insert_encryption_key(tenant, context, answer.plaintext_key,
                                             answer.wrapped_key, length)
        return answer.plaintext_key, answer.wrapped_key

    def _decryption_key(self, tenant, context, header: Header):
        if header.tenant_id != tenant or header.context != context:
            raise FormatError(f"the envelope is for tenant {header.tenant_id!r} and context "
                              f"{header.context!r}, not {tenant!r} and {context!r}")
        hit = self.cache.decryption_key(tenant, context, header.wrapped_key) if self.cache else None
        if hit:
            return hit
        answer = self.client.decrypt_data_key(tenant_id=tenant, context=context,
                                              wrapped_key=header.wrapped_key)
        if self.cache:
            self.cache.insert_decryption_key(tenant, context, header.wrapped_key,
                                             answer.plaintext_key)
        return answer.plaintext_key

    def encryptor(self, tenant: str, context: str, output: BinaryIO,
                  length: Optional[int] = None) -> EncryptingWriter:
        """Writes the header to ``output`` and returns the writer of the plaintext; call
        ``finish()`` at the end. Only with ``length`` may a cached key be used."""
        key, wrapped = self._encryption_key(tenant, context, length)
        header = Header(self.segment_size, os.urandom(SALT_LEN), tenant, context, wrapped)
        return EncryptingWriter(output, key, header, length)

    def decryptor(self, tenant: str, context: str, stream: BinaryIO) -> DecryptingReader:
        """Reads the header from ``stream`` (it must name tenant and context) and returns the
        reader of the plaintext."""
        header, header_bytes = read_header(stream)
        return DecryptingReader(stream, self._decryption_key(tenant, context, header), header,
                                header_bytes)

    def encrypt_value(self, tenant: str, context: str, plaintext: bytes) -> bytes:
        out = io.BytesIO()
        writer = self.encryptor(tenant, context, out, len(plaintext))
        writer.write(plaintext)
        writer.finish()
        return out.getvalue()

    def decrypt_value(self, tenant: str, context: str, envelope: bytes) -> bytes:
        return self.decryptor(tenant, context, io.BytesIO(envelope)).read()

    def encrypt_file(self, tenant: str, context: str, src, dst) -> int:
        """Seals file ``src`` into ``dst`` (via a temporary file renamed when complete)."""
        src, dst = Path(src), Path(dst)
        with open(src, "rb") as source:
            length = os.fstat(source.fileno()).st_size
            return self._to_file(dst, lambda out: self._copy(
                source, self.encryptor(tenant, context, out, length)))

    def decrypt_file(self, tenant: str, context: str, src, dst) -> int:
        """Opens envelope file ``src`` into ``dst`` (mode 0600); ``dst`` appears only once the
        whole envelope has opened."""
        with open(src, "rb") as source:
            reader = self.decryptor(tenant, context, source)
            return self._to_file(Path(dst), lambda out: self._copy(reader, out))

    @staticmethod
    def _copy(source, sink) -> int:
        total = 0
        while True:
            chunk = source.read(1 << 16)
            if not chunk:
                break
            sink.write(chunk)
            total += len(chunk)
        if isinstance(sink, EncryptingWriter):
            sink.finish()
        return total

    @staticmethod
    def _to_file(dst: Path, work) -> int:
        fd, temporary = tempfile.mkstemp(prefix=dst.name + ".partial-", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                written = work(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, dst)
            return written
        except BaseException:
            os.unlink(temporary)
            raise
