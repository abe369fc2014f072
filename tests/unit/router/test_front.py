"""Routing around the router, in process: readiness, direct mode, hard/soft affinity, the queue."""

from __future__ import annotations

import asyncio
import random

import pytest

from turbine.errors import NotFound, ServiceUnavailable
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.router_events import RouterEvent, RouterSyncBatch, SessionBound
from turbine.router.affinity import AffinitySettings
from turbine.router.front import RouteHints, Routing, RoutingSettings
from turbine.router.kv_router import LoadRouter
from turbine.router.queue import QueueSettings
from turbine.router.simple import DirectRouter, RoundRobinRouter

pytestmark = pytest.mark.unit


def _cards(*workers: int) -> dict[int, ModelDeploymentCard]:
    return {
        w: ModelDeploymentCard("m", "/x", "ns", "c", "e", w, kv_block_size=4, max_num_batched_tokens=100)
        for w in workers
    }


def _req(rid: str, tokens: int = 10) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", list(range(tokens)), SamplingOptions(), StopConditions(max_tokens=4))


async def test_not_ready_until_min_initial_workers_then_stays_ready() -> None:
    routing = Routing("m", RoundRobinRouter(), RoutingSettings(min_initial_workers=2))
    routing.update_instances(_cards(1))
    with pytest.raises(ServiceUnavailable, match="waiting for 2 worker"):
        await routing.route(_req("a"), RouteHints(), lambda: [1])
    routing.update_instances(_cards(1, 2))
    routing.update_instances(_cards(2))  # readiness is reached once, not lost when one leaves
    assert (await routing.route(_req("b"), RouteHints(), lambda: [2])).instance_id == 2


async def test_direct_mode_routes_to_the_named_worker_only() -> None:
    routing = Routing("m", DirectRouter(), RoutingSettings(direct=True))
    routing.update_instances(_cards(1, 2))
    assert (await routing.route(_req("a"), RouteHints(instance_id=2), lambda: [1, 2])).instance_id == 2
    for hints in (RouteHints(), RouteHints(instance_id=3)):
        with pytest.raises(NotFound) as err:
            await routing.route(_req("b"), hints, lambda: [1, 2])
        assert err.value.code == "worker_instance_not_found"
    # The named worker already failed this request: a retriable 503, not a 404.
    with pytest.raises(ServiceUnavailable):
        await routing.route(_req("c"), RouteHints(instance_id=2), lambda: [1])


async def test_sessions_stick_and_are_announced_once() -> None:
    announced: list[RouterEvent] = []
    routing = Routing("m", RoundRobinRouter(), RoutingSettings(affinity=AffinitySettings(60.0, "hard")))
    routing.announce_with(announced.append)
    routing.update_instances(_cards(1, 2, 3))
    first = (await routing.route(_req("a"), RouteHints("s"), lambda: [1, 2, 3])).instance_id
    for i in range(5):
        await routing.route(_req(f"x{i}"), RouteHints(), lambda: [1, 2, 3])  # others move round-robin on
        assert (await routing.route(_req(f"s{i}"), RouteHints("s"), lambda: [1, 2, 3])).instance_id == first
    assert announced == [SessionBound("s", first)]
    # Its worker failed this request (excluded) or left: the session rebinds.
    others = [w for w in (1, 2, 3) if w != first]
    moved = (await routing.route(_req("r"), RouteHints("s"), lambda: others)).instance_id
    assert moved in others and announced[-1] == SessionBound("s", moved)
    routing.update_instances({w: c for w, c in _cards(1, 2, 3).items() if w != moved})
    assert routing.sessions is not None and routing.sessions.lookup("s") is None


async def test_peer_bindings_are_adopted() -> None:
    routing = Routing("m", RoundRobinRouter(), RoutingSettings(affinity=AffinitySettings(60.0)))
    routing.update_instances(_cards(1, 2, 3))
    routing.apply_peer_batch(RouterSyncBatch(99, [SessionBound("s", 3)]))
    for i in range(3):
        assert (await routing.route(_req(f"s{i}"), RouteHints("s"), lambda: [1, 2, 3])).instance_id == 3


def _busy_world(mode: str) -> tuple[Routing, LoadRouter]:
    router = LoadRouter("least-loaded", random.Random(0))
    settings = RoutingSettings(
        queue=QueueSettings(threshold=0.5), affinity=AffinitySettings(60.0, mode)
    )  # busy above 50 prefill tokens
    routing = Routing("m", router, settings)
    routing.update_instances(_cards(1, 2))
    return routing, router


async def test_soft_affinity_leaves_a_busy_worker_and_hard_affinity_waits_for_it() -> None:
    for mode in ("soft", "hard"):
        routing, router = _busy_world(mode)
        first = await routing.route(_req("a", 10), RouteHints("s"), lambda: [1, 2])
        home = first.instance_id
        routing.finish("a", first)
        assert len(router.load) == 0
        big = await routing.route(_req("big", 80), RouteHints("s"), lambda: [1, 2])
        assert big.instance_id == home  # not busy yet; now 80 > 50 prefill tokens there
        waiter = asyncio.create_task(routing.route(_req("next", 10), RouteHints("s"), lambda: [1, 2]))
        await asyncio.sleep(0)
        if mode == "soft":
            assert waiter.done() and waiter.result().instance_id != home
        else:
            assert not waiter.done()
            assert routing.queue is not None and len(routing.queue) == 1
            routing.first_token("big", big)  # prefill done: the worker is free again
            assert (await waiter).instance_id == home
