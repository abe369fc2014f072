"""`--router-replica-sync`: share one model's routing load between frontends over the event plane.

Each frontend (replica) publishes its router's lifecycle events — routed, prefill done, finished —
on `{namespace}.{model}.router.{replica_id:x}`, batched over `flush_s` (5 ms), plus a heartbeat
with its active request ids every `heartbeat_s`. Every replica hears every other, so with N of
them each message is received N-1 times, and every message costs each receiver a wake-up: batching
over an interval bounds the messages a replica sends to 1/flush_s a second, however busy it is,
for a delay of at most `flush_s` in what its peers see. Within a batch, steps that change nothing a
peer would see are merged away (see `_merge`). It applies every other replica's events to its own
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

from turbine.protocol.router_events import (
    Finished,
    PrefillDone,
    ReplicaState,
    Routed,
    RouterEvent,
    RouterSyncBatch,
)
from turbine.runtime.events.base import EventPlane, model_subject_prefix

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(RouterSyncBatch).decode

FLUSH_S = 0.005
"""How long a replica's events wait to be sent together (the most its peers' view lags behind)."""
MAX_BATCH_BYTES = 32 << 10
"""A batch about this large is sent at once, without waiting out the interval (bounds one message's
size: the local channel takes at most 128 KiB)."""


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
        flush_s: float = FLUSH_S,
    ) -> None:
        if flush_s < 0:
            raise ValueError(f"flush_s must be >= 0, got {flush_s}")
        self._plane = plane
        self._prefix = router_sync_prefix(namespace, model)
        self._subject = f"{self._prefix}{replica_id:x}"
        self._replica_id = replica_id
        self._router = router
        self._on_batch = on_batch
        self._heartbeat_s = heartbeat_s
        self._expiry_s = expiry_s
        self._flush_s = flush_s
        self._pending: list[RouterEvent | None] = []
        """The next batch; None where an event was merged away."""
        self._pending_bytes = 0
        self._slots: dict[str, int] = {}
        """request id -> index in `_pending` of its latest Routed or PrefillDone, while mergeable."""
        self._flush: asyncio.Handle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._router is not None:
            self._router.sync_with_peers(self._enqueue, self._expiry_s)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"replica-sync-{self._subject}")

    async def close(self) -> None:
        self._send()  # what is still pending, so peers need not wait for the expiry to drop it
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def publish(self, event: RouterEvent) -> None:
        """Tell the peers (batched with the router's own events)."""
        self._enqueue(event)

    def _enqueue(self, event: RouterEvent) -> None:
        if not self._merge(event):
            self._pending.append(event)
            # About its msgpack size: 9 bytes a hash, a few dozen for the rest.
            self._pending_bytes += 48 + 9 * len(event.hashes) if isinstance(event, Routed) else 48
        if self._pending_bytes >= MAX_BATCH_BYTES:
            self._send()
        elif self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = (
                loop.call_later(self._flush_s, self._send) if self._flush_s else loop.call_soon(self._send)
            )

    def _merge(self, event: RouterEvent) -> bool:
        """Fold `event` into the pending batch where peers would see the same; True if it is then
        not to be appended. A PrefillDone of a request routed in this batch becomes its Routed's
        zero prefill; a Finished makes a pending PrefillDone moot; and a request of a load-only
        router (no block hashes, so nothing for a peer's cache model) that is routed and finished
        within one batch is never sent at all. A request routed twice in one batch (a retry) is
        left alone."""
        pending, slots = self._pending, self._slots
        if isinstance(event, Routed):
            if slots.pop(event.request_id, None) is None:
                slots[event.request_id] = len(pending)
            return False
        if isinstance(event, PrefillDone):
            i = slots.get(event.request_id)
            if i is not None:
                earlier = pending[i]
                if isinstance(earlier, Routed):
                    pending[i] = msgspec.structs.replace(earlier, prefill_tokens=0)
                    return True
            slots[event.request_id] = len(pending)
            return False
        if isinstance(event, Finished):
            i = slots.pop(event.request_id, None)
            if i is None:
                return False
            earlier = pending[i]
            if isinstance(earlier, PrefillDone):
                pending[i] = None
            elif isinstance(earlier, Routed) and not earlier.hashes:
                pending[i] = None
                return True
        return False

    def _send(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        events = [e for e in self._pending if e is not None]
        self._pending = []
        self._pending_bytes = 0
        self._slots.clear()
        if events:
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
