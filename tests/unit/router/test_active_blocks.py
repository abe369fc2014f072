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
