"""Approximate cache index for workers that publish no KV events.

The router records the blocks of every request it routes under the chosen worker, assuming the
worker now caches them. Entries expire `ttl_s` after they were last recorded (re-recording refreshes
them), and a worker with a known capacity keeps at most that many blocks, dropping the least recently
recorded first. Lookups return the same result type as `RadixIndex`.

Within one `record` the blocks are inserted deepest first, so when capacity forces an eviction the
tail of a request goes before its prefix: a prefix block is worth more (every longer match runs
through it), and a tail block without its prefix could never match anyway. More: since every record
of a block also records its parent, later in the order, a parent always outlives its children (by
LRU and by TTL alike), so each worker's recorded set stays prefix-closed and lookups can bisect
(`prefix_match.bisect_prefix`) instead of probing every block. This relies on `record` and
`find_matches` getting chained hashes (`block_hashes(...).sequence`), as the router computes them.

Expiry is lazy: every `record` / `find_matches` first drops what has expired. Because the TTL is the
same for every entry, each worker's LRU order is also its expiry order, so one ordered dict per
worker serves both rules; a global lower bound on the earliest expiry makes the common "nothing
expired yet" check O(1).

With `remember_evictions`, blocks that capacity pushed out are remembered (up to the capacity's
worth per worker) until recorded there again: the KV router uses this model of each worker's
*future* cache to discount what its KV events say the worker holds *now* (`evicted_before`).

Pure and I/O-free (the clock is injected); not thread-safe.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from turbine.router.prefix_match import NOBODY, OverlapScores, OwnerMasks, WorkerSlots, bisect_prefix


class ApproxIndex:
    """Blocks per worker as inferred from the router's own decisions, with TTL and LRU capacity."""

    def __init__(
        self,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        capacity_blocks: Mapping[int, int] | None = None,
        *,
        remember_evictions: bool = False,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self._ttl = ttl_s
        self._clock = clock
        self._capacity: dict[int, int] = {}
        for worker, blocks in (capacity_blocks or {}).items():
            self._check_capacity(blocks)
            self._capacity[worker] = blocks
        self._owners = OwnerMasks()
        """block hash -> ~(mask of workers that recorded it), as in `RadixIndex`."""
        self._slots = WorkerSlots()
        self._blocks: dict[int, OrderedDict[int, float]] = {}
        """worker -> {block hash: expiry time}, least recently recorded first."""
        self._next_expiry = math.inf
        """Never later than the earliest expiry of any entry (refreshes only push expiries out)."""
        self._evicted: dict[int, OrderedDict[int, None]] | None = {} if remember_evictions else None
        """worker -> blocks capacity pushed out of its record (not expired ones), oldest first, at
        most its capacity of them; a block leaves when it is recorded there again."""

    # -- queries -------------------------------------------------------------------------------------

    def find_matches(self, sequence_hashes: Sequence[int]) -> OverlapScores:
        """Longest recorded, unexpired prefix of `sequence_hashes` per worker."""
        self._expire(self._clock())
        scores: dict[int, int] = {}
        bisect_prefix(self._owners.__getitem__, sequence_hashes, self._slots.workers_in, scores)
        return OverlapScores(scores, {w: len(b) for w, b in self._blocks.items()})

    def evicted_before(self, worker: int, sequence_hashes: Sequence[int], depth: int) -> int:
        """How many leading blocks of `sequence_hashes[:depth]` capacity has not pushed out of
        `worker`'s record: the point where this model of its cache says the prefix was evicted
        (`depth` when it never was, or evictions are not remembered)."""
        evicted = self._evicted.get(worker) if self._evicted is not None else None
        if not evicted:
            return depth
        for i in range(depth):
            if sequence_hashes[i] in evicted:
                return i
        return depth

    def blocks_of(self, worker: int) -> list[int]:
        """The worker's unexpired blocks, least recently recorded first."""
        self._expire(self._clock())
        return list(self._blocks.get(worker, ()))

    # -- updates -------------------------------------------------------------------------------------

    def record(self, worker: int, sequence_hashes: Sequence[int]) -> None:
        """Note that `worker` now caches the blocks `sequence_hashes` (a request routed there)."""
        now = self._clock()
        self._expire(now)
        expiry = now + self._ttl
        self._next_expiry = min(self._next_expiry, expiry)
        bit = self._slots.bit(worker)
        mine = self._blocks.get(worker)
        if mine is None:
            mine = self._blocks[worker] = OrderedDict()
        owners = self._owners
        get = owners.get
        clear = ~bit
        for h in reversed(sequence_hashes):
            if h in mine:
                mine.move_to_end(h)
            else:
                owners[h] = get(h, NOBODY) & clear
            mine[h] = expiry
        if self._evicted is not None:
            evicted = self._evicted.get(worker)
            if evicted:
                for h in sequence_hashes:
                    evicted.pop(h, None)
        capacity = self._capacity.get(worker)
        if capacity is not None:
            self._evict_to(worker, mine, capacity)

    def set_capacity(self, worker: int, blocks: int | None) -> None:
        """Cap `worker` at `blocks` recorded blocks (None: unlimited), evicting LRU blocks at once."""
        if blocks is None:
            self._capacity.pop(worker, None)
            return
        self._check_capacity(blocks)
        self._capacity[worker] = blocks
        mine = self._blocks.get(worker)
        if mine:
            self._evict_to(worker, mine, blocks)

    def remove_worker(self, worker: int) -> None:
        """Forget `worker`: its blocks and its capacity."""
        mine = self._blocks.pop(worker, None)
        if mine:
            self._unset(self._slots.bit(worker), mine)
        if self._evicted is not None:
            self._evicted.pop(worker, None)
        self._capacity.pop(worker, None)
        self._slots.release(worker)

    # -- internals -----------------------------------------------------------------------------------

    @staticmethod
    def _check_capacity(blocks: int) -> None:
        if blocks < 0:
            raise ValueError(f"capacity must be >= 0 blocks, got {blocks}")

    def _evict_to(self, worker: int, mine: OrderedDict[int, float], capacity: int) -> None:
        excess = len(mine) - capacity
        if excess <= 0:
            return
        gone = [mine.popitem(last=False)[0] for _ in range(excess)]
        self._unset(self._slots.bit(worker), gone)
        if self._evicted is not None:
            evicted = self._evicted.setdefault(worker, OrderedDict())
            for h in gone:
                evicted[h] = None
                evicted.move_to_end(h)
            while len(evicted) > capacity:
                evicted.popitem(last=False)

    def _unset(self, bit: int, hashes: Sequence[int] | OrderedDict[int, float]) -> None:
        owners = self._owners
        for h in hashes:
            rest = owners[h] | bit
            if rest == NOBODY:
                del owners[h]
            else:
                owners[h] = rest

    def _expire(self, now: float) -> None:
        if now < self._next_expiry:
            return
        earliest = math.inf
        for worker, mine in self._blocks.items():
            expired = []
            for h, expiry in mine.items():
                if expiry > now:
                    earliest = min(earliest, expiry)
                    break
                expired.append(h)
            if expired:
                for h in expired:
                    del mine[h]
                self._unset(self._slots.bit(worker), expired)
        self._next_expiry = earliest
