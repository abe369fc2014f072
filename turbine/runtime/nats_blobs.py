"""`nats-os:{bucket}/{sha256}` blobs: a NATS JetStream object store (see `blobs.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.errors import BucketNotFoundError, NotFoundError, ServiceUnavailableError
from nats.js.object_store import ObjectStore

from turbine.runtime.blobs import (
    NATS_BUCKET,
    NATS_SCHEME,
    BlobError,
    JetStreamUnavailable,
    sha256_hex,
    split_location,
)
from turbine.runtime.lifecycle import Closing

log = logging.getLogger(__name__)

_NATS_CONNECT_TIMEOUT_S = 5.0
# Bounds every object store call: a wedged server must fail a model's load, not hang it forever.
_NATS_OP_TIMEOUT_S = 30.0


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
        bucket, _, name = split_location(location, self.scheme).partition("/")
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
