"""ReplicaSync over a real (in-process) event plane: two router replicas see each other's load."""

import asyncio
import random
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import msgspec
import pytest

from tests.waiting import wait_for
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.router_events import Finished, Routed, RouterSyncBatch
from turbine.router.kv_router import KvRouter, KvRouterSettings, LoadRouter
from turbine.router.peers import peer_key
from turbine.router.replica_sync import FLUSH_S, MAX_BATCH_BYTES, ReplicaSync
from turbine.runtime.events.local_channel import RECEIVE_EVERY_S, local_plane, prepare_channel
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


async def test_two_replicas_share_load_and_forget_a_dead_one() -> None:
    plane = MemoryEventPlane()
    a, b = _router(0), _router(1)
    sync_a = ReplicaSync(plane, "ns", "m", 0xA, a, heartbeat_s=0.05, expiry_s=0.3)
    sync_b = ReplicaSync(plane, "ns", "m", 0xB, b, heartbeat_s=0.05, expiry_s=0.3)
    sync_a.start()
    sync_b.start()
    # Both subscriptions are up once each has seen the other's first heartbeat.
    await wait_for(
        lambda: a.peers is not None and b.peers is not None and bool(a.peers.replicas and b.peers.replicas)
    )

    decision = a.select(_req("r1"), [1, 2])
    await wait_for(lambda: b.load.worker_of(peer_key(0xA, "r1")) == decision.instance_id)
    assert a.peers is not None and len(a.peers) == 0  # a does not count its own request twice
    a.on_finish("r1", decision)
    await wait_for(lambda: len(b.load) == 0)

    # a's process "dies" with a request in flight: b stops counting it after the expiry.
    a.select(_req("r2"), [1, 2])
    await wait_for(lambda: len(b.load) == 1)
    await sync_a.close()
    await wait_for(lambda: len(b.load) == 0, timeout=3.0)
    assert b.peers is not None and b.peers.replicas == []
    await sync_b.close()
    await plane.close()


async def test_other_models_are_not_mixed_in() -> None:
    plane = MemoryEventPlane()
    a, a2, b, b2 = _router(0), _router(1), _router(2), _router(3)
    syncs = [
        ReplicaSync(plane, "ns", model, replica_id, router, heartbeat_s=0.05)
        for model, replica_id, router in (
            ("m", 0xA, a),
            ("m", 0xA2, a2),
            ("other", 0xB, b),
            ("other", 0xB2, b2),
        )
    ]
    for sync in syncs:
        sync.start()
    # Every subscription is up once each replica has heard the other one of its model.
    await wait_for(lambda: all(r.peers is not None and r.peers.replicas for r in (a, a2, b, b2)))
    decision = a.select(_req("r1"), [1, 2])
    await wait_for(lambda: a2.load.worker_of(peer_key(0xA, "r1")) == decision.instance_id)  # it is out
    b2.select(_req("r2"), [1, 2])
    # b reads its messages in order: once it has b2's, it has read whatever came before.
    await wait_for(lambda: len(b.load) == 1)
    assert b.load.worker_of(peer_key(0xA, "r1")) is None
    assert b.peers is not None and b.peers.replicas == [0xB2]
    for sync in syncs:
        await sync.close()
    await plane.close()


class _Recorder:
    """An event plane that only records what is published (no subscriber)."""

    def __init__(self) -> None:
        self.sent: list[RouterSyncBatch] = []

    def publish(self, subject: str, payload: bytes) -> None:
        self.sent.append(msgspec.msgpack.decode(payload, type=RouterSyncBatch))

    async def subscribe(self, prefix: str, on_live: object = None) -> AsyncGenerator[tuple[str, bytes], None]:
        await asyncio.Event().wait()
        yield ("", b"")  # pragma: no cover

    async def close(self) -> None:
        pass


