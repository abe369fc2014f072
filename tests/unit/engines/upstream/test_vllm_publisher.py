"""The subscriber against vLLM's own `ZmqEventPublisher` (exactly what a vLLM server sends).

scripts/test.sh installs `vllm==0.33.0` with --no-deps (its requirements pin a CUDA torch) and the dev
extra holds what its publisher imports, so this runs in CI on a CPU torch; it skips where vllm is
not installed. The same cases run without vLLM against test_subscriber.py's publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.unit.engines.upstream.publisher import free_endpoint
from turbine.engines.upstream.kv_codec import EngineEventBatch
from turbine.engines.upstream.rekey import Rekeyer
from turbine.engines.upstream.subscriber import KvEventSubscriber
from turbine.kv.hashing import block_hashes

kv_events: Any = pytest.importorskip("vllm.distributed.kv_events")

pytestmark = pytest.mark.integration

TOKENS = list(range(700, 732))
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
        return set(self.ranks[rank].cached()) if rank in self.ranks else set()


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(sub: KvEventSubscriber) -> AsyncIterator[None]:
    task = asyncio.create_task(sub.run())
    try:
        await asyncio.wait_for(sub.connected.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def stored(hashes: list[Any], parent: Any, first: int) -> Any:
    tokens = TOKENS[first * 8 : (first + len(hashes)) * 8]
    return kv_events.BlockStored(hashes, parent, tokens, 8, None, "GPU", None)


def batch(events: list[Any], rank: int = 0) -> Any:
    return kv_events.KVEventBatch(time.time(), events, rank)


async def test_vllm_publisher_stored_removed_cleared_gap_and_replay() -> None:
    endpoint, replay = free_endpoint(), free_endpoint()
    pub = kv_events.ZmqEventPublisher(0, endpoint.replace("127.0.0.1", "*"), replay.replace("127.0.0.1", "*"))
    consumer = Consumer()
    # Published before anyone listens: recovered by the replay at start.
    pub.publish(batch([stored([b"\x01" * 32, b"\x02" * 32], None, 0)]))
    sub = KvEventSubscriber(
        endpoint, replay_endpoint=replay, on_batch=consumer.on_batch, on_reset=consumer.on_reset
    )
    try:
        await until(lambda: len(pub._buffer) == 1)
        async with running(sub):
            assert consumer.cached() == set(SEQ[:2])
            pub.publish(batch([stored([b"\x03" * 32], b"\x02" * 32, 2)]))
            await until(lambda: consumer.cached() == set(SEQ[:3]))
        # Missed while the subscriber was away; the next run fills the gap by replay.
        pub.publish(batch([stored([b"\x04" * 32], b"\x03" * 32, 3)]))
        pub.publish(batch([kv_events.BlockRemoved([b"\x01" * 32], "GPU")]))
        # vLLM publishes from its own thread: wait until both are in its replay buffer, or the
        # replay at start can miss them while the live socket is still joining (and no later
        # batch would reveal the gap).
        await until(lambda: len(pub._buffer) == 4)
        async with running(sub):
            await until(lambda: consumer.cached() == set(SEQ[1:]))
            pub.publish(batch([kv_events.AllBlocksCleared()]))
            await until(lambda: consumer.cached() == set())
        assert consumer.resets == [] and sub.stats.malformed == 0 and sub.stats.replayed >= 3
    finally:
        pub.shutdown()


async def test_vllm_publisher_two_dp_ranks() -> None:
    endpoint = free_endpoint()
    base = endpoint.replace("127.0.0.1", "*")
    # vLLM's rank r binds the endpoint's port + r.
    pubs = [kv_events.ZmqEventPublisher(r, base) for r in (0, 1)]
    port = int(endpoint.rsplit(":", 1)[1])
    consumer = Consumer()
    subs = [
        KvEventSubscriber(
            f"tcp://127.0.0.1:{port + r}", on_batch=consumer.on_batch, on_reset=consumer.on_reset, rank=r
        )
        for r in (0, 1)
    ]
    try:
        async with running(subs[0]), running(subs[1]):
            deadline = time.monotonic() + 10
            # Slow joiner: publish until each rank's blocks arrive.
            while consumer.cached(0) != set(SEQ[:2]) or consumer.cached(1) != {SEQ[0]}:
                assert time.monotonic() < deadline
                pubs[0].publish(batch([stored([1, 2], None, 0)], rank=0))
                pubs[1].publish(batch([stored([9], None, 0)], rank=1))
                await asyncio.sleep(0.05)
    finally:
        for p in pubs:
            p.shutdown()
