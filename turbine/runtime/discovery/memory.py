"""An in-process Store: for unit tests and the single-process demo.

Everything happens on one event loop, so every mutation and its watch notifications run in one
synchronous step: a watcher can never observe a half-applied change, and a watch's snapshot and its
subscription are taken in the same step, so no change falls between them.

Lease expiry is evaluated at the start of every operation (so a fake clock alone decides what is
live) and, for watchers that nobody else wakes, by a timer task that sleeps until the earliest
lease deadline. The store owns that task: it starts with the first lease and `close()` cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from turbine.runtime.discovery.base import KeyValue, WatchEvent, WatchKind
from turbine.runtime.lifecycle import Closing


@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Watcher:
    prefix: str
    # Unbounded: a slow consumer must not block the writer; None tells the watch the store closed.
    queue: asyncio.Queue[WatchEvent | None] = field(default_factory=asyncio.Queue)


class MemoryStore(Closing):
    """A `Store` held in this process's memory. `clock` is in seconds (monotonic by default)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, KeyValue] = {}
        self._leases: dict[int, _Lease] = {}
        # Sequential ids are enough inside one process and make test failures easy to read.
        self._next_lease_id = 1
        self._watchers: set[_Watcher] = set()
        self._expiry_task: asyncio.Task[None] | None = None
        # Set when a lease appears, so the timer task re-arms for a possibly earlier deadline.
        self._leases_changed = asyncio.Event()
        self._closed = False

    # ---------------------------------------------------------------------------------- leases

    async def grant_lease(self, ttl: float) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        self._expire()
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        self._leases[lease_id] = _Lease(ttl, self._clock() + ttl)
        self._leases_changed.set()
        self._ensure_expiry_task()
        return lease_id

    async def keep_alive(self, lease_id: int) -> bool:
        self._check_open()
        self._expire()
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        # Only ever extends the deadline, so the timer task needs no wake-up: it rechecks when it fires.
        lease.deadline = self._clock() + lease.ttl
        return True

    async def revoke(self, lease_id: int) -> None:
        self._check_open()
        self._expire()
        self._drop_lease(lease_id)

    # ------------------------------------------------------------------------------------ keys

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        """Raises LookupError if `lease_id` names a lease that is gone (expired or revoked)."""
        self._check_open()
        self._expire()
        if lease_id is not None and lease_id not in self._leases:
            raise LookupError(f"lease {lease_id:x} not found (expired or revoked)")
        old = self._items.get(key)
        if old is not None and old.lease_id is not None and old.lease_id != lease_id:
            # Like etcd, a put moves the key to the new lease: the old one no longer deletes it.
            self._leases[old.lease_id].keys.discard(key)
        if lease_id is not None:
            self._leases[lease_id].keys.add(key)
        value = bytes(value)
        self._items[key] = KeyValue(key, value, lease_id)
        self._notify(WatchEvent(WatchKind.PUT, key, value))

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        self._expire()
        item = self._items.get(key)
        return None if item is None else item.value

    async def get_prefix(self, prefix: str) -> list[KeyValue]:
        self._check_open()
        self._expire()
        return [kv for key, kv in sorted(self._items.items()) if key.startswith(prefix)]

    async def delete(self, key: str) -> None:
        self._check_open()
        self._expire()
        self._remove(key)

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        self._expire()
        watcher = _Watcher(prefix)
        snapshot = [
            WatchEvent(WatchKind.PUT, key, kv.value)
            for key, kv in sorted(self._items.items())
            if key.startswith(prefix)
        ]
        # Same synchronous step as the snapshot: every later change lands in the queue, none twice.
        self._watchers.add(watcher)
        try:
            for event in snapshot:
                yield event
            while True:
                queued = await watcher.queue.get()
                if queued is None:
                    return
                yield queued
        finally:
            self._watchers.discard(watcher)

    async def close(self) -> None:
        """Stops the expiry timer and ends every open watch. The store is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        task, self._expiry_task = self._expiry_task, None
        if task is not None:
            task.cancel()
            # asyncio.wait rather than awaiting the task: our own cancellation must still propagate.
            await asyncio.wait({task})
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
        self._watchers.clear()

    # -------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MemoryStore is closed")

    def _notify(self, event: WatchEvent) -> None:
        for watcher in self._watchers:
            if event.key.startswith(watcher.prefix):
                watcher.queue.put_nowait(event)

    def _remove(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        if item.lease_id is not None:
            self._leases[item.lease_id].keys.discard(key)
        self._notify(WatchEvent(WatchKind.DELETE, key, None))

    def _drop_lease(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        for key in sorted(lease.keys):
            self._remove_unowned(key)

    def _remove_unowned(self, key: str) -> None:
        # The lease is already gone from `_leases`, so skip the per-lease bookkeeping of `_remove`.
        if self._items.pop(key, None) is not None:
            self._notify(WatchEvent(WatchKind.DELETE, key, None))

    def _expire(self) -> None:
        now = self._clock()
        for lease_id in [lid for lid, lease in self._leases.items() if lease.deadline <= now]:
            self._drop_lease(lease_id)

    def _ensure_expiry_task(self) -> None:
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(
                self._expiry_loop(), name="memory-store-expiry"
            )

    async def _expiry_loop(self) -> None:
        while True:
            self._expire()
            deadline = min((lease.deadline for lease in self._leases.values()), default=None)
            self._leases_changed.clear()
            if deadline is None:
                await self._leases_changed.wait()
                continue
            # Wakes at the deadline (then `_expire` drops the lease unless it was kept alive) or
            # early when a new lease may have an earlier deadline.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - self._clock(), 0.0)):
                    await self._leases_changed.wait()
