import random

import pytest

from turbine.router.approx_index import ApproxIndex
from turbine.router.radix_index import OverlapScores

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(ttl_s: float = 120.0, capacity: dict[int, int] | None = None) -> tuple[ApproxIndex, FakeClock]:
    clock = FakeClock()
    return ApproxIndex(ttl_s=ttl_s, clock=clock, capacity_blocks=capacity), clock


def test_recorded_requests_are_matched_by_longest_prefix() -> None:
    index, _ = make()
    index.record(1, [10, 11, 12])
    index.record(2, [10, 20])
    assert index.find_matches([10, 11, 12, 13]) == OverlapScores({1: 3, 2: 1}, {1: 3, 2: 2})
    assert index.find_matches([10, 20]).scores == {1: 1, 2: 2}
    assert index.find_matches([99]).scores == {}


def test_entries_expire_after_the_ttl() -> None:
    index, clock = make(ttl_s=120.0)
    index.record(1, [1, 2])
    clock.now = 119.9
    assert index.find_matches([1, 2]).scores == {1: 2}
    clock.now = 120.0
    assert index.find_matches([1, 2]) == OverlapScores({}, {1: 0})
    assert index.blocks_of(1) == []


def test_re_recording_refreshes_only_the_blocks_recorded_again() -> None:
    index, clock = make(ttl_s=120.0)
    index.record(1, [1, 2, 3])
    clock.now = 60.0
    index.record(1, [1, 2])
    clock.now = 130.0  # block 3 (recorded at 0) expired, 1 and 2 (refreshed at 60) live until 180
    assert index.find_matches([1, 2, 3]).scores == {1: 2}
    assert index.blocks_of(1) == [2, 1]
    clock.now = 180.0
    assert index.find_matches([1, 2, 3]).scores == {}


def test_expiry_is_per_worker() -> None:
    index, clock = make(ttl_s=10.0)
    index.record(1, [1])
    clock.now = 5.0
    index.record(2, [1])
    clock.now = 12.0
    assert index.find_matches([1]).scores == {2: 1}
    clock.now = 15.0
    assert index.find_matches([1]).scores == {}


def test_capacity_drops_least_recently_recorded_blocks_tail_first() -> None:
    index, _ = make(capacity={1: 4})
    index.record(1, [1, 2, 3])
    index.record(1, [7, 8])
    # Five blocks over a capacity of four: the oldest request loses its deepest block first.
    assert sorted(index.blocks_of(1)) == [1, 2, 7, 8]
    assert index.find_matches([1, 2, 3]).scores == {1: 2}
    index.record(1, [1, 2])  # refreshed: now 7 and 8 are the oldest
    index.record(1, [5])
    assert sorted(index.blocks_of(1)) == [1, 2, 5, 7]
    assert index.find_matches([7, 8]).scores == {1: 1}


def test_a_request_larger_than_capacity_keeps_its_prefix() -> None:
    index, _ = make(capacity={1: 2})
    index.record(1, [1, 2, 3, 4])
    assert index.find_matches([1, 2, 3, 4]) == OverlapScores({1: 2}, {1: 2})


def test_capacity_only_limits_the_worker_it_names() -> None:
    index, _ = make(capacity={1: 1})
    index.record(1, [1, 2])
    index.record(2, [1, 2])
    assert index.find_matches([1, 2]).scores == {1: 1, 2: 2}


def test_set_capacity_evicts_at_once_and_none_lifts_it() -> None:
    index, _ = make()
    index.record(1, [1, 2, 3])
    index.set_capacity(1, 1)
    assert index.blocks_of(1) == [1]
    index.set_capacity(1, None)
    index.record(1, [1, 2, 3])
    assert index.find_matches([1, 2, 3]).scores == {1: 3}
    with pytest.raises(ValueError):
        index.set_capacity(1, -1)


def test_remove_worker_keeps_other_workers_blocks() -> None:
    index, _ = make()
    index.record(1, [1, 2])
    index.record(2, [1])
    index.remove_worker(1)
    assert index.find_matches([1, 2]) == OverlapScores({2: 1}, {2: 1})
    index.record(3, [1, 2])  # reuses worker 1's slot
    assert index.find_matches([1, 2]).scores == {2: 1, 3: 2}
    index.remove_worker(99)


