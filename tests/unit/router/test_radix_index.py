import random

import pytest

from turbine.protocol.kv_events import KvCleared, KvEvent, KvEventBatch, KvRemoved, KvStored, StoredBlock
from turbine.router.radix_index import MAX_BUFFERED_BATCHES, ApplyResult, OverlapScores, RadixIndex

pytestmark = pytest.mark.unit


def stored(worker: int, event_id: int, hashes: list[int], parent: int | None = None) -> KvEventBatch:
    return KvEventBatch(worker, event_id, [KvStored(parent, [StoredBlock(h, h + 1000) for h in hashes])])


def removed(worker: int, event_id: int, hashes: list[int]) -> KvEventBatch:
    return KvEventBatch(worker, event_id, [KvRemoved(hashes)])


def cleared(worker: int, event_id: int) -> KvEventBatch:
    return KvEventBatch(worker, event_id, [KvCleared()])


APPLIED = ApplyResult(applied=True, gap=False)
IGNORED = ApplyResult(applied=False, gap=False)
GAP = ApplyResult(applied=False, gap=True)


def test_stored_blocks_are_found_by_longest_prefix() -> None:
    index = RadixIndex()
    assert index.apply(stored(7, 0, [1, 2, 3])) == APPLIED
    assert index.find_matches([1, 2, 3, 4]) == OverlapScores({7: 3}, {7: 3})
    assert index.find_matches([1, 2]) == OverlapScores({7: 2}, {7: 3})
    assert index.find_matches([9, 1, 2]) == OverlapScores({}, {7: 3})
    assert index.find_matches([]) == OverlapScores({}, {7: 3})
    assert index.blocks_of(7) == {1, 2, 3}
    assert index.holders(2) == {7}
    assert index.num_blocks() == 3
    assert index.next_event_id(7) == 1


def test_shared_prefixes_across_workers() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [10, 11, 12]))
    index.apply(stored(2, 0, [10, 11, 20, 21]))
    index.apply(stored(3, 0, [10]))
    assert index.find_matches([10, 11, 12, 13]).scores == {1: 3, 2: 2, 3: 1}
    assert index.find_matches([10, 11, 20, 21]).scores == {1: 2, 2: 4, 3: 1}
    assert index.find_matches([10, 99]).scores == {1: 1, 2: 1, 3: 1}
    assert index.find_matches([10, 11, 20, 21]).tree_sizes == {1: 3, 2: 4, 3: 1}
    assert index.holders(10) == {1, 2, 3}
    assert index.num_blocks() == 5


def test_a_hole_in_the_prefix_ends_the_match() -> None:
    # Holding blocks 0 and 2 but not 1 is a one-block prefix, not two blocks "in common".
    index = RadixIndex()
    index.apply(stored(1, 0, [100, 101, 102]))
    index.apply(removed(1, 1, [101]))
    assert index.blocks_of(1) == {100, 102}
    assert index.find_matches([100, 101, 102]).scores == {1: 1}
    # Stored non-contiguously from the start behaves the same.
    index.apply(stored(2, 0, [100]))
    index.apply(stored(2, 1, [102], parent=101))
    assert index.find_matches([100, 101, 102]).scores == {1: 1, 2: 1}
    # Filling the hole restores the full match.
    index.apply(stored(2, 2, [101], parent=100))
    assert index.find_matches([100, 101, 102]).scores == {1: 1, 2: 3}


def test_removed_only_affects_that_worker_and_drops_unowned_blocks() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2, 3]))
    index.apply(stored(2, 0, [1, 2]))
    assert index.apply(removed(1, 1, [2, 3, 999])) == APPLIED  # 999 was never stored: ignored
    assert index.blocks_of(1) == {1}
    assert index.blocks_of(2) == {1, 2}
    assert index.holders(2) == {2}
    assert index.holders(3) == frozenset()
    assert index.num_blocks() == 2
    assert index.find_matches([1, 2, 3]) == OverlapScores({1: 1, 2: 2}, {1: 1, 2: 2})


def test_stored_twice_is_idempotent() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2]))
    index.apply(stored(1, 1, [1, 2, 3]))
    assert index.blocks_of(1) == {1, 2, 3}
    index.apply(removed(1, 2, [2]))
    assert index.find_matches([1, 2, 3]).scores == {1: 1}


