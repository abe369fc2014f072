"""The router queue: admission while a worker is free, policy order, bounds, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from turbine.errors import ServiceUnavailable
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.router.base import Decision
from turbine.router.queue import QueueFull, QueueSettings, RouterQueue

pytestmark = pytest.mark.unit


def _req(rid: str, tokens: int = 4) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", list(range(tokens)), SamplingOptions(), StopConditions(max_tokens=4))


class _World:
    """One or more workers, each busy while it holds `capacity` requests or more."""

    def __init__(self, workers: Sequence[int] = (1,), capacity: int = 1) -> None:
        self.workers = list(workers)
        self.capacity = capacity
        self.active: dict[str, int] = {}
        self.order: list[str] = []
        self.abandoned: list[str] = []

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        worker = min(candidates, key=lambda w: sum(1 for x in self.active.values() if x == w))
        self.active[request.request_id] = worker
        self.order.append(request.request_id)
        return Decision(worker)

    def busy(self, worker: int) -> bool:
        return sum(1 for w in self.active.values() if w == worker) >= self.capacity

    def abandon(self, request_id: str, decision: Decision) -> None:
        self.abandoned.append(request_id)
        self.active.pop(request_id, None)


def _queue(world: _World, policy: str = "fcfs", max_queued: int = 16) -> RouterQueue:
    return RouterQueue(QueueSettings(0.5, policy, max_queued), world.select, world.busy, world.abandon)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_free_worker_routes_at_once_and_busy_ones_queue() -> None:
    world = _World()
    now = [0.0]
    queue = RouterQueue(QueueSettings(0.5), world.select, world.busy, world.abandon, clock=lambda: now[0])
    first = await queue.route(_req("a"), lambda: world.workers, lambda: 4)
    assert first == Decision(1)
    waiting = asyncio.create_task(queue.route(_req("b"), lambda: world.workers, lambda: 4))
    await _settle()
    assert not waiting.done() and len(queue) == 1
    now[0] += 0.3
    world.active.pop("a")
    queue.pump()
    assert await waiting == Decision(1)
    assert len(queue) == 0
    # One routed at once (0 s), one after 0.3 s: in the (0.25, 0.5] bucket.
    assert queue.waits.count == 2 and queue.waits.total_s == pytest.approx(0.3)
    assert queue.waits.bucket_counts[0] == 1 and queue.waits.bucket_counts[7] == 1


@pytest.mark.parametrize(("policy", "expected"), [("fcfs", ["long", "short"]), ("wspt", ["short", "long"])])
async def test_policy_orders_the_waiters(policy: str, expected: list[str]) -> None:
    world = _World()
    queue = _queue(world, policy)
    await queue.route(_req("busy"), lambda: world.workers, lambda: 1)
    work = {"long": 5000, "short": 10}
    tasks = [
        asyncio.create_task(queue.route(_req(name), lambda: world.workers, lambda n=name: work[n]))  # type: ignore[misc]
        for name in ("long", "short")
    ]
    await _settle()
    for _ in range(2):
        world.active.clear()
        queue.pump()
        await _settle()
    await asyncio.gather(*tasks)
    assert world.order == ["busy", *expected]


async def test_full_queue_refuses_with_503() -> None:
    world = _World()
    queue = _queue(world, max_queued=1)
    await queue.route(_req("a"), lambda: world.workers, lambda: 1)
    waiting = asyncio.create_task(queue.route(_req("b"), lambda: world.workers, lambda: 1))
    await _settle()
    with pytest.raises(QueueFull) as err:
        await queue.route(_req("c"), lambda: world.workers, lambda: 1)
    assert err.value.http_status == 503
    waiting.cancel()


async def test_cancelled_waiter_leaves_the_queue() -> None:
    world = _World()
    queue = _queue(world)
    await queue.route(_req("a"), lambda: world.workers, lambda: 1)
    waiting = asyncio.create_task(queue.route(_req("b"), lambda: world.workers, lambda: 1))
    await _settle()
    assert len(queue) == 1
    waiting.cancel()
    await _settle()
    assert len(queue) == 0
    world.active.clear()
    queue.pump()
    assert world.order == ["a"]


async def test_waiter_cancelled_right_after_routing_undoes_the_routing() -> None:
    world = _World()
    queue = _queue(world)
    await queue.route(_req("a"), lambda: world.workers, lambda: 1)
    waiting = asyncio.create_task(queue.route(_req("b"), lambda: world.workers, lambda: 1))
    await _settle()
    world.active.clear()
    queue.pump()  # routes b ...
    waiting.cancel()  # ... whose client left in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert world.abandoned == ["b"] and "b" not in world.active


async def test_waiters_fail_when_every_worker_is_gone() -> None:
    world = _World()
    queue = _queue(world)
    await queue.route(_req("a"), lambda: world.workers, lambda: 1)
    waiting = asyncio.create_task(queue.route(_req("b"), lambda: world.workers, lambda: 1))
    await _settle()
    world.workers = []
    queue.pump()
    with pytest.raises(ServiceUnavailable):
        await waiting


async def test_a_waiter_narrowed_to_a_busy_worker_does_not_block_the_rest() -> None:
    world = _World(workers=(1, 2))
    queue = _queue(world)
    await queue.route(_req("a"), lambda: world.workers, lambda: 1)
    await queue.route(_req("b"), lambda: world.workers, lambda: 1)
    pinned = asyncio.create_task(queue.route(_req("pinned"), lambda: [1], lambda: 1, restricted=True))
    free = asyncio.create_task(queue.route(_req("free"), lambda: world.workers, lambda: 1))
    await _settle()
    world.active.pop("b")  # worker 2 frees up; worker 1 stays busy
    queue.pump()
    assert await free == Decision(2)
    assert not pinned.done()
    world.active.pop("a")
    queue.pump()
    assert await pinned == Decision(1)
