"""Replica sync on the router side: peers' routing lifecycle counts as load, and goes away again."""

import random

import pytest

from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.router_events import (
    Finished,
    PrefillDone,
    ReplicaState,
    Routed,
    RouterEvent,
    RouterSyncBatch,
)
from turbine.router.base import Decision
from turbine.router.kv_router import KvRouter, KvRouterSettings, LoadRouter
from turbine.router.peers import PeerRequests, peer_key

pytestmark = pytest.mark.unit

BS = 4
PROMPT = list(range(41))  # 10 full blocks + a 1-token tail


def _cards(*workers: int) -> dict[int, ModelDeploymentCard]:
    return {
        w: ModelDeploymentCard("m", "/x", "ns", "c", "e", w, kv_block_size=BS, total_kv_blocks=1000)
        for w in workers
    }


def _req(rid: str, tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", tokens, SamplingOptions(), StopConditions(max_tokens=4))


class _Pair:
    """Two KV router replicas wired to each other by hand (what ReplicaSync does over a plane)."""

    def __init__(self) -> None:
        self.a = KvRouter(KvRouterSettings(), random.Random(0))
        self.b = KvRouter(KvRouterSettings(), random.Random(1))
        self.from_a: list[RouterEvent] = []
        self.from_b: list[RouterEvent] = []
        for router, out in ((self.a, self.from_a), (self.b, self.from_b)):
            router.update_instances(_cards(1, 2, 3))
            router.sync_with_peers(out.append, expiry_s=5.0)

    def deliver(self) -> None:
        if self.from_a:
            self.b.apply_peer_batch(RouterSyncBatch(0xA, list(self.from_a)))
            self.from_a.clear()
        if self.from_b:
            self.a.apply_peer_batch(RouterSyncBatch(0xB, list(self.from_b)))
            self.from_b.clear()


def test_lifecycle_events_are_reported_in_order() -> None:
    pair = _Pair()
    decision = pair.a.select(_req("r1", PROMPT), [1, 2, 3])
    pair.a.on_first_token("r1", decision)
    pair.a.on_finish("r1", decision)
    kinds = [type(e) for e in pair.from_a]
    assert kinds == [Routed, PrefillDone, Finished]
    routed = pair.from_a[0]
    assert isinstance(routed, Routed)
    assert (routed.request_id, routed.worker, routed.prefill_tokens, routed.overlap, routed.tail) == (
        "r1",
        decision.instance_id,
        41,
        0,
        1,
    )
    assert len(routed.hashes) == 10
    assert pair.a.own_active() == []


def test_a_peers_requests_count_as_load_until_they_finish() -> None:
    pair = _Pair()
    decision = pair.a.select(_req("r1", PROMPT), [1, 2, 3])
    worker = decision.instance_id
    pair.deliver()
    key = peer_key(0xA, "r1")
    assert pair.b.load.worker_of(key) == worker
    assert pair.b.load.load(worker).active_prefill_tokens == 41
    assert pair.b.active.count(worker) == 11  # 10 computed blocks + the tail
    pair.a.on_first_token("r1", decision)
    pair.deliver()
    assert pair.b.load.load(worker).active_prefill_tokens == 0
    pair.a.on_finish("r1", decision)
    pair.deliver()
    assert len(pair.b.load) == 0
    assert len(pair.b.active) == 0
    assert pair.b.peers is not None and len(pair.b.peers) == 0


def test_the_second_replica_sends_the_same_new_prefix_to_the_same_worker() -> None:
    """Without sync, replica b knows nothing of a's just-routed prefix and, all being idle, may
    pick any worker; with sync the blocks a's request is computing count on a's worker before any
    KV event."""
    pair = _Pair()
    first = pair.a.select(_req("r1", PROMPT), [1, 2, 3])
    pair.deliver()
    second = pair.b.select(_req("r2", [*PROMPT[:40], 7]), [1, 2, 3])
    assert second.instance_id == first.instance_id
    assert second.overlap_blocks == 10


def test_with_kv_events_a_peers_placement_stays_out_of_the_routing_history() -> None:
    """Each replica follows the workers' real events; only its own placements go in its history.
    Without events the peers' placements are the only cache model, so they are recorded."""
    pair = _Pair()
    worker = pair.a.select(_req("r1", PROMPT), [1, 2, 3]).instance_id
    pair.deliver()
    assert pair.b.pending.blocks_of(worker) == []
    assert pair.b.active.count(worker) == 11

    a = KvRouter(KvRouterSettings(use_kv_events=False), random.Random(0))
    b = KvRouter(KvRouterSettings(use_kv_events=False), random.Random(1))
    out: list[RouterEvent] = []
    for router in (a, b):
        router.update_instances(_cards(1, 2, 3))
    a.sync_with_peers(out.append, expiry_s=5.0)
    b.sync_with_peers(lambda _e: None, expiry_s=5.0)
    decision = a.select(_req("r1", PROMPT), [1, 2, 3])
    b.apply_peer_batch(RouterSyncBatch(0xA, out))
    assert len(b.approx.blocks_of(decision.instance_id)) == 10
    assert b.select(_req("r2", [*PROMPT[:40], 7]), [1, 2, 3]).instance_id == decision.instance_id


def test_peer_load_steers_a_replica_away_from_a_busy_worker() -> None:
    pair = _Pair()
    busy = pair.a.select(_req("r1", list(range(1000, 1400))), [1, 2, 3]).instance_id
    pair.deliver()
    # b's own view: everything idle but `busy` carries a's 400-token prefill and 100 blocks.
    others = [w for w in (1, 2, 3) if w != busy]
    assert pair.b.select(_req("r2", list(range(5000, 5040))), [1, 2, 3]).instance_id in others


def test_heartbeat_drops_requests_whose_finish_was_lost() -> None:
    pair = _Pair()
    d1 = pair.a.select(_req("r1", PROMPT), [1, 2, 3])
    pair.a.select(_req("r2", list(range(100, 141))), [1, 2, 3])
    pair.deliver()
    assert len(pair.b.load) == 2
    pair.a.on_finish("r1", d1)
    pair.from_a.clear()  # the Finished is lost (the plane was down)
    pair.b.apply_peer_batch(RouterSyncBatch(0xA, [ReplicaState(pair.a.own_active())]))
    assert len(pair.b.load) == 1
    assert pair.b.load.worker_of(peer_key(0xA, "r2")) is not None


def test_a_silent_replica_is_forgotten() -> None:
    now = [0.0]
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances(_cards(1, 2))
    router.sync_with_peers(lambda e: None, expiry_s=5.0)
    assert router.peers is not None
    router.peers = PeerRequests(5.0, clock=lambda: now[0])
    router.apply_peer_batch(RouterSyncBatch(7, [Routed("x", 1, 10, 0, [11, 12], 0, 1)]))
    assert router.load.load(1).active_requests == 1
    now[0] = 4.0
    assert router.expire_peers() == 0
    now[0] = 5.5
    assert router.expire_peers() == 1
    assert len(router.load) == 0 and len(router.active) == 0


def test_unknown_workers_and_rerouted_requests() -> None:
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances(_cards(1, 2))
    router.sync_with_peers(lambda e: None, expiry_s=5.0)
    router.apply_peer_batch(RouterSyncBatch(7, [Routed("x", 99, 10, 0, [1], 0, 0)]))
    assert len(router.load) == 0  # worker 99 is not ours to count
    router.apply_peer_batch(RouterSyncBatch(7, [Routed("y", 1, 10, 0, [1, 2], 0, 0)]))
    router.apply_peer_batch(RouterSyncBatch(7, [Routed("y", 2, 10, 0, [1, 2], 0, 0)]))  # migrated
    assert router.load.load(1).active_requests == 0
    assert router.load.load(2).active_requests == 1


def test_load_router_shares_its_load_too() -> None:
    a, b = LoadRouter("least-loaded", random.Random(0)), LoadRouter("least-loaded", random.Random(1))
    out: list[RouterEvent] = []
    for r in (a, b):
        r.update_instances(_cards(1, 2))
        r.sync_with_peers(out.append if r is a else (lambda e: None), expiry_s=5.0)
    first = a.select(_req("r1", PROMPT), [1, 2])
    b.apply_peer_batch(RouterSyncBatch(0xA, out))
    assert b.select(_req("r2", PROMPT), [1, 2]) == Decision(3 - first.instance_id)


def test_without_sync_nothing_is_reported_or_applied() -> None:
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances(_cards(1))
    d = router.select(_req("r", PROMPT), [1])
    router.on_finish("r", d)
    router.apply_peer_batch(RouterSyncBatch(7, [Routed("x", 1, 10, 0, [1], 0, 0)]))
    assert len(router.load) == 0 and router.own_active() == []
