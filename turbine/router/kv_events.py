"""Follow every live worker's KV events and load metrics, into one model's router.

Two sources, one re-sync logic (`_Resync`):
- `RequestPlaneFollowers` (`--event-plane request`): one task per live instance holds a
  `kv_events` stream open to the worker over the request plane.
- `PlaneFollowers` (`--event-plane nats` or `zmq`): one subscription to the model's subjects
  (`{ns}.{model}.`) on the shared event plane carries every worker's events.

Either way a worker's state is re-dumped (`kv_dump`, always over the request plane) when following
starts, whenever the router reports an event-id gap, and, on an event plane, whenever the
subscription resumes after a broker reconnect (messages published meanwhile are lost, and a worker
that published nothing since would never show a gap). Ordering between a dump and the events does
not matter: batches older than the dump are ignored by the index, a newer-than-expected batch is a
gap, and batches that arrive while a dump is awaited are buffered by the index and replayed on it.

Events of workers that are not followed (not live instances of the model yet, or gone) are dropped:
the index must not gain entries nobody removes. A worker's events from before it became live are
covered by the dump taken when following starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import msgspec

from turbine.errors import TurbineError
from turbine.protocol.instance import Instance
from turbine.protocol.kv_events import (
    KV_DUMP_ENDPOINT,
    KV_EVENTS_ENDPOINT,
    KvDump,
    KvEventBatch,
    LoadMetrics,
    WorkerEvent,
)
from turbine.runtime.events.base import (
    KV_EVENTS_KIND,
    LOAD_KIND,
    EventPlane,
    model_subject_prefix,
    subject_kind,
)
from turbine.runtime.transport.base import CallbackClient, RequestPlaneClient

log = logging.getLogger(__name__)

_NIL = msgspec.msgpack.encode(None)
_decode_event = msgspec.msgpack.Decoder(WorkerEvent).decode
_decode_dump = msgspec.msgpack.Decoder(KvDump).decode
_decode_batch = msgspec.msgpack.Decoder(KvEventBatch).decode
_decode_load = msgspec.msgpack.Decoder(LoadMetrics).decode

# Dumps in a row that may still show a gap before the next ones wait `retry_s` apart.
_QUICK_DUMPS = 3


class KvEventConsumer(Protocol):
    def apply_kv_events(self, batch: KvEventBatch) -> bool:
        """Apply a batch; True when it revealed a gap and the worker's state must be re-dumped."""
        ...

    def load_kv_dump(self, dump: KvDump) -> bool:
        """Replace the worker's state; True if buffered batches replayed after it still show a gap."""
        ...

    def apply_load(self, metrics: LoadMetrics) -> None: ...


class EventFollowers(Protocol):
    """What a model pipeline holds: follow exactly the given live instances until closed."""

    def sync(self, instances: dict[int, Instance]) -> None: ...

    async def close(self) -> None: ...


def make_followers(
    client: RequestPlaneClient,
    consumer: KvEventConsumer,
    plane: EventPlane | None,
    namespace: str,
    model: str,
    retry_s: float = 0.5,
) -> EventFollowers:
    """Followers over the shared event plane if there is one, else over the request plane."""
    if plane is None:
        return RequestPlaneFollowers(client, consumer, retry_s)
    return PlaneFollowers(plane, namespace, model, client, consumer, retry_s)


class _Resync:
    """The followed workers, and at most one dump task per worker, retried until a dump leaves no
    gap or the worker is no longer followed."""

    def __init__(self, client: RequestPlaneClient, consumer: KvEventConsumer, retry_s: float) -> None:
        self._client = client
        self._consumer = consumer
        self._retry_s = retry_s
        self.instances: dict[int, Instance] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()

    def follow(self, instance: Instance) -> None:
        self.instances[instance.instance_id] = instance

    def unfollow(self, iid: int) -> None:
        self.instances.pop(iid, None)
        self._again.discard(iid)
        task = self._tasks.pop(iid, None)
        if task is not None:
            task.cancel()

    def request(self, iid: int, *, fresh: bool) -> None:
        """Dump `iid` soon. `fresh`: the dump must be taken from now on (following just started or
        resumed), so one already under way is followed by another. A gap needs no fresh one: its
        batch waits in the index's buffer and the dump under way replays it, or reports a gap."""
        if iid not in self.instances:
            return
        task = self._tasks.get(iid)
        if task is not None and not task.done():
            if fresh:
                self._again.add(iid)
            return
        self._tasks[iid] = asyncio.get_running_loop().create_task(self._run(iid), name=f"kv-dump-{iid:x}")

    def apply(self, kv: KvEventBatch | None, load: LoadMetrics | None) -> None:
        """One message of a followed worker's events."""
        if kv is not None and kv.worker_id in self.instances and self._consumer.apply_kv_events(kv):
            log.info("worker %x: KV event gap, re-syncing from a dump", kv.worker_id)
            self.request(kv.worker_id, fresh=False)
        if load is not None and load.worker_id in self.instances:
            self._consumer.apply_load(load)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self.instances.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, iid: int) -> None:
        behind = 0
        while (instance := self.instances.get(iid)) is not None:
            self._again.discard(iid)
            try:
                caught_up = await self._dump_once(instance)
            except (TurbineError, msgspec.DecodeError) as exc:
                # Unreachable for now (e.g. its request plane is still reconnecting): keep trying
                # while it is followed; discovery ends that when the worker is really gone.
                log.debug("worker %x: KV dump failed: %s", iid, exc)
                await asyncio.sleep(self._retry_s)
                continue
            if caught_up:
                behind = 0
                if iid not in self._again:
                    # Once per followed worker (and per gap): when routing first knows its cache.
                    log.info("worker %x: KV cache state loaded from its dump", iid)
                    return
                continue
            behind += 1
            if behind >= _QUICK_DUMPS:
                if behind == _QUICK_DUMPS:
                    log.warning("worker %x: still missing KV events after %d dumps", iid, behind)
                await asyncio.sleep(self._retry_s)

    async def _dump_once(self, instance: Instance) -> bool:
        """True when the dump, with the batches buffered since the gap replayed on it, has no gap."""
        caught_up = True
        stream = self._client.stream(instance.address, KV_DUMP_ENDPOINT, _NIL)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                for frame in batch:
                    caught_up = not self._consumer.load_kv_dump(_decode_dump(frame))
        return caught_up


