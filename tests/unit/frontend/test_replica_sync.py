"""ReplicaSync over a real (in-process) event plane: two router replicas see each other's load."""

import asyncio
import random

import pytest

from turbine.frontend.replica_sync import ReplicaSync
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.router.kv_router import KvRouter, KvRouterSettings
from turbine.router.peers import peer_key
from turbine.runtime.events.memory import MemoryEventPlane

pytestmark = pytest.mark.unit


def _router(seed: int) -> KvRouter:
    router = KvRouter(KvRouterSettings(), random.Random(seed))
    router.update_instances(
        {
            w: ModelDeploymentCard("m", "/x", "ns", "c", "e", w, kv_block_size=4, total_kv_blocks=100)
            for w in (1, 2)
        }
    )
    return router


def _req(rid: str) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", list(range(17)), SamplingOptions(), StopConditions(max_tokens=4))


async def _until(predicate: object, within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_two_replicas_share_load_and_forget_a_dead_one() -> None:
    plane = MemoryEventPlane()
    a, b = _router(0), _router(1)
    sync_a = ReplicaSync(plane, "ns", "m", 0xA, a, heartbeat_s=0.05, expiry_s=0.3)
    sync_b = ReplicaSync(plane, "ns", "m", 0xB, b, heartbeat_s=0.05, expiry_s=0.3)
    sync_a.start()
    sync_b.start()
    # Both subscriptions are up once each has seen the other's first heartbeat.
    await _until(
        lambda: a.peers is not None and b.peers is not None and bool(a.peers.replicas and b.peers.replicas)
    )

    decision = a.select(_req("r1"), [1, 2])
    await _until(lambda: b.load.worker_of(peer_key(0xA, "r1")) == decision.instance_id)
    assert a.peers is not None and len(a.peers) == 0  # a does not count its own request twice
    a.on_finish("r1", decision)
    await _until(lambda: len(b.load) == 0)

    # a's process "dies" with a request in flight: b stops counting it after the expiry.
    a.select(_req("r2"), [1, 2])
    await _until(lambda: len(b.load) == 1)
    await sync_a.close()
    await _until(lambda: len(b.load) == 0, within_s=3.0)
    assert b.peers is not None and b.peers.replicas == []
    await sync_b.close()
    await plane.close()


async def test_other_models_are_not_mixed_in() -> None:
    plane = MemoryEventPlane()
    a, b = _router(0), _router(1)
    sync_a = ReplicaSync(plane, "ns", "m", 0xA, a, heartbeat_s=0.05)
    sync_b = ReplicaSync(plane, "ns", "other", 0xB, b, heartbeat_s=0.05)
    sync_a.start()
    sync_b.start()
    await asyncio.sleep(0.1)
    a.select(_req("r1"), [1, 2])
    await asyncio.sleep(0.1)
    assert len(b.load) == 0
    assert b.peers is not None and b.peers.replicas == []
    await sync_a.close()
    await sync_b.close()
    await plane.close()