def test_cleared_drops_all_of_one_workers_blocks() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2, 3]))
    index.apply(stored(2, 0, [1, 5]))
    assert index.apply(cleared(1, 1)) == APPLIED
    assert index.blocks_of(1) == frozenset()
    assert index.find_matches([1, 2, 3]) == OverlapScores({2: 1}, {1: 0, 2: 2})
    assert index.num_blocks() == 2
    index.apply(stored(1, 2, [7]))  # a cleared worker keeps receiving events
    assert index.find_matches([7]).scores == {1: 1}


def test_several_events_in_one_batch_apply_in_order() -> None:
    index = RadixIndex()
    events: list[KvEvent] = [
        KvStored(None, [StoredBlock(1, 0), StoredBlock(2, 0)]),
        KvRemoved([2]),
        KvStored(1, [StoredBlock(3, 0)]),
    ]
    index.apply(KvEventBatch(4, 0, events))
    assert index.blocks_of(4) == {1, 3}
    assert index.find_matches([1, 2]).scores == {4: 1}


def test_duplicate_and_old_event_ids_are_ignored() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1]))
    index.apply(stored(1, 1, [2]))
    assert index.apply(stored(1, 1, [50])) == IGNORED
    assert index.apply(cleared(1, 0)) == IGNORED
    assert index.blocks_of(1) == {1, 2}
    assert index.next_event_id(1) == 2


def test_gap_resets_the_worker_and_waits_for_a_dump() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2]))
    index.apply(stored(2, 0, [1]))
    assert index.apply(stored(1, 2, [3])) == GAP  # event 1 was lost
    assert index.blocks_of(1) == frozenset()
    assert index.awaiting_dump(1)
    assert index.next_event_id(1) is None
    assert index.find_matches([1, 2]) == OverlapScores({2: 1}, {1: 0, 2: 1})
    # Batches arriving before the dump are held back, not applied and not reported as new gaps.
    assert index.apply(stored(1, 3, [4])) == IGNORED
    assert index.apply(removed(1, 4, [1])) == IGNORED
    assert index.blocks_of(1) == frozenset()
    # The dump covers events up to 2; the held batches 3 and 4 are replayed on top of it, 2 is skipped.
    assert index.load_dump(1, [1, 2, 3], next_event_id=3) == ApplyResult(True, False)
    assert not index.awaiting_dump(1)
    assert index.blocks_of(1) == {2, 3, 4}
    assert index.next_event_id(1) == 5
    assert index.apply(stored(1, 5, [1])) == APPLIED
    assert index.find_matches([1, 2, 3, 4]).scores == {1: 4, 2: 1}


def test_first_batch_not_starting_at_zero_is_a_gap() -> None:
    index = RadixIndex()
    assert index.apply(stored(9, 41, [1])) == GAP
    assert index.awaiting_dump(9)
    assert index.find_matches([1]) == OverlapScores({}, {9: 0})
    assert index.load_dump(9, [1], next_event_id=41) == ApplyResult(True, False)
    assert index.blocks_of(9) == {1}  # batch 41 was replayed (it stores 1 again)
    assert index.next_event_id(9) == 42


def test_gap_while_replaying_after_a_dump_is_reported() -> None:
    index = RadixIndex()
    assert index.apply(stored(1, 5, [1])) == GAP
    index.apply(stored(1, 8, [2]))
    assert index.load_dump(1, [7], next_event_id=6) == ApplyResult(True, True)  # 6 and 7 missing
    assert index.awaiting_dump(1)
    assert index.blocks_of(1) == frozenset()


def test_dump_replaces_state_and_sets_the_next_event_id() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2, 3]))
    assert index.load_dump(1, [1, 5], next_event_id=10) == ApplyResult(True, False)
    assert index.blocks_of(1) == {1, 5}
    assert index.num_blocks() == 2
    assert index.apply(stored(1, 9, [8])) == IGNORED
    assert index.apply(stored(1, 10, [8])) == APPLIED


def test_buffer_while_awaiting_a_dump_is_bounded() -> None:
    index = RadixIndex()
    index.apply(stored(1, 1, [1]))
    for event_id in range(2, MAX_BUFFERED_BATCHES + 3):
        index.apply(stored(1, event_id, [event_id]))
    # The oldest buffered batches were dropped, so the replay cannot continue from the dump.
    assert index.load_dump(1, [], next_event_id=2).gap


