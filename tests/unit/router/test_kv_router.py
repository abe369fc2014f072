import logging
import random

import pytest

from turbine.errors import ServiceUnavailable
from turbine.kv.hashing import block_hashes
from turbine.protocol.kv_events import KvDump, KvEventBatch, KvStored, StoredBlock
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.router.base import Decision
from turbine.router.kv_router import KvRouter, KvRouterSettings, LoadRouter

pytestmark = pytest.mark.unit

BS = 4


def _card(worker: int, block_size: int = BS, blocks: int | None = 1000) -> ModelDeploymentCard:
    return ModelDeploymentCard(
        "m", "/x", "ns", "c", "e", worker, kv_block_size=block_size, total_kv_blocks=blocks
    )


def _req(rid: str, tokens: list[int]) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", tokens, SamplingOptions(), StopConditions(max_tokens=4))


def _stored(worker: int, event_id: int, tokens: list[int]) -> KvEventBatch:
    h = block_hashes(tokens, BS)
    blocks = [StoredBlock(s, t) for s, t in zip(h.sequence, h.local, strict=True)]
    return KvEventBatch(worker, event_id, [KvStored(None, blocks)])


def _router(**kw: object) -> KvRouter:
    router = KvRouter(KvRouterSettings(**kw), random.Random(0))  # type: ignore[arg-type]
    router.update_instances({1: _card(1), 2: _card(2), 3: _card(3)})
    return router


PROMPT = list(range(40))


def test_routes_to_the_worker_holding_the_prefix() -> None:
    router = _router()
    assert router.apply_kv_events(_stored(2, 0, PROMPT[:32])) is False
    decision = router.select(_req("a", [*PROMPT, 99]), [1, 2, 3])
    assert decision == Decision(2, 8)


def test_event_gap_is_reported_and_a_dump_resyncs() -> None:
    router = _router()
    assert router.apply_kv_events(_stored(3, 5, PROMPT[:8])) is True
    hashes = block_hashes(PROMPT[:32], BS).sequence
    assert router.load_kv_dump(KvDump(3, hashes, 6, BS)) is False
    assert router.select(_req("a", PROMPT), [1, 2, 3]).instance_id == 3


def test_unknown_workers_events_are_ignored() -> None:
    router = _router()
    assert router.apply_kv_events(_stored(9, 0, PROMPT)) is False
    assert router.index.workers() == []


def test_a_burst_of_one_new_prefix_stays_together_before_events_arrive() -> None:
    router = _router()
    first = router.select(_req("a", [*PROMPT, 1]), [1, 2, 3])
    second = router.select(_req("b", [*PROMPT, 2]), [1, 2, 3])
    assert second.instance_id == first.instance_id
    assert second.overlap_blocks == 10


def test_load_spreads_cold_requests_and_nothing_leaks() -> None:
    router = _router()
    rng = random.Random(1)
    decisions = []
    for i in range(30):
        prompt = [rng.randrange(1000) for _ in range(40)]
        decisions.append((f"r{i}", router.select(_req(f"r{i}", prompt), [1, 2, 3])))
    assert {d.instance_id for _, d in decisions} == {1, 2, 3}
    for rid, decision in decisions:
        router.on_first_token(rid, decision)
        router.on_finish(rid, decision)
        router.on_finish(rid, decision)
    assert dict(router.load.loads) == {}
    assert len(router.active) == 0


def test_all_busy_is_a_503() -> None:
    router = _router(active_prefill_tokens_threshold=10)
    router.select(_req("a", list(range(100))), [1])
    with pytest.raises(ServiceUnavailable, match="busy"):
        router.select(_req("b", list(range(200, 300))), [1])
    # Another worker still has room.
    assert router.select(_req("c", list(range(400, 500))), [1, 2]).instance_id == 2


def test_approximate_mode_learns_from_its_own_decisions() -> None:
    router = _router(use_kv_events=False)
    first = router.select(_req("a", PROMPT), [1, 2, 3])
    router.on_finish("a", first)
    again = router.select(_req("b", [*PROMPT[:36], 7, 7, 7, 7]), [1, 2, 3])
    assert again.instance_id == first.instance_id and again.overlap_blocks == 9


def test_block_size_mismatch_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    router = KvRouter(KvRouterSettings(block_size_override=8))
    with caplog.at_level(logging.WARNING):
        router.update_instances({1: _card(1, block_size=16)})
    assert "KV ROUTING IS DEGRADED" in caplog.text
    assert router.block_size == 8


