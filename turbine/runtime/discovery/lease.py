"""LeaseKeeper: one process's lease, kept alive, and its keys kept registered.

A lease can be lost while the process lives: the process was frozen (GC pause, SIGSTOP, an overloaded
host) past its TTL, or the store dropped it. Every frontend has then seen the process's keys vanish,
so the keeper grants a new lease and puts every key again rather than leaving a healthy worker
invisible until it restarts.
"""

from __future__ import annotations

import asyncio
import logging

from turbine.runtime.discovery.base import Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Owns one lease on `store` and the keys put through it.

    Lifecycle: `start(ttl)` grants the lease and starts the keep-alive task (one tick every ttl/3);
    `revoke()` stops the task and revokes the lease, which deletes every key at once. `put` and
    `delete` are serialized with re-registration, so a key put while the lease is being replaced ends
    up under the new lease. Keys attached to the lease must go through the keeper, or they are not
    re-put after a loss.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._ttl = 0.0
        self._lease_id: int | None = None
        self._keys: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        # Serializes put/delete/revoke with re-registration, so no key is put under a stale lease.
        self._lock = asyncio.Lock()
        # True from granting a replacement lease until every key is on it; a failed re-put is retried.
        self._reputting = False
        self._regrants = 0
        self._regranted = asyncio.Condition()

    @property
    def lease_id(self) -> int:
        """The current lease (it changes when the keeper re-registers)."""
        if self._lease_id is None:
            raise RuntimeError("LeaseKeeper is not started")
        return self._lease_id

    @property
    def regrants(self) -> int:
        """How many times the lease was lost and every key re-registered under a new one."""
        return self._regrants

    async def wait_for_regrants(self, count: int) -> None:
        """Returns once `regrants >= count`."""
        async with self._regranted:
            await self._regranted.wait_for(lambda: self._regrants >= count)

    async def start(self, ttl: float) -> None:
        if self._task is not None:
            raise RuntimeError("LeaseKeeper already started")
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        self._ttl = ttl
        self._lease_id = await self._store.grant_lease(ttl)
        self._task = asyncio.get_running_loop().create_task(
            self._keep_alive_loop(), name=f"lease-keeper-{self._lease_id:x}"
        )

    async def put(self, key: str, value: bytes) -> None:
        """Put `key` under the lease and remember it for re-registration."""
        async with self._lock:
            lease_id = self.lease_id
            self._keys[key] = value
            try:
                await self._store.put(key, value, lease_id)
            except LookupError:
                # The lease died before the keep-alive task noticed: re-register now (this key too).
                await self._reregister(lease_id)

    async def delete(self, key: str) -> None:
        async with self._lock:
            self._keys.pop(key, None)
            await self._store.delete(key)

    async def revoke(self) -> None:
        """Stop keeping the lease alive and revoke it: every key vanishes for every watcher at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait rather than awaiting the task: our own cancellation must still propagate.
            await asyncio.wait({task})
        async with self._lock:
            lease_id, self._lease_id = self._lease_id, None
            self._keys.clear()
            if lease_id is not None:
                await self._store.revoke(lease_id)

    async def _keep_alive_loop(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick()
            except Exception:
                # The store may be briefly unreachable; the next tick retries, well within the TTL.
                log.warning("lease keep-alive failed; retrying in %.2fs", interval, exc_info=True)

    async def _tick(self) -> None:
        lease_id = self.lease_id
        alive = await self._store.keep_alive(lease_id)
        if alive and not self._reputting:
            return
        async with self._lock:
            if self._lease_id != lease_id:
                return  # a put() re-registered while we waited for the lock
            if alive:
                await self._reput_all(lease_id)  # finish an interrupted re-registration
            else:
                await self._reregister(lease_id)

    async def _reregister(self, lost: int) -> None:
        """Grant a replacement for lease `lost` and re-put every key. Caller holds `_lock`."""
        new = await self._store.grant_lease(self._ttl)
        self._lease_id = new
        self._reputting = True
        log.warning(
            "discovery lease %x was lost (expired or revoked); re-registering %d key(s) under lease %x",
            lost,
            len(self._keys),
            new,
        )
        await self._reput_all(new)

    async def _reput_all(self, lease_id: int) -> None:
        for key, value in list(self._keys.items()):
            await self._store.put(key, value, lease_id)
        self._reputting = False
        self._regrants += 1
        async with self._regranted:
            self._regranted.notify_all()
