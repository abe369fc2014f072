"""The KV-event subscriber against a real ZMQ PUB + ROUTER publisher on loopback.

ZMQ's slow joiner loses what a PUB sends before the subscription reaches it; the subscriber's
replay-from-0 at start and replay-on-gap recover those, so tests first `sync` (publish empty
batches until one arrives) and then check what follows. Waits poll with deadlines, never fixed
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from tests.unit.engines.upstream import engine_structs as es
from tests.unit.engines.upstream.publisher import TestPublisher, free_endpoint
from turbine.engines.upstream.kv_codec import EngineEventBatch
from turbine.engines.upstream.rekey import Rekeyer
from turbine.engines.upstream.subscriber import KvEventSubscriber
from turbine.kv.hashing import block_hashes

pytestmark = pytest.mark.integration

TOKENS = list(range(500, 532))
SEQ = block_hashes(TOKENS, 8).sequence


class Consumer:
    def __init__(self) -> None:
        self.ranks: dict[int, Rekeyer] = {}
        self.resets: list[int] = []

    def on_batch(self, batch: EngineEventBatch, rank: int) -> None:
        self.ranks.setdefault(rank, Rekeyer(8)).apply(batch.events)

    def on_reset(self, rank: int) -> None:
        self.resets.append(rank)
        self.ranks.setdefault(rank, Rekeyer(8)).clear()

    def cached(self, rank: int = 0) -> set[int]:
        rk = self.ranks.get(rank)
        return set(rk.cached()) if rk else set()


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(sub: KvEventSubscriber) -> AsyncIterator[KvEventSubscriber]:
    task = asyncio.create_task(sub.run())
    try:
        await asyncio.wait_for(sub.connected.wait(), 10)
        yield sub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def sync(pub: TestPublisher, sub: KvEventSubscriber) -> None:
    """Publish empty batches until the subscriber has applied one (the subscription is live)."""
    deadline = time.monotonic() + 10
    start = sub.stats.batches
    while sub.stats.batches == start:
        assert time.monotonic() < deadline, "subscription never became live"
        await pub.publish(es.map_batch([]))
        await asyncio.sleep(0.02)


def _stored(hashes: list[int | bytes], parent: int | bytes | None, first: int, enc: str = "map") -> bytes:
    return es.batch(enc, [es.stored(enc, hashes, parent, TOKENS[first * 8 : (first + len(hashes)) * 8], 8)])


async def test_stored_removed_cleared_with_parent_chain() -> None:
    pub = TestPublisher(free_endpoint(), free_endpoint())
    consumer = Consumer()
    sub = KvEventSubscriber(
        pub.endpoint,
        replay_endpoint=pub.replay_endpoint,
        on_batch=consumer.on_batch,
        on_reset=consumer.on_reset,
        topic="kv-events",
    )
    try:
        async with running(sub):
            await sync(pub, sub)
            await pub.publish(_stored([b"a", b"b"], None, 0, "array"))
            await pub.publish(_stored([b"c"], b"b", 2))
            await until(lambda: consumer.cached() == set(SEQ[:3]))
            await pub.publish(es.map_batch([es.MapBlockRemoved([b"c"])]))
            await until(lambda: consumer.cached() == set(SEQ[:2]))
            await pub.publish(es.map_batch([es.MapAllBlocksCleared()]))
            await until(lambda: consumer.cached() == set())
            assert sub.stats.gaps == 0 and sub.stats.malformed == 0
    finally:
        await pub.close()


async def test_blocks_cached_before_the_subscriber_came_are_replayed_at_start() -> None:
    pub = TestPublisher(free_endpoint(), free_endpoint())
    await pub.publish(_stored([1, 2], None, 0))
    consumer = Consumer()
    sub = KvEventSubscriber(
        pub.endpoint,
        replay_endpoint=pub.replay_endpoint,
        on_batch=consumer.on_batch,
        on_reset=consumer.on_reset,
    )
    try:
        async with running(sub):
            assert consumer.cached() == set(SEQ[:2])
            assert sub.stats.replayed == 1
    finally:
        await pub.close()


async def test_gap_is_filled_by_replay() -> None:
    pub = TestPublisher(free_endpoint(), free_endpoint())
    consumer = Consumer()
    sub = KvEventSubscriber(
        pub.endpoint,
        replay_endpoint=pub.replay_endpoint,
        on_batch=consumer.on_batch,
        on_reset=consumer.on_reset,
    )
    try:
        async with running(sub):
            await sync(pub, sub)
            await pub.publish(_stored([1], None, 0))
            pub.drop_next = 2  # lost on the wire, still in the engine's replay buffer
            await pub.publish(_stored([2], 1, 1))
            await pub.publish(_stored([3], 2, 2))
            await pub.publish(_stored([4], 3, 3))
            await until(lambda: consumer.cached() == set(SEQ))
            assert sub.stats.gaps == 1 and sub.stats.resets == 0 and consumer.resets == []
    finally:
        await pub.close()


@pytest.mark.parametrize("with_replay", [False, True])
async def test_gap_that_replay_cannot_fill_resets_the_rank(with_replay: bool) -> None:
    pub = TestPublisher(free_endpoint(), free_endpoint() if with_replay else None)
    consumer = Consumer()
    sub = KvEventSubscriber(
        pub.endpoint,
        replay_endpoint=pub.replay_endpoint,
        on_batch=consumer.on_batch,
        on_reset=consumer.on_reset,
    )
    try:
        async with running(sub):
            await sync(pub, sub)
            await pub.publish(_stored([1], None, 0))
            await until(lambda: consumer.cached() == {SEQ[0]})
            pub.drop_next = 1
            await pub.publish(_stored([2], 1, 1))
            pub.forget(len(pub.buffer))  # the engine's buffer no longer reaches back
            # The next block's parent was lost: the rank restarts empty and the orphan is skipped.
            await pub.publish(_stored([3], 2, 2))
            await pub.publish(_stored([9], None, 0))
            await until(lambda: consumer.cached() == {SEQ[0]} and sub.stats.batches >= 3)
            assert consumer.resets == [0] and sub.stats.gaps == 1
            assert consumer.ranks[0].stats.orphans == 1
    finally:
        await pub.close()


async def test_two_dp_ranks_feed_separate_instances() -> None:
    # vLLM's rank r publishes on the endpoint's port + r; each batch also names its rank.
    pubs = [TestPublisher(free_endpoint()), TestPublisher(free_endpoint())]
    consumer = Consumer()
    subs = [
        KvEventSubscriber(p.endpoint, on_batch=consumer.on_batch, on_reset=consumer.on_reset, rank=r)
        for r, p in enumerate(pubs)
    ]
    try:
        async with running(subs[0]), running(subs[1]):
            for p, s in zip(pubs, subs, strict=True):
                await sync(p, s)
            await pubs[0].publish(es.map_batch([es.stored("map", [1, 2], None, TOKENS[:16], 8)], rank=0))
            await pubs[1].publish(es.array_batch([es.stored("array", [7], None, TOKENS[:8], 8)], rank=1))
            await until(lambda: consumer.cached(0) == set(SEQ[:2]) and consumer.cached(1) == {SEQ[0]})
    finally:
        for p in pubs:
            await p.close()


async def test_malformed_frames_are_counted_and_dropped() -> None:
    pub = TestPublisher(free_endpoint())
    consumer = Consumer()
    sub = KvEventSubscriber(pub.endpoint, on_batch=consumer.on_batch, on_reset=consumer.on_reset)
    try:
        async with running(sub):
            await sync(pub, sub)
            seq = pub.seq
            await pub.send_raw([pub.topic])  # too few frames
            await pub.send_raw([pub.topic, b"\x01", b"x"])  # short sequence frame
            await pub.send_raw([pub.topic, (seq).to_bytes(8, "big"), b"\xc1"])  # not msgpack
            await pub.send_raw([pub.topic, (seq + 1).to_bytes(8, "big"), es.map_batch([5])])  # bad event
            pub.seq = seq + 2
            await pub.publish(_stored([1], None, 0))
            await until(lambda: consumer.cached() == {SEQ[0]})
            assert sub.stats.malformed == 4 and sub.stats.gaps == 0
    finally:
        await pub.close()


async def test_sequence_going_back_is_a_restarted_publisher() -> None:
    endpoint = free_endpoint()
    pub = TestPublisher(endpoint)
    consumer = Consumer()
    sub = KvEventSubscriber(endpoint, on_batch=consumer.on_batch, on_reset=consumer.on_reset)
    try:
        async with running(sub):
            pub.seq = 1000
            await sync(pub, sub)
            await pub.publish(_stored([1, 2], None, 0))
            await until(lambda: consumer.cached() == set(SEQ[:2]))
            await pub.close()
            # A new engine process on the same endpoint numbers its batches from 0 again.
            pub = TestPublisher(endpoint)
            deadline = time.monotonic() + 10
            while consumer.cached() != {SEQ[0]}:
                assert time.monotonic() < deadline, consumer.cached()
                await pub.publish(_stored([7], None, 0))
                await asyncio.sleep(0.05)
            assert consumer.resets == [0] and sub.stats.gaps == 0
    finally:
        await pub.close()


async def test_restart_told_by_the_engine_replays_the_new_process_from_zero() -> None:
    endpoint, replay = free_endpoint(), free_endpoint()
    pub = TestPublisher(endpoint, replay)
    consumer = Consumer()
    sub = KvEventSubscriber(
        endpoint, replay_endpoint=replay, on_batch=consumer.on_batch, on_reset=consumer.on_reset
    )
    try:
        async with running(sub):
            await sync(pub, sub)
            await pub.publish(_stored([1, 2], None, 0))
            await until(lambda: consumer.cached() == set(SEQ[:2]))
            await pub.close()
            pub = TestPublisher(endpoint, replay)
            pub.drop_next = 1  # its first batch is lost on the wire (slow joiner)
            await pub.publish(_stored([5], None, 0))
            sub.restart()  # the server answered again after being down
            assert consumer.cached() == set()
            deadline = time.monotonic() + 10
            while consumer.cached() != set(SEQ[:2]):
                assert time.monotonic() < deadline, consumer.cached()
                await pub.publish(_stored([6], 5, 1))
                await asyncio.sleep(0.05)
    finally:
        await pub.close()
