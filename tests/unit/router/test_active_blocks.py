import random

import pytest

from turbine.router.active_blocks import ActiveBlocks

pytestmark = pytest.mark.unit


def test_shared_prefix_blocks_count_once() -> None:
    active = ActiveBlocks()
    active.add("a", 1, [10, 11, 12], 1)
    active.add("b", 1, [10, 11, 13], 1)
    assert active.count(1) == 4 + 2
    assert active.new_blocks(1, [10, 11, 14]) == 1
    assert active.new_blocks(2, [10, 11, 14]) == 3
    active.remove("a")
    assert active.count(1) == 3 + 1
    active.remove("b")
    assert active.count(1) == 0


def test_readding_an_id_moves_it() -> None:
    active = ActiveBlocks()
    active.add("a", 1, [1, 2], 1)
    active.add("a", 2, [1, 2], 1)
    assert active.count(1) == 0 and active.count(2) == 3
    assert len(active) == 1


def test_no_leaks_after_random_lifecycles() -> None:
    rng = random.Random(0)
    active = ActiveBlocks()
    live: list[str] = []
    for i in range(1000):
        rid = f"r{i}"
        prefix = rng.randrange(5)
        active.add(
            rid, rng.randrange(4), [prefix * 100 + k for k in range(rng.randrange(1, 6))], rng.randrange(3)
        )
        live.append(rid)
        if rng.random() < 0.6:
            active.remove(live.pop(rng.randrange(len(live))))
        if rng.random() < 0.1:
            active.remove("unknown")
    for rid in live:
        active.remove(rid)
        active.remove(rid)
    assert len(active) == 0
    assert all(active.count(w) == 0 for w in range(4))
    assert active._refs == {} and active._private == {}


def test_a_request_that_allocates_nothing_outlives_the_others() -> None:
    # A fully cached, block-aligned prompt computes no block and has no tail: it counts nothing, and
    # the worker's tables may go away with the last request that counted something.
    active = ActiveBlocks()
    active.add("counted", 1, [10, 11], 1)
    active.add("free", 1, [], 0)
    active.remove("counted")
    assert active.count(1) == 0
    active.remove("free")
    assert len(active) == 0
    assert active.count(1) == 0
    active.add("again", 1, [10], 0)
    assert active.count(1) == 1


def test_extend_prefixes_follows_the_blocks_in_flight_from_where_the_cache_ends() -> None:
    active = ActiveBlocks()
    active.add("a", 1, [12, 13, 14], 0)  # computing blocks 2..4 of the chain 10..15
    active.add("b", 2, [10, 11], 0)
    chain = [10, 11, 12, 13, 14, 15]
    # Worker 1 caches blocks 0-1: its in-flight request takes it to 5; worker 2 computes 0-1.
    assert active.extend_prefixes(chain, {}, {1: 2}) == {1: 5, 2: 2}
    # A run that does not start where the prefix ends does not count (block 2 is not in flight).
    assert active.extend_prefixes(chain, {}, {}) == {2: 2}
    scores = {1: 5}
    assert active.extend_prefixes(chain, scores, {1: 2, 2: 2}) is scores  # nothing to raise
    assert active.extend_prefixes([], {}, {}) == {}
