"""The Store seam: a small key-value store with leases and prefix watches (etcd's model).

Contract:
- Keys are `/`-separated strings; values are opaque bytes.
- A lease has a TTL in seconds. Keys put with a lease vanish (and watchers see a DELETE) when the
  lease is revoked or when it is not kept alive within its TTL — also when its process died.
- `keep_alive(lease_id)` returns False once the lease is gone (expired or revoked); the owner must then
  grant a new lease and put its keys again.
- `watch_prefix(prefix)` is an async iterator that first yields one PUT for every live key under the
  prefix (the snapshot), then every later change, in order, without duplicates or losses. The
  consumer stops it with `aclose()` (or by leaving an `async for` with break/exception).
- All methods are coroutine-safe on one event loop.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import NamedTuple, Protocol, Self


class KeyValue(NamedTuple):
    key: str
    value: bytes
    lease_id: int | None


class WatchKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


class WatchEvent(NamedTuple):
    kind: WatchKind
    key: str
    # The new value for PUT; None for DELETE.
    value: bytes | None


class Store(Protocol):
    async def grant_lease(self, ttl: float) -> int: ...

    async def keep_alive(self, lease_id: int) -> bool: ...

    async def revoke(self, lease_id: int) -> None: ...

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_prefix(self, prefix: str) -> list[KeyValue]: ...

    async def delete(self, key: str) -> None: ...

    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...