def test_remove_worker_forgets_it_and_its_slot_is_reused_correctly() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2]))
    index.apply(stored(2, 0, [1]))
    assert index.find_matches([1, 2]).scores == {1: 2, 2: 1}
    index.remove_worker(1)
    assert index.find_matches([1, 2]) == OverlapScores({2: 1}, {2: 1})
    assert index.workers() == [2]
    assert index.num_blocks() == 1
    # Worker 3 takes worker 1's freed bit; results must name 3, never the departed 1.
    index.apply(stored(3, 0, [1, 2]))
    assert index.find_matches([1, 2]).scores == {2: 1, 3: 2}
    index.remove_worker(42)  # unknown: no-op
    # A removed worker that reappears starts from event 0 like any new worker.
    assert index.apply(stored(1, 0, [5])) == APPLIED
    assert index.find_matches([5]).scores == {1: 1}


def test_holes_are_tracked_and_mended() -> None:
    index = RadixIndex()
    index.apply(stored(1, 0, [1, 2, 3]))
    assert not index.has_holes(1)
    index.apply(removed(1, 1, [2]))
    assert index.has_holes(1)  # 3 is held without its parent 2
    index.apply(stored(1, 2, [2], parent=1))
    assert not index.has_holes(1)
    assert index.find_matches([1, 2, 3]).scores == {1: 3}
    index.apply(stored(1, 3, [9], parent=8))  # a parent it never held
    assert index.has_holes(1)
    index.apply(removed(1, 4, [9]))
    assert not index.has_holes(1)


def test_dumped_blocks_with_unknown_parents_are_matched_exactly() -> None:
    index = RadixIndex()
    index.load_dump(1, [3, 1, 2], next_event_id=0)
    assert index.has_holes(1)  # no stored event ever told us these blocks' parents
    assert index.find_matches([9, 8]).scores == {}
    assert index.has_holes(1)
    assert index.find_matches([1, 2, 3, 4]).scores == {1: 3}
    assert not index.has_holes(1)  # the request, a chain, told us: 1 -> 2 -> 3
    index.apply(removed(1, 0, [2]))
    assert index.has_holes(1)
    assert index.find_matches([1, 2, 3]).scores == {1: 1}
    index.load_dump(1, [3, 1, 2], next_event_id=0)
    assert index.has_holes(1)  # 2 left every worker, and its link with it; 1 -> 2 and 2 -> 3 are kept
    assert index.find_matches([1, 2]).scores == {1: 2}
    assert not index.has_holes(1)
    index.apply(stored(2, 0, [5, 6, 7]))  # links from a stored event serve later dumps
    index.load_dump(3, [7, 5, 6], next_event_id=0)
    assert not index.has_holes(3)
    assert index.find_matches([5, 6, 7]).scores == {2: 3, 3: 3}
    index.load_dump(4, [5, 7], next_event_id=0)
    assert index.has_holes(4)
    assert index.find_matches([5, 6, 7]).scores == {2: 3, 3: 3, 4: 1}


def _random_tree(rng: random.Random, size: int) -> tuple[list[int], dict[int, int | None]]:
    hashes: list[int] = []
    parent: dict[int, int | None] = {}
    for _ in range(size):
        h = rng.getrandbits(64)
        parent[h] = rng.choice(hashes) if hashes and rng.random() < 0.9 else None
        hashes.append(h)
    return hashes, parent


def _path(parent: dict[int, int | None], h: int) -> list[int]:
    out = [h]
    while (p := parent[out[-1]]) is not None:
        out.append(p)
    return out[::-1]


def _check_links(index: RadixIndex) -> None:
    """The parent links and their inverse agree, and name only present blocks' links."""
    children: dict[int, list[int]] = {}
    for h, p in index._parents.items():
        assert h in index._owners
        if p is not None:
            children.setdefault(p, []).append(h)
    inverse = {p: [index._child[p], *index._more_children.get(p, [])] for p in index._child}
    assert set(index._more_children) <= set(index._child)
    assert {p: sorted(c) for p, c in inverse.items()} == {p: sorted(c) for p, c in children.items()}


