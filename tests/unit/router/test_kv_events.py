"""Following workers' KV events from an event plane into a KvRouter: dump at start, gaps, unknown
workers, and (against a real nats-server) re-sync after the broker restarts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Callable

import msgspec
import pytest

from tests.nats_server import NatsServer
from turbine.errors import WorkerUnreachable
from turbine.protocol.instance import Instance
from turbine.protocol.kv_events import (
    KV_DUMP_ENDPOINT,
    KvDump,
    KvEventBatch,
    KvStored,
    LoadMetrics,
    StoredBlock,
)
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.router.kv_events import PlaneFollowers, RequestPlaneFollowers, make_followers
from turbine.router.kv_router import KvRouter, KvRouterSettings
from turbine.runtime.events.base import EventPlane
from turbine.runtime.events.memory import MemoryEventPlane
from turbine.runtime.events.nats import NatsEventPlane
from turbine.runtime.events.sink import EventPlaneSink
from turbine.runtime.lifecycle import Closing

NS, MODEL, BLOCK = "ns", "org/model-1.5", 4
_encode = msgspec.msgpack.encode


class FakeWorkers(Closing):
    """The request plane as the followers use it: `kv_dump` answers each worker's current cache."""

    def __init__(self) -> None:
        self.cache: dict[int, tuple[list[int], int]] = {}  # worker -> (block hashes, next event id)
        self.dumps: list[int] = []
        self.down: set[int] = set()

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        assert endpoint == KV_DUMP_ENDPOINT
        worker = int(address, 16)
        self.dumps.append(worker)
        if worker in self.down:
            raise WorkerUnreachable(f"worker {address} is down")
        blocks, next_id = self.cache.get(worker, ([], 0))
        yield [_encode(KvDump(worker, list(blocks), next_id, BLOCK))]

    async def close(self) -> None:
        pass


def _router(workers: list[int]) -> KvRouter:
    router = KvRouter(KvRouterSettings(), random.Random(0))
    _set_workers(router, workers)
    return router


def _set_workers(router: KvRouter, workers: list[int]) -> dict[int, Instance]:
    router.update_instances(
        {
            w: ModelDeploymentCard(MODEL, "/x", NS, "c", "e", w, kv_block_size=BLOCK, total_kv_blocks=100)
            for w in workers
        }
    )
    return {w: Instance(NS, "c", "e", w, "tcp", f"{w:x}") for w in workers}


def _stored(worker: int, event_id: int, *hashes: int) -> KvEventBatch:
    return KvEventBatch(worker, event_id, [KvStored(None, [StoredBlock(h, h) for h in hashes])])


async def _until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _blocks(router: KvRouter, worker: int) -> set[int]:
    return set(router.index.blocks_of(worker))


@pytest.mark.unit
async def test_plane_followers_dump_at_start_then_apply_events_and_ignore_unknown_workers() -> None:
    plane = MemoryEventPlane()
    fake = FakeWorkers()
    fake.cache[1] = ([10, 11], 5)  # worker 1 ran before this frontend saw it
    router = _router([1, 2])
    followers = make_followers(fake, router, plane, NS, MODEL, retry_s=0.01)
    assert isinstance(followers, PlaneFollowers)
    followers.sync(_set_workers(router, [1, 2]))
    await _until(lambda: sorted(fake.dumps) == [1, 2])
    assert _blocks(router, 1) == {10, 11}

    sink1 = EventPlaneSink(plane, NS, MODEL, 1)
    sink1.publish_kv_events(_stored(1, 5, 12))
    EventPlaneSink(plane, NS, MODEL, 2).publish_kv_events(_stored(2, 0, 20))
    # Worker 3 registered but is not a live instance here yet: its events must leave no trace.
    EventPlaneSink(plane, NS, MODEL, 3).publish_kv_events(_stored(3, 0, 30))
    EventPlaneSink(plane, NS, MODEL, 3).publish_load(LoadMetrics(3, 1, 100, 0, 1))
    # Another model's events on the same plane are not this router's.
    EventPlaneSink(plane, NS, "org/model-1", 1).publish_kv_events(_stored(1, 6, 99))
    sink1.publish_load(LoadMetrics(1, 7, 100, 0, 1))
    await _until(lambda: 1 in router.worker_load)
    assert _blocks(router, 1) == {10, 11, 12}
    assert _blocks(router, 2) == {20}
    assert 3 not in router.index.workers() and 3 not in router.worker_load
    assert router.worker_load[1].kv_blocks_used == 7
    assert sorted(fake.dumps) == [1, 2]  # contiguous events ask for nothing more

    # Worker 3 becomes live: one dump covers what it did before.
    fake.cache[3] = ([30], 1)
    followers.sync(_set_workers(router, [1, 2, 3]))
    await _until(lambda: _blocks(router, 3) == {30})
    assert fake.dumps.count(3) == 1
    await followers.close()
    await plane.close()


