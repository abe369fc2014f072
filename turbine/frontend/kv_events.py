"""Follow every live worker's KV events and load metrics over the request plane.

For each instance of a model routed with KV events, one task holds a `kv_events` stream open to
the worker and feeds what arrives into the model's router. It asks for a full dump (`kv_dump`)
when it starts following and whenever the router reports an event-id gap, so a router that missed
events (frontend started late, worker restarted, a dropped connection) converges to the worker's
real cache. Ordering between the dump and the stream does not matter: batches older than the dump
are ignored by the index and a newer-than-expected batch is a gap, which asks for another dump.
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
from turbine.runtime.transport.base import RequestPlaneClient

log = logging.getLogger(__name__)

_NIL = msgspec.msgpack.encode(None)
_decode_event = msgspec.msgpack.Decoder(WorkerEvent).decode
_decode_dump = msgspec.msgpack.Decoder(KvDump).decode


class _StillBehind(Exception):
    """The dump was older than events already seen: take another."""


class KvEventConsumer(Protocol):
    def apply_kv_events(self, batch: KvEventBatch) -> bool:
        """Apply a batch; True when it revealed a gap and the worker's state must be re-dumped."""
        ...

    def load_kv_dump(self, dump: KvDump) -> bool:
        """Replace the worker's state; True if buffered batches replayed after it still show a gap."""
        ...

    def apply_load(self, metrics: LoadMetrics) -> None: ...


class EventFollowers:
    """Owns one follower task per live instance of one model."""

    def __init__(self, client: RequestPlaneClient, consumer: KvEventConsumer, retry_s: float = 0.5) -> None:
        self._client = client
        self._consumer = consumer
        self._retry_s = retry_s
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._addresses: dict[int, str] = {}

    def sync(self, instances: dict[int, Instance]) -> None:
        for iid in list(self._tasks):
            if iid not in instances or instances[iid].address != self._addresses.get(iid):
                self._tasks.pop(iid).cancel()
                self._addresses.pop(iid, None)
        loop = asyncio.get_running_loop()
        for iid, instance in instances.items():
            if iid not in self._tasks:
                self._addresses[iid] = instance.address
                self._tasks[iid] = loop.create_task(self._follow(instance), name=f"kv-events-{iid:x}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dump(self, instance: Instance) -> None:
        for _ in range(3):
            try:
                await self._dump_once(instance)
                return
            except _StillBehind:
                continue
        log.warning("worker %x: still missing KV events after 3 dumps", instance.instance_id)

    async def _dump_once(self, instance: Instance) -> None:
        stream = self._client.stream(instance.address, KV_DUMP_ENDPOINT, _NIL)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                for frame in batch:
                    if self._consumer.load_kv_dump(_decode_dump(frame)):
                        raise _StillBehind()

    async def _follow(self, instance: Instance) -> None:
        consumer = self._consumer
        while True:
            try:
                # Dump first, then subscribe: an event that falls between the two makes the next
                # batch's id jump, which the index reports as a gap, which asks for another dump.
                await self._dump(instance)
                stream = self._client.stream(instance.address, KV_EVENTS_ENDPOINT, _NIL)
                async with contextlib.aclosing(stream) as batches:
                    async for batch in batches:
                        for frame in batch:
                            event = _decode_event(frame)
                            if event.kv is not None and consumer.apply_kv_events(event.kv):
                                log.info(
                                    "worker %x: KV event gap, re-syncing from a dump", instance.instance_id
                                )
                                await self._dump(instance)
                            if event.load is not None:
                                consumer.apply_load(event.load)
            except (TurbineError, msgspec.DecodeError) as exc:
                log.debug("worker %x: event stream ended: %s", instance.instance_id, exc)
            await asyncio.sleep(self._retry_s)