@pytest.mark.parametrize(
    ("tidy", "size"), [(True, 120), (False, 120), (True, 2000)], ids=["prefix-closed", "holes", "mostly-new"]
)
def test_find_matches_agrees_with_a_brute_force_model(tidy: bool, size: int) -> None:
    # Chain-consistent random traffic (every hash has one parent, as chained hashes do). "tidy" stores
    # whole paths and evicts leaves first, as engines do, so workers stay prefix-closed (the bisection
    # path); otherwise stores start mid-path and removals pick any block (holes: the linear walk).
    rng = random.Random(5)
    hashes, parent = _random_tree(rng, size)
    index = RadixIndex()
    model: dict[int, set[int]] = {}
    next_id: dict[int, int] = {}
    dumped: set[int] = set()  # dumps may name blocks whose parents were never announced: holes
    for _ in range(3000):
        worker = rng.randrange(6)
        op = rng.random()
        event_id = next_id.get(worker, 0)
        mine = model.setdefault(worker, set())
        if op < 0.01:
            index.remove_worker(worker)
            del model[worker]
            next_id.pop(worker, None)
            dumped.discard(worker)
            continue
        if op < 0.02:
            dump = set(rng.sample(hashes, rng.randrange(0, 30)))
            if tidy:
                dump = {b for h in dump for b in _path(parent, h)}
            assert index.load_dump(worker, list(dump), next_event_id=event_id) == ApplyResult(True, False)
            mine.clear()
            mine.update(dump)
            dumped.add(worker)
            event_id -= 1  # a dump is not an event: the next batch is still `event_id`
        elif op < 0.6:
            path = _path(parent, rng.choice(hashes))
            start = 0 if tidy else rng.randrange(len(path))
            if tidy:  # a continuation of what the worker holds, as an engine would announce it
                while start < len(path) and path[start] in mine:
                    start += 1
            chain = path[start:]
            index.apply(stored(worker, event_id, chain, parent=path[start - 1] if start else None))
            mine.update(chain)
        elif op < 0.98:
            candidates = sorted(mine)
            if tidy:
                candidates = [h for h in candidates if not any(parent[c] == h for c in mine)]
            gone = rng.sample(candidates, min(len(candidates), rng.randrange(1, 4)))
            index.apply(removed(worker, event_id, gone))
            mine.difference_update(gone)
        else:
            index.apply(cleared(worker, event_id))
            mine.clear()
            dumped.discard(worker)
        next_id[worker] = event_id + 1
        request = _path(parent, rng.choice(hashes)) + [rng.getrandbits(64) for _ in range(rng.randrange(3))]
        expected = {}
        for w, blocks in model.items():
            depth = 0
            while depth < len(request) and request[depth] in blocks:
                depth += 1
            if depth:
                expected[w] = depth
        assert index.find_matches(request) == OverlapScores(expected, {w: len(b) for w, b in model.items()})
        assert index.num_blocks() == len(set().union(*model.values()))
        if tidy:
            assert not any(index.has_holes(w) for w in model if w not in dumped)
        _check_links(index)


def test_a_new_chain_through_a_block_that_is_still_a_parent_keeps_both_children() -> None:
    # Block 2 leaves every worker while A still holds its child 3 (an orphan now), so 2 keeps its
    # child link. A new chain that stores 2 again adds a child to it instead of replacing that link.
    index = RadixIndex()
    index.apply(stored(0xA, 0, [1, 2, 3]))
    index.apply(removed(0xA, 1, [2]))
    index.apply(stored(0xB, 0, [2, 4], parent=1))
    _check_links(index)
    assert sorted([index._child[2], *index._more_children.get(2, [])]) == [3, 4]
    assert index.find_matches([1, 2, 3]) == OverlapScores({0xA: 1}, {0xA: 2, 0xB: 2})
    assert index.find_matches([1, 2, 4]) == OverlapScores({0xA: 1}, {0xA: 2, 0xB: 2})
    index.apply(stored(0xB, 1, [7, 8, 9]))  # a chain new everywhere
    _check_links(index)
    assert index._parents[7] is None and index._parents[9] == 8 and index._child[7] == 8
    assert index.find_matches([7, 8, 9]) == OverlapScores({0xB: 3}, {0xA: 2, 0xB: 5})