async def test_a_burst_is_one_message_per_interval_with_steps_merged() -> None:
    plane = _Recorder()
    a = _router(0)
    sync = ReplicaSync(plane, "ns", "m", 0xA, a, heartbeat_s=60, flush_s=0.05)
    sync.start()
    await wait_for(lambda: plane.sent)
    plane.sent.clear()  # the first heartbeat
    decisions = {rid: a.select(_req(rid), [1, 2]) for rid in ("r1", "r2", "r3")}
    a.on_first_token("r1", decisions["r1"])  # merged into r1's Routed: no prefill left to count
    a.on_finish("r2", decisions["r2"])  # a KV request's Routed stays: peers record its blocks
    await asyncio.sleep(0)  # what is sent at once (not after the interval) would be out now
    assert plane.sent == []
    await wait_for(lambda: plane.sent)
    (batch,) = plane.sent
    kinds = [(type(e).__name__, getattr(e, "request_id", None)) for e in batch.events]
    assert kinds == [("Routed", "r1"), ("Routed", "r2"), ("Routed", "r3"), ("Finished", "r2")]
    first = batch.events[0]
    assert isinstance(first, Routed) and first.prefill_tokens == 0
    # In a later batch, a PrefillDone of a request routed earlier travels on its own; a Finished
    # then makes it moot.
    a.on_first_token("r3", decisions["r3"])
    a.on_finish("r3", decisions["r3"])
    await wait_for(lambda: len(plane.sent) == 2)
    assert [type(e) for e in plane.sent[1].events] == [Finished]
    await sync.close()


async def test_a_load_only_request_routed_and_finished_within_an_interval_is_not_sent() -> None:
    plane = _Recorder()
    router = LoadRouter("least-loaded", random.Random(0))
    router.update_instances(
        {w: ModelDeploymentCard("m", "/x", "ns", "c", "e", w, kv_block_size=4) for w in (1, 2)}
    )
    sync = ReplicaSync(plane, "ns", "m", 0xA, router, heartbeat_s=60, flush_s=0.05)
    sync.start()
    await wait_for(lambda: plane.sent)
    plane.sent.clear()  # the first heartbeat
    short = router.select(_req("short"), [1, 2])
    long = router.select(_req("long"), [1, 2])
    router.on_first_token("short", short)
    router.on_finish("short", short)
    await wait_for(lambda: plane.sent)
    (batch,) = plane.sent
    assert [(type(e), e.request_id) for e in batch.events if isinstance(e, Routed)] == [(Routed, "long")]
    assert len(batch.events) == 1
    router.on_finish("long", long)
    await sync.close()  # sends what is pending at once
    assert [type(e) for e in plane.sent[-1].events] == [Finished]


async def test_a_request_in_flight_in_one_process_is_seen_by_its_sibling_within_the_interval(
    tmp_path: Path,
) -> None:
    """Over the real local channel of --num-processes: two planes, two routers."""
    prepare_channel(tmp_path)
    plane_a, plane_b = await local_plane(tmp_path), await local_plane(tmp_path)
    a, b = _router(0), _router(1)
    sync_a = ReplicaSync(plane_a, "ns", "m", 0xA, a, heartbeat_s=0.05)
    sync_b = ReplicaSync(plane_b, "ns", "m", 0xB, b, heartbeat_s=0.05)
    sync_a.start()
    sync_b.start()
    try:
        await wait_for(
            lambda: (
                a.peers is not None and b.peers is not None and bool(a.peers.replicas and b.peers.replicas)
            )
        )
        for i in range(5):
            rid = f"r{i}"
            start = time.monotonic()
            decision = a.select(_req(rid), [1, 2])
            routed_to = decision.instance_id
            await wait_for(lambda: b.load.worker_of(peer_key(0xA, rid)) == routed_to, 1.0)  # noqa: B023 - used at once
            seen_after = time.monotonic() - start
            # The flush interval plus the receive interval, and some slack for a busy machine.
            assert seen_after < FLUSH_S + RECEIVE_EVERY_S + 0.1, seen_after
            a.on_finish(rid, decision)
            await wait_for(lambda: len(b.load) == 0, timeout=1.0)
    finally:
        await sync_a.close()
        await sync_b.close()
        await plane_a.close()
        await plane_b.close()


async def test_a_large_batch_is_sent_without_waiting_out_the_interval() -> None:
    plane = _Recorder()
    a = _router(0)
    sync = ReplicaSync(plane, "ns", "m", 0xA, a, heartbeat_s=60, flush_s=60)
    sync.start()
    await asyncio.sleep(0)
    for i in range(400):  # about 84 bytes each: one batch fills up on the way
        a.select(_req(f"r{i}"), [1, 2])
    assert len(plane.sent) == 1
    assert 0 < len(msgspec.msgpack.encode(plane.sent[0])) <= MAX_BATCH_BYTES + 256
    await sync.close()
    assert sum(isinstance(e, Routed) for b in plane.sent for e in b.events) == 400
