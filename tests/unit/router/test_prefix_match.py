import random

import pytest

from turbine.router.prefix_match import NOBODY, OwnerMasks, WorkerSlots, bisect_prefix, walk_prefix

pytestmark = pytest.mark.unit


def owners_of(holdings: dict[int, list[int]], slots: WorkerSlots) -> OwnerMasks:
    """worker -> blocks it holds, as the complemented masks the matchers read."""
    owners = OwnerMasks()
    for worker, blocks in holdings.items():
        bit = slots.bit(worker)
        for h in blocks:
            owners[h] &= ~bit
    return owners


def test_owner_masks_read_missing_blocks_as_nobody() -> None:
    owners = OwnerMasks()
    assert owners[123] == NOBODY
    assert 123 not in owners
    assert owners.get(123) is None


def test_walk_scores_leading_blocks_and_skips_holes() -> None:
    slots = WorkerSlots()
    owners = owners_of({10: [1, 2, 3], 20: [1, 3], 30: [2, 3]}, slots)
    assert walk_prefix(owners, [1, 2, 3, 4], slots.workers_in) == {10: 3, 20: 1}
    assert walk_prefix(owners, [], slots.workers_in) == {}
    assert walk_prefix(owners, [1, 2, 3], slots.workers_in, among=slots.bit(20)) == {20: 1}
    assert walk_prefix(owners, [1, 2, 3], slots.workers_in, among=0) == {}


def test_bisect_matches_the_walk_when_holders_only_shrink() -> None:
    rng = random.Random(2)
    for _ in range(300):
        slots = WorkerSlots()
        depth = rng.randrange(0, 40)
        request = [rng.getrandbits(64) for _ in range(depth)]
        # Prefix-closed holdings: each worker holds some leading part of the request.
        holdings = {w: request[: rng.randrange(0, depth + 1)] for w in rng.sample(range(100), 8)}
        owners = owners_of(holdings, slots)
        expected = {w: len(b) for w, b in holdings.items() if b}
        scores: dict[int, int] = {}
        bisect_prefix(owners.__getitem__, request, slots.workers_in, scores)
        assert scores == expected
        assert walk_prefix(owners, request, slots.workers_in) == expected


def test_slots_are_reused_and_decoding_follows_the_new_owner() -> None:
    slots = WorkerSlots()
    assert slots.bit(7) == 1
    assert slots.bit(8) == 2
    assert slots.bit(7) == 1
    assert slots.workers_in(3) == (7, 8)
    slots.release(7)
    slots.release(7)  # twice: harmless
    assert slots.bit(9) == 1  # the freed lowest slot
    assert slots.workers_in(3) == (9, 8)
    assert slots.workers_in(0) == ()


def test_dense_and_sparse_masks_decode_alike() -> None:
    slots = WorkerSlots()
    workers = list(range(500, 540))
    for w in workers:
        slots.bit(w)
    rng = random.Random(4)
    for _ in range(200):
        chosen = sorted(rng.sample(range(40), rng.randrange(0, 41)))
        mask = sum(1 << i for i in chosen)
        assert slots.workers_in(mask) == tuple(workers[i] for i in chosen)
