"""`--router-replica-sync`: share one model's routing load between frontends over the event plane.

Each frontend (replica) publishes its router's lifecycle events — routed, prefill done, finished —
on `{namespace}.{model}.router.{replica_id:x}`, batched per event-loop turn, plus a heartbeat with
its active request ids every `heartbeat_s`. It applies every other replica's events to its own
router, which counts them as load under replica-scoped keys (router/peers.py). The event plane must
reach every frontend (NATS); a peer silent for `expiry_s` is presumed dead and its load dropped.
Session-affinity bindings travel the same way (`publish`, `on_batch`); a router that counts no load
(round-robin with session affinity) shares only those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import msgspec

from turbine.protocol.router_events import ReplicaState, RouterEvent, RouterSyncBatch
from turbine.runtime.events.base import EventPlane, model_subject_prefix

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(RouterSyncBatch).decode


def router_sync_prefix(namespace: str, model: str) -> str:
    """Where one model's replicas publish: `{ns}.{model}.router.`, names escaped for every plane."""
    return f"{model_subject_prefix(namespace, model)}router."


class SyncedRouter(Protocol):
    """What replica sync needs from a router (KvRouter and LoadRouter provide it)."""

    def sync_with_peers(self, listener: Callable[[RouterEvent], None], expiry_s: float) -> None: ...

    def own_active(self) -> list[str]: ...

    def apply_peer_batch(self, batch: RouterSyncBatch) -> None: ...

    def expire_peers(self) -> int: ...


class ReplicaSync:
    """Owns one model router's sync: the outgoing batches, the subscription and the heartbeat."""

    def __init__(
        self,
        plane: EventPlane,
        namespace: str,
        model: str,
        replica_id: int,
        router: SyncedRouter | None,
        *,
        on_batch: Callable[[RouterSyncBatch], None] | None = None,
        heartbeat_s: float = 1.0,
        expiry_s: float = 5.0,
    ) -> None:
        self._plane = plane
        self._prefix = router_sync_prefix(namespace, model)
        self._subject = f"{self._prefix}{replica_id:x}"
        self._replica_id = replica_id
        self._router = router
        self._on_batch = on_batch
        self._heartbeat_s = heartbeat_s
        self._expiry_s = expiry_s
        self._pending: list[RouterEvent] = []
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._router is not None:
            self._router.sync_with_peers(self._enqueue, self._expiry_s)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"replica-sync-{self._subject}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def publish(self, event: RouterEvent) -> None:
        """Tell the peers (batched with the router's own events)."""
        self._enqueue(event)

    def _enqueue(self, event: RouterEvent) -> None:
        # Many requests are routed and finished per loop turn under load: one message per turn.
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            events, self._pending = self._pending, []
            self._plane.publish(self._subject, _encode(RouterSyncBatch(self._replica_id, events)))

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow())
            tg.create_task(self._heartbeat())

    async def _follow(self) -> None:
        own = self._subject
        async with contextlib.aclosing(self._plane.subscribe(self._prefix)) as messages:
            async for subject, payload in messages:
                if subject == own:
                    continue
                try:
                    batch = _decode(payload)
                except msgspec.DecodeError as exc:
                    log.warning("ignoring a malformed router sync message on %s: %s", subject, exc)
                    continue
                if self._router is not None:
                    self._router.apply_peer_batch(batch)
                if self._on_batch is not None:
                    self._on_batch(batch)

    async def _heartbeat(self) -> None:
        if self._router is None:
            return
        while True:
            self._enqueue(ReplicaState(self._router.own_active()))
            dropped = self._router.expire_peers()
            if dropped:
                log.info("dropped %d request(s) of silent router replicas", dropped)
            await asyncio.sleep(self._heartbeat_s)
