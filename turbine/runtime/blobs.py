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
- `nats-os:{bucket}/{sha256}`: a NATS JetStream object store (the nats-server needs `-js`).

Blobs are not attached to any lease: a content-addressed key is shared, and the Store moves a key to
the lease of whoever put it last, so a lease would drop the blob when that one worker left while
others still advertise it. Blobs therefore persist until an operator deletes the `turbine/files/`
prefix (or the NATS bucket); a deleted blob is published again by the next worker that starts.
They are small and deduplicated, so they grow only with the number of distinct models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from typing import Protocol, Self

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.errors import BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.object_store import ObjectStore

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
    "NatsObjectBlobStore",
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

_NATS_CONNECT_TIMEOUT_S = 5.0
# Bounds every object store call: a wedged server must fail a model's load, not hang it forever.
_NATS_OP_TIMEOUT_S = 30.0


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


def _split(location: str, scheme: str) -> str:
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
        key = _split(location, self.scheme)
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


class NatsObjectBlobStore(Closing):
    """Blobs in a NATS JetStream object store, one object per content (named by its SHA-256).

    Connects on first use (a frontend that never meets a `nats-os:` location never connects), and
    creates the bucket if it is missing. `close()` closes the connection.
    """

    scheme = NATS_SCHEME

    def __init__(self, url: str, bucket: str = NATS_BUCKET, *, tls: ssl.SSLContext | None = None) -> None:
        self._url = url
        self._tls = tls
        self._bucket = bucket
        self._nc: NatsClient | None = None
        self._objects: ObjectStore | None = None
        self._lock = asyncio.Lock()

    async def put(self, data: bytes) -> str:
        name = sha256_hex(data)
        objects = await self._object_store()
        try:
            info = await asyncio.wait_for(objects.get_info(name), _NATS_OP_TIMEOUT_S)
            if info.size == len(data):
                return self._location(name)  # published before, by this or another worker
        except NotFoundError:
            pass
        except (NatsError, TimeoutError) as exc:
            raise BlobError(f"NATS object store {self._bucket}: cannot look up {name}: {exc!r}") from None
        try:
            await asyncio.wait_for(objects.put(name, data), _NATS_OP_TIMEOUT_S)
        except (NatsError, TimeoutError) as exc:
            raise BlobError(f"NATS object store {self._bucket}: cannot put {name}: {exc!r}") from None
        return self._location(name)

    async def get(self, location: str) -> bytes:
        bucket, _, name = _split(location, self.scheme).partition("/")
        if bucket != self._bucket or not name:
            raise BlobError(f"{location} is not in bucket {self._bucket}")
        objects = await self._object_store()
        try:
            result = await asyncio.wait_for(objects.get(name), _NATS_OP_TIMEOUT_S)
        except NotFoundError:
            raise BlobError(f"{location} is not in the NATS object store") from None
        except (NatsError, TimeoutError) as exc:
            raise BlobError(f"cannot fetch {location}: {exc!r}") from None
        data = result.data
        return bytes(data) if data is not None else b""

    def _location(self, name: str) -> str:
        return f"{self.scheme}:{self._bucket}/{name}"

    async def _object_store(self) -> ObjectStore:
        async with self._lock:
            if self._objects is not None and self._nc is not None and self._nc.is_connected:
                # A server restart may not have been noticed yet, and a request on such a connection
                # only times out; one ping round trip tells (uses are rare: publishing, model loads).
                try:
                    await self._nc.flush(timeout=1)
                    return self._objects
                except (NatsError, TimeoutError):
                    log.debug("nats model files: connection to %s is stale, reconnecting", self._url)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
                self._nc = self._objects = None
            # No reconnect loop: the connection is used only while publishing or fetching, and a
            # dropped one is replaced on the next use, so a failed connect fails at once.
            nc = NatsClient()

            async def error(exc: Exception) -> None:
                log.debug("nats model files: %r", exc)

            try:
                # nats-py retries even a first connect until the server has failed
                # max_reconnect_attempts times; one quick retry, then give up.
                await asyncio.wait_for(
                    nc.connect(
                        self._url,
                        name="turbine-model-files",
                        connect_timeout=2,
                        allow_reconnect=False,
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0,
                        error_cb=error,
                        tls=self._tls,
                    ),
                    _NATS_CONNECT_TIMEOUT_S,
                )
            except (OSError, NatsError, TimeoutError) as exc:
                # Bounded: after a failed TLS handshake nats-py's close() never returns.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 1.0)
                raise BlobError(f"cannot connect to NATS at {self._url}: {exc!r}") from None
            js = nc.jetstream()
            try:
                try:
                    objects = await asyncio.wait_for(js.object_store(self._bucket), _NATS_OP_TIMEOUT_S)
                except BucketNotFoundError:
                    # Two workers may race here; creating a stream with an identical config is
                    # idempotent in JetStream, so both succeed.
                    objects = await asyncio.wait_for(js.create_object_store(self._bucket), _NATS_OP_TIMEOUT_S)
            except ServiceUnavailableError:
                await nc.close()
                raise JetStreamUnavailable(
                    f"the NATS server at {self._url} has no JetStream (start nats-server with -js)"
                ) from None
            except (NatsError, TimeoutError) as exc:
                await nc.close()
                raise BlobError(f"NATS object store {self._bucket} at {self._url}: {exc!r}") from None
            self._nc, self._objects = nc, objects
            return objects

    async def close(self) -> None:
        async with self._lock:
            nc, self._nc, self._objects = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
