"""Blob stores: where a worker publishes model files (tokenizer, template) for frontends elsewhere.

Every blob is content-addressed by its SHA-256, so any number of workers serving the same model
share one copy, publishing again is a no-op, and a location names exactly one content. A location
is a string `scheme:rest`:

- `store:turbine/files/{sha256}`: the discovery `Store` itself (etcd, the file store, memory). The
  head key holds `[size, chunks]`; the content is in `turbine/files/{sha256}/{i}`, at most
  `STORE_CHUNK_BYTES` each, because etcd refuses requests over 1.5 MiB by default (and its JSON
  gateway base64-inflates values by 4/3). The head is written last, so a reader never sees a blob
  whose chunks are still being written (a writer killed midway leaves no head, and the next one
  rewrites the chunks).
- `nats-os:{bucket}/{sha256}`: a NATS JetStream object store (the nats-server needs `-js`;
  `nats_blobs.py`, apart so that a process that never uses NATS does not import its client).

Blobs are not attached to any lease: a content-addressed key is shared, and the Store moves a key to
the lease of whoever put it last, so a lease would drop the blob when that one worker left while
others still advertise it. Blobs therefore persist until an operator deletes the `turbine/files/`
prefix (or the NATS bucket); a deleted blob is published again by the next worker that starts.
They are small and deduplicated, so they grow only with the number of distinct models.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Protocol, Self

import msgspec

from turbine.errors import ConfigError
from turbine.runtime.discovery.base import Store
from turbine.runtime.lifecycle import Closing

__all__ = [
    "NATS_BUCKET",
    "STORE_CHUNK_BYTES",
    "STORE_PREFIX",
    "BlobError",
    "BlobStore",
    "JetStreamUnavailable",
    "LazyBlobStore",
    "StoreBlobStore",
    "sha256_hex",
]

STORE_SCHEME = "store"
NATS_SCHEME = "nats-os"
STORE_PREFIX = "turbine/files/"
# Well below etcd's default 1.5 MiB request limit once base64-encoded (512 KiB → 683 KiB).
STORE_CHUNK_BYTES = 512 * 1024
NATS_BUCKET = "turbine_model_files"
log = logging.getLogger(__name__)


class BlobError(ConfigError):
    """A blob could not be published or fetched (missing, malformed, or its store is unreachable)."""


class JetStreamUnavailable(BlobError):
    """The NATS server answers but has no JetStream (it was started without `-js`)."""


class BlobStore(Protocol):
    """Content-addressed blobs. `put` returns the blob's location; `get` takes one of this store's."""

    scheme: str

    async def put(self, data: bytes) -> str: ...

    async def get(self, location: str) -> bytes: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_location(location: str, scheme: str) -> str:
    prefix = scheme + ":"
    if not location.startswith(prefix):
        raise BlobError(f"location {location!r} is not a {scheme} location")
    return location[len(prefix) :]


class _Head(msgspec.Struct, array_like=True, frozen=True):
    size: int
    chunks: int


_decode_head = msgspec.msgpack.Decoder(_Head).decode
_encode = msgspec.msgpack.Encoder().encode


class StoreBlobStore(Closing):
    """Blobs in the discovery `Store`, chunked (see the module docstring for the layout)."""

    scheme = STORE_SCHEME

    def __init__(self, store: Store, chunk_bytes: int = STORE_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self._store = store
        self._chunk_bytes = chunk_bytes

    async def put(self, data: bytes) -> str:
        key = STORE_PREFIX + sha256_hex(data)
        location = f"{self.scheme}:{key}"
        if await self._published(location, data):
            return location  # published before, by this or another worker
        chunks = max(1, -(-len(data) // self._chunk_bytes))
        for i in range(chunks):
            await self._store.put(f"{key}/{i}", data[i * self._chunk_bytes : (i + 1) * self._chunk_bytes])
        await self._store.put(key, _encode(_Head(len(data), chunks)))
        return location

    async def get(self, location: str) -> bytes:
        key = split_location(location, self.scheme)
        raw = await self._store.get(key)
        if raw is None:
            raise BlobError(f"{location} is not in the store")
        try:
            head = _decode_head(raw)
        except msgspec.DecodeError as exc:
            raise BlobError(f"{location}: malformed head record: {exc}") from None
        parts: list[bytes] = []
        for i in range(head.chunks):
            chunk = await self._store.get(f"{key}/{i}")
            if chunk is None:
                raise BlobError(f"{location}: chunk {i} of {head.chunks} is missing")
            parts.append(chunk)
        data = b"".join(parts)
        if len(data) != head.size:
            raise BlobError(f"{location}: {len(data)} bytes in its chunks, the head says {head.size}")
        return data

    async def _published(self, location: str, data: bytes) -> bool:
        # Read back rather than trust the head: a chunk deleted or damaged since is then rewritten.
        try:
            return await self.get(location) == data
        except BlobError:
            return False

    async def close(self) -> None:
        """The Store belongs to the caller; nothing to close."""


class LazyBlobStore(Closing):
    """A blob store made on first use: a process that never meets its scheme neither builds it nor
    imports its module (for the NATS object store, the NATS client)."""

    def __init__(self, scheme: str, make: Callable[[], BlobStore]) -> None:
        self.scheme = scheme
        self._make = make
        self._store: BlobStore | None = None

    def _made(self) -> BlobStore:
        if self._store is None:
            self._store = self._make()
        return self._store

    async def put(self, data: bytes) -> str:
        return await self._made().put(data)

    async def get(self, location: str) -> bytes:
        return await self._made().get(location)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