class RequestPlaneFollowers:
    """One `kv_events` stream per live instance of one model, over the request plane."""

    def __init__(self, client: RequestPlaneClient, consumer: KvEventConsumer, retry_s: float = 0.5) -> None:
        self._client = client
        self._retry_s = retry_s
        self._resync = _Resync(client, consumer, retry_s)
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def sync(self, instances: dict[int, Instance]) -> None:
        followed = self._resync.instances
        for iid in list(self._tasks):
            if iid not in instances or instances[iid].address != followed[iid].address:
                self._tasks.pop(iid).cancel()
                self._resync.unfollow(iid)
        loop = asyncio.get_running_loop()
        for iid, instance in instances.items():
            if iid not in self._tasks:
                self._resync.follow(instance)
                self._tasks[iid] = loop.create_task(self._follow(instance), name=f"kv-events-{iid:x}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._resync.close()

    async def _follow(self, instance: Instance) -> None:
        iid = instance.instance_id
        while True:
            try:
                # Dump as the stream opens: an event that falls between the dump and the stream's
                # start makes the next batch's id jump, which the index reports as a gap.
                self._resync.request(iid, fresh=True)
                client = self._client
                if isinstance(client, CallbackClient):
                    # Each message applied as it is read: no queue or task wake-up per read.
                    await client.follow(instance.address, KV_EVENTS_ENDPOINT, _NIL, self._on_frame)
                else:
                    stream = client.stream(instance.address, KV_EVENTS_ENDPOINT, _NIL)
                    async with contextlib.aclosing(stream) as batches:
                        async for batch in batches:
                            for frame in batch:
                                self._on_frame(frame)
            except (TurbineError, msgspec.DecodeError) as exc:
                log.debug("worker %x: event stream ended: %s", iid, exc)
            await asyncio.sleep(self._retry_s)

    def _on_frame(self, frame: bytes) -> None:
        event = _decode_event(frame)
        self._resync.apply(event.kv, event.load)


class PlaneFollowers:
    """Every live instance of one model through one subscription on a shared event plane."""

    def __init__(
        self,
        plane: EventPlane,
        namespace: str,
        model: str,
        client: RequestPlaneClient,
        consumer: KvEventConsumer,
        retry_s: float = 0.5,
    ) -> None:
        self._plane = plane
        self._prefix = model_subject_prefix(namespace, model)
        self._retry_s = retry_s
        self._resync = _Resync(client, consumer, retry_s)
        self._live = False
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    def sync(self, instances: dict[int, Instance]) -> None:
        resync = self._resync
        for iid, old in list(resync.instances.items()):
            if iid not in instances or instances[iid].address != old.address:
                resync.unfollow(iid)
        for iid, instance in instances.items():
            if iid not in resync.instances:
                resync.follow(instance)
                # Before the subscription is live, _on_live dumps every followed worker instead.
                if self._live:
                    resync.request(iid, fresh=True)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self._prefix}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._resync.close()

    def _on_live(self) -> None:
        """The subscription (re)started: anything published before may be missing."""
        self._live = True
        self._failures = 0
        for iid in list(self._resync.instances):
            self._resync.request(iid, fresh=True)

    async def _run(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(
                    self._plane.subscribe(self._prefix, self._on_live)
                ) as messages:
                    async for subject, payload in messages:
                        self._on_message(subject, payload)
                return  # the plane was closed
            except Exception as exc:
                # The broker is unreachable (at start-up: nats-py retries by itself only after a
                # first connect succeeded). Routing goes on from the router's own history.
                self._failures += 1
                if self._failures == 1:
                    log.warning("cannot follow KV events on %s: %s; retrying", self._prefix, exc)
            finally:
                self._live = False
            await asyncio.sleep(self._retry_s)

    def _on_message(self, subject: str, payload: bytes) -> None:
        kind = subject_kind(subject)
        try:
            if kind == KV_EVENTS_KIND:
                self._resync.apply(_decode_batch(payload), None)
            elif kind == LOAD_KIND:
                self._resync.apply(None, _decode_load(payload))
            # Other subjects under the model's prefix (e.g. router replica sync) are not ours.
        except msgspec.DecodeError as exc:
            log.warning("ignoring a malformed event on %s: %s", subject, exc)