def test_invalid_ttl_is_rejected() -> None:
    with pytest.raises(ValueError):
        ApproxIndex(ttl_s=0)


def test_find_matches_agrees_with_a_brute_force_model_under_ttl_and_capacity() -> None:
    # Records are root paths of a random tree of chained hashes, as the router records requests.
    rng = random.Random(9)
    parent: dict[int, int | None] = {}
    nodes: list[int] = []
    for h in range(1, 200):
        parent[h] = rng.choice(nodes) if nodes and rng.random() < 0.9 else None
        nodes.append(h)

    def path(h: int) -> list[int]:
        out = [h]
        while (p := parent[out[-1]]) is not None:
            out.append(p)
        return out[::-1]

    caps = {0: 12, 1: 30}
    index, clock = make(ttl_s=50.0, capacity=caps)
    model: dict[int, dict[int, float]] = {}  # worker -> block -> last recorded at
    for _ in range(2000):
        clock.now += rng.random() * 3
        worker = rng.randrange(4)
        if rng.random() < 0.02:
            index.remove_worker(worker)  # forgets its capacity too
            model.pop(worker, None)
            caps.pop(worker, None)
        else:
            request = path(rng.choice(nodes))
            index.record(worker, request)
            mine = model.setdefault(worker, {})
            for h in request:
                mine[h] = clock.now
        # The model's view: unexpired blocks, then the most recently recorded up to capacity
        # (deeper blocks of one request counting as less recent).
        live: dict[int, set[int]] = {}
        for w, recorded in model.items():
            fresh = [h for h, t in recorded.items() if t > clock.now - 50.0]
            fresh.sort(key=lambda h: (recorded[h], -len(path(h))), reverse=True)
            cap = caps.get(w)
            live[w] = set(fresh[:cap] if cap is not None else fresh)
            model[w] = {h: recorded[h] for h in live[w]}
        request = path(rng.choice(nodes))
        expected = {}
        for w, blocks in live.items():
            depth = 0
            while depth < len(request) and request[depth] in blocks:
                depth += 1
            if depth:
                expected[w] = depth
        assert index.find_matches(request) == OverlapScores(expected, {w: len(b) for w, b in live.items()})


def test_remembered_evictions_mark_where_a_prefix_was_pushed_out() -> None:
    clock = FakeClock()
    index = ApproxIndex(ttl_s=10.0, clock=clock, capacity_blocks={1: 4}, remember_evictions=True)
    index.record(1, [1, 2, 3])
    assert index.evicted_before(1, [1, 2, 3], 3) == 3  # nothing evicted yet
    index.record(1, [7, 8])  # 5 blocks > capacity 4: the LRU block goes, the tail first (3)
    assert index.evicted_before(1, [1, 2, 3], 3) == 2
    assert index.evicted_before(1, [1, 2, 3], 2) == 2
    assert index.evicted_before(2, [1, 2, 3], 3) == 3  # other workers are unaffected
    index.record(1, [1, 2, 3])  # recorded again: no longer evicted
    assert index.evicted_before(1, [1, 2, 3], 3) == 3
    # Expiry by TTL is not eviction: the worker may well still hold the blocks.
    clock.now = 20.0
    index.record(1, [50])
    assert index.evicted_before(1, [1, 2, 3], 3) == 3
    index.remove_worker(1)
    assert index.evicted_before(1, [7, 8], 2) == 2


def test_evictions_are_remembered_only_when_asked_and_only_a_capacity_worth() -> None:
    plain = ApproxIndex(capacity_blocks={1: 2})
    plain.record(1, [1, 2, 3, 4])
    assert plain.evicted_before(1, [1, 2], 2) == 2
    index = ApproxIndex(capacity_blocks={1: 2}, remember_evictions=True)
    index.record(1, [1, 2])
    index.record(1, [3, 4])  # evicts 2, 1
    index.record(1, [5, 6])  # evicts 4, 3; remembers only the last 2 evicted
    assert index.evicted_before(1, [3, 4], 2) == 0
    assert index.evicted_before(1, [1, 2], 2) == 2