def test_departed_workers_are_forgotten() -> None:
    router = _router()
    router.apply_kv_events(_stored(2, 0, PROMPT))
    router.select(_req("a", PROMPT), [1, 2, 3])
    router.update_instances({1: _card(1), 3: _card(3)})
    assert 2 not in router.index.workers()
    assert router.select(_req("b", PROMPT), [1, 3]).instance_id in (1, 3)


def test_least_loaded_and_power_of_two_balance_active_requests() -> None:
    for mode in ("least-loaded", "power-of-two"):
        router = LoadRouter(mode, random.Random(0))
        router.update_instances({1: _card(1), 2: _card(2)})
        picks = [router.select(_req(f"r{i}", PROMPT), [1, 2]).instance_id for i in range(10)]
        assert sorted(picks.count(w) for w in (1, 2)) == [5, 5], mode
        for i, w in enumerate(picks):
            router.on_finish(f"r{i}", Decision(w))
        assert dict(router.load.loads) == {}


def test_many_workers_are_shortlisted_without_changing_the_choice() -> None:
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances({w: _card(w) for w in range(1, 101)})
    router.apply_kv_events(_stored(77, 0, PROMPT))
    assert router.select(_req("a", [*PROMPT, 5]), list(range(1, 101))) == Decision(77, 10)
    # Load every worker but one: a cold prompt goes to the idle one.
    for w in range(1, 101):
        if w != 42:
            router.load.add_request(f"busy-{w}", w, 10_000, 500)
    cold = [9000 + i for i in range(40)]
    assert router.select(_req("b", cold), list(range(1, 101))).instance_id == 42


def test_a_prefix_the_routing_history_pushed_out_is_not_trusted_from_events() -> None:
    """Events say what a worker holds now; requests routed since will evict before this one runs."""
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances({1: _card(1, blocks=12), 2: _card(2, blocks=12)})
    first = router.select(_req("a", PROMPT), [1])
    router.on_finish("a", first)
    assert router.apply_kv_events(_stored(1, 0, PROMPT[:32])) is False
    assert router.select(_req("b", PROMPT), [1]).overlap_blocks == 10  # history: all 10 blocks
    router.on_finish("b", Decision(1, 10))
    # Two other 10-block prompts go to worker 1: its 12-block cache cannot also keep PROMPT's.
    for rid, start in (("c", 1000), ("d", 2000)):
        router.on_finish(rid, router.select(_req(rid, list(range(start, start + 40))), [1]))
    assert router.index.find_matches(block_hashes(PROMPT, BS).sequence).scores == {1: 8}
    assert router.select(_req("e", PROMPT), [1]).overlap_blocks == 0


def test_blocks_known_only_from_events_are_trusted() -> None:
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances({1: _card(1, blocks=12), 2: _card(2, blocks=12)})
    assert router.apply_kv_events(_stored(2, 0, PROMPT[:32])) is False
    for rid, start in (("c", 1000), ("d", 2000)):
        router.on_finish(rid, router.select(_req(rid, list(range(start, start + 40))), [2]))
    assert router.select(_req("e", PROMPT), [1, 2]) == Decision(2, 8)


def _busy_holder(other_requests: int) -> KvRouter:
    """Worker 1 caches PROMPT's 10 blocks (events) and decodes `other_requests` other 10-block
    prompts; worker 2 is idle."""
    router = KvRouter(KvRouterSettings(), random.Random(0))
    router.update_instances({1: _card(1), 2: _card(2)})
    assert router.apply_kv_events(_stored(1, 0, PROMPT)) is False
    for i in range(other_requests):
        rid = f"other-{i}"
        decision = router.select(_req(rid, list(range(1000 * (i + 1), 1000 * (i + 1) + 40))), [1])
        router.on_first_token(rid, decision)
    return router


def test_a_prefix_stays_with_its_worker_through_a_burst_of_other_prefixes() -> None:
    # Holder: 0.25 prefill + 31 decode blocks. Idle worker: 10.25 prefill + 11 decode, plus 2 x 10
    # for copying a prefix another worker caches (without that term, 21.25 < 31.25 would move it).
    assert _busy_holder(3).select(_req("p", [*PROMPT, 99]), [1, 2]) == Decision(1, 10)


def test_a_prefix_moves_when_its_worker_is_busy_enough() -> None:
    # Six other requests: 61.25 on the holder against 41.25 for a copy.
    assert _busy_holder(6).select(_req("p", [*PROMPT, 99]), [1, 2]) == Decision(2, 0)