@pytest.mark.unit
async def test_a_gap_re_syncs_that_worker_only_and_a_gone_worker_is_dropped() -> None:
    plane = MemoryEventPlane()
    fake = FakeWorkers()
    router = _router([1, 2])
    followers = make_followers(fake, router, plane, NS, MODEL, retry_s=0.01)
    followers.sync(_set_workers(router, [1, 2]))
    await _until(lambda: len(fake.dumps) == 2)
    sink = EventPlaneSink(plane, NS, MODEL, 1)
    sink.publish_kv_events(_stored(1, 0, 10))
    await _until(lambda: _blocks(router, 1) == {10})
    # Events 1 and 2 were lost: event 3 is a gap, and the worker's dump is the truth.
    fake.cache[1] = ([10, 11, 12, 13], 4)
    sink.publish_kv_events(_stored(1, 3, 13))
    await _until(lambda: _blocks(router, 1) == {10, 11, 12, 13})
    assert sorted(fake.dumps) == [1, 1, 2]
    sink.publish_kv_events(_stored(1, 4, 14))
    await _until(lambda: 14 in _blocks(router, 1))

    # Worker 1 leaves discovery: its late events are ignored, nothing is dumped for it.
    followers.sync(_set_workers(router, [2]))
    sink.publish_kv_events(_stored(1, 9, 19))
    EventPlaneSink(plane, NS, MODEL, 2).publish_kv_events(_stored(2, 0, 20))
    await _until(lambda: _blocks(router, 2) == {20})
    assert 1 not in router.index.workers()
    assert sorted(fake.dumps) == [1, 1, 2]
    await followers.close()
    await plane.close()


@pytest.mark.unit
async def test_an_unreachable_worker_is_dumped_again_until_it_answers() -> None:
    plane = MemoryEventPlane()
    fake = FakeWorkers()
    fake.down.add(1)
    fake.cache[1] = ([10], 3)
    router = _router([1])
    followers = make_followers(fake, router, plane, NS, MODEL, retry_s=0.01)
    followers.sync(_set_workers(router, [1]))
    await _until(lambda: len(fake.dumps) >= 3)
    assert _blocks(router, 1) == set()
    fake.down.clear()
    await _until(lambda: _blocks(router, 1) == {10})
    await followers.close()
    await plane.close()


@pytest.mark.unit
def test_without_a_plane_followers_use_the_request_plane() -> None:
    followers = make_followers(FakeWorkers(), _router([1]), None, NS, MODEL)
    assert isinstance(followers, RequestPlaneFollowers)


# ------------------------------------------------------------------- real broker restarts


@pytest.mark.integration
async def test_after_a_nats_restart_every_followed_worker_is_re_dumped(nats_server: NatsServer) -> None:
    worker_plane, frontend_plane = NatsEventPlane(nats_server.url), NatsEventPlane(nats_server.url)
    await worker_plane.start()
    planes: list[EventPlane] = [worker_plane, frontend_plane]
    fake = FakeWorkers()
    router = _router([1, 2])
    followers = make_followers(fake, router, frontend_plane, NS, MODEL, retry_s=0.01)
    try:
        followers.sync(_set_workers(router, [1, 2]))
        await _until(lambda: len(fake.dumps) == 2)
        EventPlaneSink(worker_plane, NS, MODEL, 1).publish_kv_events(_stored(1, 0, 10))
        await _until(lambda: _blocks(router, 1) == {10})

        await asyncio.to_thread(nats_server.stop)
        # While NATS is down worker 1 evicts everything and stores a new block; those events are
        # lost with the broker, and it publishes nothing after: no later event reveals the gap.
        fake.cache[1] = ([50], 3)
        fake.cache[2] = ([60], 1)
        await asyncio.to_thread(nats_server.start)
        await _until(lambda: _blocks(router, 1) == {50} and _blocks(router, 2) == {60}, within=10)
        assert sorted(fake.dumps) == [1, 1, 2, 2]
        # And events flow again on the resumed subscription.
        EventPlaneSink(worker_plane, NS, MODEL, 1).publish_kv_events(_stored(1, 3, 51))
        await _until(lambda: _blocks(router, 1) == {50, 51}, within=10)
    finally:
        await followers.close()
        for plane in planes:
            await plane.close()
