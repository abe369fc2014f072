import asyncio
import contextlib

import msgspec
import pytest

from turbine.protocol.kv_events import KvEventBatch, KvStored, LoadMetrics, StoredBlock
from turbine.runtime.events.base import kv_events_subject
from turbine.runtime.events.memory import MemoryEventPlane
from turbine.runtime.events.sink import EventPlaneSink

pytestmark = pytest.mark.unit


async def _take(
    plane: MemoryEventPlane, prefix: str, n: int, ready: asyncio.Event
) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    async with contextlib.aclosing(plane.subscribe(prefix)) as sub:
        ready.set()
        async for item in sub:
            out.append(item)
            if len(out) == n:
                break
    return out


async def test_prefix_subscriptions_get_matching_messages_in_order() -> None:
    plane = MemoryEventPlane()
    ready_a, ready_b = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(_take(plane, "ns.m.kv_events.", 3, ready_a))
    b = asyncio.create_task(_take(plane, "ns.", 4, ready_b))
    await ready_a.wait()
    await ready_b.wait()
    plane.publish("ns.m.kv_events.1", b"1")
    plane.publish("ns.m.load.1", b"load")
    plane.publish("ns.m.kv_events.1", b"2")
    plane.publish("other.m.kv_events.1", b"x")
    plane.publish("ns.m.kv_events.2", b"3")
    assert [p for _, p in await a] == [b"1", b"2", b"3"]
    assert [p for _, p in await b] == [b"1", b"load", b"2", b"3"]
    await plane.close()


async def test_slow_subscriber_loses_oldest_not_newest() -> None:
    plane = MemoryEventPlane(max_pending=3)
    ready = asyncio.Event()
    task = asyncio.create_task(_take(plane, "s", 3, ready))
    await ready.wait()
    for i in range(5):
        plane.publish("s", bytes([i]))
    assert [p for _, p in await task] == [b"\x02", b"\x03", b"\x04"]


async def test_sink_publishes_decodable_batches() -> None:
    plane = MemoryEventPlane()
    ready = asyncio.Event()
    task = asyncio.create_task(_take(plane, "ns.", 2, ready))
    await ready.wait()
    sink = EventPlaneSink(plane, "ns", "m", 7)
    batch = KvEventBatch(7, 0, [KvStored(None, [StoredBlock(1, 2)])])
    sink.publish_kv_events(batch)
    sink.publish_load(LoadMetrics(7, 1, 10, 0, 1))
    (subject, payload), (_, load) = await task
    assert subject == kv_events_subject("ns", "m", 7)
    assert msgspec.msgpack.decode(payload, type=KvEventBatch) == batch
    assert msgspec.msgpack.decode(load, type=LoadMetrics).kv_blocks_total == 10
