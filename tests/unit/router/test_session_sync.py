"""Session bindings on the replica-sync wire: the encoding, and routers ignoring them."""

import msgspec
import pytest

from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.router_events import ReplicaState, Routed, RouterSyncBatch, SessionBound
from turbine.router.kv_router import KvRouter, KvRouterSettings

pytestmark = pytest.mark.unit


def test_session_bound_round_trips_beside_other_events() -> None:
    batch = RouterSyncBatch(7, [SessionBound("conv-1", 0xABC), ReplicaState(["r1"])])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=RouterSyncBatch)
    assert decoded == batch


def test_kv_router_ignores_session_events_and_keeps_peer_requests() -> None:
    router = KvRouter(KvRouterSettings())
    router.update_instances({1: ModelDeploymentCard("m", "/x", "ns", "c", "e", 1, kv_block_size=4)})
    router.sync_with_peers(lambda event: None, expiry_s=5.0)

    router.apply_peer_batch(RouterSyncBatch(9, [Routed("r", 1, 8, 0, [11, 12], 0, 0)]))
    router.apply_peer_batch(RouterSyncBatch(9, [SessionBound("conv-1", 1)]))
    # A session event is not a heartbeat: the peer's request still counts.
    assert router.load.active_requests(1) == 1
