"""Longest-cached-prefix matching over per-block worker masks, shared by `RadixIndex` (KV events)
and `ApproxIndex` (the router's own decisions).

Owner dicts map a block's chained sequence hash to the *complement* of the bitmask of workers holding
it (`~mask`; `NOBODY` = -1 for no one). Complements because, along a chained request whose holders only
shrink with depth, they are non-decreasing, so `bisect` can use the dict's own C-level `__getitem__`
as its key (`bisect_prefix`), finding each depth where workers drop out in O(log n) probes instead of
visiting every block (`walk_prefix`, exact for any input, used where holders may not only shrink).

Workers get a bit each from `WorkerSlots`, which reuses freed bits so masks stay short and caches the
decoding of masks back to workers (the same few masks recur in almost every lookup).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from operator import and_
from typing import NamedTuple

NOBODY = -1
"""The complement of the empty mask: what an owner dict reads for a block no worker holds."""

_DECODE_CACHE_SIZE = 65536
_SPARSE_BITS = 12
"""Masks with at most this many workers are decoded bit by bit, denser ones slot by slot."""


class OverlapScores(NamedTuple):
    """How much of a request each worker already caches."""

    scores: dict[int, int]
    """worker -> number of leading request blocks it holds (longest cached prefix); workers that hold
    no prefix of the request are absent, i.e. score 0."""
    tree_sizes: dict[int, int]
    """worker -> number of blocks it holds, for every worker the index knows (tie-breaks)."""


class OwnerMasks(dict[int, int]):
    """block hash -> ~(mask of the workers holding it); a missing block reads as `NOBODY`."""

    __slots__ = ()

    def __missing__(self, key: int) -> int:
        return NOBODY


class WorkerSlots:
    """Assigns each worker a bit (freed bits are reused so masks stay short); decodes masks."""

    __slots__ = ("_bits", "_decoded", "_free", "_slot", "_workers")

    def __init__(self) -> None:
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        self._workers: list[int] = []
        """slot -> worker (a freed slot keeps its old worker until reused; no mask has its bit set)."""
        self._bits: list[int] = []
        """slot -> its bit, for decoding dense masks."""
        self._decoded: dict[int, tuple[int, ...]] = {}
        """mask -> its workers. The same few masks (the workers sharing a popular prefix) come up in
        almost every lookup, and decoding 60 bits one by one in Python costs more than the lookup."""

    def bit(self, worker: int) -> int:
        """The worker's mask bit, assigning a slot on first use."""
        slot = self._slot.get(worker)
        if slot is None:
            if self._free:
                self._free.sort(reverse=True)  # lowest free slot first keeps masks short
                slot = self._free.pop()
                self._workers[slot] = worker
                self._decoded.clear()  # cached masks with this bit named the slot's old worker
            else:
                slot = len(self._workers)
                self._workers.append(worker)
                self._bits.append(1 << slot)
            self._slot[worker] = slot
        return 1 << slot

    def release(self, worker: int) -> None:
        slot = self._slot.pop(worker, None)
        if slot is not None:
            self._free.append(slot)

    def workers_in(self, mask: int) -> tuple[int, ...]:
        """The workers whose bits are set in `mask` (a plain mask, not a complement)."""
        found = self._decoded.get(mask)
        if found is None:
            if mask.bit_count() > _SPARSE_BITS:
                # One C-level pass over every slot beats a Python step per set bit once most are set.
                found = tuple(compress(self._workers, map(and_, repeat(mask), self._bits)))
            else:
                workers = self._workers
                out = []
                rest = mask
                while rest:
                    low = rest & -rest
                    out.append(workers[low.bit_length() - 1])
                    rest ^= low
                found = tuple(out)
            if len(self._decoded) >= _DECODE_CACHE_SIZE:
                self._decoded.clear()  # crude but O(1) amortised; the hot masks come straight back
            self._decoded[mask] = found
        return found


def walk_prefix(
    owners: dict[int, int],
    sequence_hashes: Iterable[int],
    workers_in: Callable[[int], tuple[int, ...]],
    among: int = -1,
) -> dict[int, int]:
    """worker -> leading blocks it holds, by visiting the blocks in order (exact for any input).

    `owners` maps hash -> ~mask; only workers in the plain mask `among` are scored. Keeps the
    complement of the still-matching set; workers leaving it at depth d score d; stops when empty.
    """
    scores: dict[int, int] = {}
    if not among:
        return scores
    comp = ~among
    depth = 0
    for held in map(owners.get, sequence_hashes, repeat(NOBODY)):
        still = comp | held
        if still != comp:
            if depth:  # leaving at depth 0 is a score of 0: not recorded
                scores.update(dict.fromkeys(workers_in(still & ~comp), depth))
            if still == NOBODY:
                return scores
            comp = still
        depth += 1
    if depth:
        scores.update(dict.fromkeys(workers_in(~comp), depth))
    return scores


def bisect_prefix(
    key: Callable[[int], int],
    sequence_hashes: Sequence[int],
    workers_in: Callable[[int], tuple[int, ...]],
    scores: dict[int, int],
) -> None:
    """Add to `scores` the leading blocks held by each worker, for masks that only shrink along the
    request (`key(h)` = ~mask of block h, non-decreasing over `sequence_hashes`)."""
    n = len(sequence_hashes)
    if not n:
        return
    comp = key(sequence_hashes[0])
    if comp == NOBODY:
        return
    # One probe of the last block saves the last segment's bisection (log n probes) whenever some
    # worker holds the whole request: once the holders equal the last block's, none drop out.
    last = key(sequence_hashes[-1])
    pos = 0
    while comp != NOBODY:
        if comp == last:
            end, after = n, NOBODY
        else:
            end = bisect_right(sequence_hashes, comp, pos + 1, n, key=key)
            after = key(sequence_hashes[end]) if end < n else NOBODY
        scores.update(dict.fromkeys(workers_in(after & ~comp), end))
        comp = after
        pos = end
