"""Which worker holds which KV block, for one model, built from the workers' KV events.

A block's sequence hash is chained over every block before it (`turbine.kv.hashing`), so one hash
names a whole prefix and Dynamo's radix tree flattens into a dict `block_hash -> ~(mask of workers)`
(see `prefix_match`: a bit per worker, complemented so lookups can bisect).

Lookup (longest cached prefix per worker; a worker holding blocks 0 and 2 but not 1 scores 1). An
*orphan* of a worker is a block it holds without holding its parent (or whose parent is unknown).
Along a chained request a worker can only start holding blocks again after a gap at one of its
orphans; with none on the request, the set of workers holding block i only shrinks with i, so
`bisect_prefix` finds each depth where workers drop out in O(log n) probes instead of one dict probe
(mostly a cache miss) per block. Workers with an orphan on the request are masked out of the
bisection and matched by the exact linear `walk_prefix`: holes cost speed, never correctness. Caches
of engines that evict leaves first have no orphans at all.

Orphan tracking needs each block's parent: learnt from `stored` events (the event's `parent_hash`,
then each block's predecessor) the first time any worker stores the block, and forgotten when the
last holder drops it. Dumps carry no parents, so dumped blocks nobody stored stay unlinked (orphans)
until a stored event or a lookup (its request is a chain: each hash's parent is the one before it)
links them.

Event ordering (per worker, `KvEventBatch.event_id` counts up from 0 without gaps):

- `id < expected` — a duplicate or replay: ignored.
- `id > expected`, or a worker's first batch with `id != 0` — a gap: the worker's blocks are dropped
  and `apply` returns `gap=True` so the caller fetches a full dump. A first batch that does not start
  at 0 is a gap on purpose: the worker was running before this index saw it (e.g. a frontend
  restart), so its earlier events, and thus its cache contents, are unknown.
- While a worker awaits its dump, its batches are buffered (bounded) and replayed by `load_dump`, so
  events that race with the dump request are not lost.

`find_matches` expects a chained request (`block_hashes(...).sequence`), as the router computes it.
Pure and I/O-free; not thread-safe (the router owns it on one event loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from turbine.protocol.kv_events import KvCleared, KvEvent, KvEventBatch, KvRemoved, KvStored
from turbine.router.prefix_match import (
    NOBODY,
    OverlapScores,
    OwnerMasks,
    WorkerSlots,
    bisect_prefix,
    walk_prefix,
)

__all__ = ["MAX_BUFFERED_BATCHES", "ApplyResult", "OverlapScores", "RadixIndex"]

MAX_BUFFERED_BATCHES = 1024
"""Batches kept per worker while it awaits a dump; older ones are dropped (the replay then finds a
gap and asks again), so a dump that never comes cannot grow memory without bound."""


class ApplyResult(NamedTuple):
    applied: bool
    """The batch changed the index (False for duplicates, gaps and batches buffered for a dump)."""
    gap: bool
    """The worker's state was reset and the caller should request a full dump (`load_dump`)."""


_APPLIED = ApplyResult(True, False)
_IGNORED = ApplyResult(False, False)
_GAP = ApplyResult(False, True)


class _Worker:
    __slots__ = ("bit", "blocks", "orphans")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.blocks: set[int] = set()
        self.orphans: set[int] = set()
        """Held blocks whose parent this worker does not hold or whose parent is unknown."""


class RadixIndex:
    """Cached blocks per worker for one model, fed by KV event batches and dumps."""

    def __init__(self) -> None:
        self._owners = OwnerMasks()
        self._parents: dict[int, int | None] = {}
        """block -> parent block (None: a first block), for present blocks whose parent is known."""
        self._child: dict[int, int] = {}
        self._more_children: dict[int, list[int]] = {}
        """The inverse of `_parents`: a block's first present child, and any others. Most blocks have
        one child, and an int costs neither an allocation nor garbage-collector scans as a list per
        block would, on the path of every stored event."""
        self._unlinked: set[int] = set()
        """Present blocks whose parent is unknown (they came in dumps), until a stored event or a
        request names it."""
        self._slots = WorkerSlots()
        self._workers: dict[int, _Worker] = {}
        """Every known worker, even with no blocks or awaiting a dump."""
        self._sizes: dict[int, int] = {}
        """worker -> blocks it holds, kept current so a lookup copies it rather than rebuilding it."""
        self._orphan_masks: dict[int, int] = {}
        """block -> mask of the workers for which it is an orphan. Only there can a worker's match
        along a request resume after a gap, so a lookup that meets none of these is all bisection."""
        self._next_event: dict[int, int] = {}
        """worker -> next expected event_id, for workers in sync."""
        self._awaiting: dict[int, list[KvEventBatch]] = {}
        """worker -> batches received since its gap, for workers awaiting a dump."""

    # -- queries -------------------------------------------------------------------------------------

    def find_matches(self, sequence_hashes: Sequence[int]) -> OverlapScores:
        """Longest cached prefix of `sequence_hashes` (a request's chained block hashes) per worker."""
        if self._unlinked:
            self._learn_links(sequence_hashes)
        workers_in = self._slots.workers_in
        dirty = 0  # workers with an orphan on this request: matched by the exact walk
        orphan_masks = self._orphan_masks
        if orphan_masks:
            for h in orphan_masks.keys() & sequence_hashes:
                dirty |= orphan_masks[h]
        if not dirty:
            scores: dict[int, int] = {}
            bisect_prefix(self._owners.__getitem__, sequence_hashes, workers_in, scores)
        else:
            scores = walk_prefix(self._owners, sequence_hashes, workers_in, dirty)
            getitem = self._owners.__getitem__
            bisect_prefix(lambda h: getitem(h) | dirty, sequence_hashes, workers_in, scores)
        return OverlapScores(scores, self._sizes.copy())

    def workers(self) -> list[int]:
        return list(self._workers)

    def blocks_of(self, worker: int) -> frozenset[int]:
        state = self._workers.get(worker)
        return frozenset(state.blocks) if state else frozenset()

    def holders(self, block_hash: int) -> frozenset[int]:
        return frozenset(self._slots.workers_in(~self._owners[block_hash]))

    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._owners)

    def has_holes(self, worker: int) -> bool:
        """Whether `worker` has orphans: blocks held without their parent, or with it unknown."""
        state = self._workers.get(worker)
        return bool(state and state.orphans)

    def next_event_id(self, worker: int) -> int | None:
        """The event_id expected next from `worker`; None if unknown or awaiting a dump."""
        return self._next_event.get(worker)

    def awaiting_dump(self, worker: int) -> bool:
        return worker in self._awaiting

    # -- updates -------------------------------------------------------------------------------------

    def apply(self, batch: KvEventBatch) -> ApplyResult:
        """Apply one worker's event batch in order; see the module docstring for gaps and duplicates."""
        worker = batch.worker_id
        event_id = batch.event_id
        expected = self._next_event.get(worker)
        if expected is None:
            pending = self._awaiting.get(worker)
            if pending is not None:
                pending.append(batch)
                if len(pending) > MAX_BUFFERED_BATCHES:
                    del pending[0]
                return _IGNORED
            if event_id != 0:
                self._start_resync(worker, batch)
                return _GAP
            expected = 0
        if event_id != expected:
            if event_id < expected:
                return _IGNORED
            self._start_resync(worker, batch)
            return _GAP
        self._next_event[worker] = event_id + 1
        state = self._state(worker)
        for event in batch.events:
            self._apply_event(state, event)
        self._sizes[worker] = len(state.blocks)
        return _APPLIED

    def load_dump(self, worker: int, block_hashes: Iterable[int], next_event_id: int) -> ApplyResult:
        """Replace `worker`'s blocks with a full dump taken just before event `next_event_id`.

        Batches buffered since the worker's gap are then replayed (older ones ignored); if the replay
        itself finds a gap the result says so and the caller must ask for another dump.
        """
        state = self._state(worker)
        dump = set(block_hashes)
        mine = state.blocks
        # Only the difference changes, so blocks the worker keeps keep their parent links.
        self._remove(state, mine - dump)
        owners = self._owners
        clear = ~state.bit
        for h in dump - mine:
            held = owners[h]
            if held == NOBODY:
                self._unlinked.add(h)
            owners[h] = held & clear
            mine.add(h)
        # A dump lists blocks without parents: use the ones learnt from stored events, and treat the
        # rest as holes so the exact walk matches them until they are stored again or evicted.
        parents = self._parents
        self._clear_orphans(state)
        for h in mine:
            if h not in parents or ((p := parents[h]) is not None and p not in mine):
                self._add_orphan(state, h)
        self._sizes[worker] = len(mine)
        self._next_event[worker] = next_event_id
        gap = False
        for batch in sorted(self._awaiting.pop(worker, []), key=lambda b: b.event_id):
            gap = self.apply(batch).gap or gap
        return ApplyResult(True, gap)

    def remove_worker(self, worker: int) -> None:
        """Forget `worker` (it left discovery). Callers should drop its late events: a later batch
        starts it afresh, as a gap unless its id is 0."""
        state = self._workers.pop(worker, None)
        if state is not None:
            self._drop_all(state)
        self._sizes.pop(worker, None)
        self._next_event.pop(worker, None)
        self._awaiting.pop(worker, None)
        self._slots.release(worker)

    # -- internals -----------------------------------------------------------------------------------

    def _learn_links(self, sequence_hashes: Sequence[int]) -> None:
        """Link dumped blocks that lie on a request: in a chain, each hash's parent is the one before.

        After a router restart every worker is dumped and nothing is linked, so without this every
        dumped block would stay an orphan (matched by the slow walk) until it was evicted.
        """
        found = self._unlinked.intersection(sequence_hashes)
        if not found:
            return
        for i, h in enumerate(sequence_hashes):
            if h not in found:
                continue
            parent = sequence_hashes[i - 1] if i else None
            self._link(h, parent)
            for worker in self._slots.workers_in(~self._owners[h]):
                state = self._workers[worker]
                if parent is None or parent in state.blocks:
                    self._drop_orphan(state, h)

    def _state(self, worker: int) -> _Worker:
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _Worker(self._slots.bit(worker))
        return state

    def _add_orphan(self, state: _Worker, h: int) -> None:
        if h not in state.orphans:
            state.orphans.add(h)
            self._orphan_masks[h] = self._orphan_masks.get(h, 0) | state.bit

    def _drop_orphan(self, state: _Worker, h: int) -> None:
        if h in state.orphans:
            state.orphans.remove(h)
            rest = self._orphan_masks[h] & ~state.bit
            if rest:
                self._orphan_masks[h] = rest
            else:
                del self._orphan_masks[h]

    def _clear_orphans(self, state: _Worker) -> None:
        for h in list(state.orphans):
            self._drop_orphan(state, h)

    def _start_resync(self, worker: int, batch: KvEventBatch) -> None:
        state = self._state(worker)
        self._drop_all(state)
        self._sizes[worker] = 0
        self._next_event.pop(worker, None)
        self._awaiting[worker] = [batch]

    def _apply_event(self, state: _Worker, event: KvEvent) -> None:
        if isinstance(event, KvStored):
            if state.orphans:
                self._store_with_holes(state, event)
            else:
                self._store_clean(state, event)
        elif isinstance(event, KvRemoved):
            self._remove(state, event.block_hashes)
        elif isinstance(event, KvCleared):
            self._drop_all(state)

    def _store_clean(self, state: _Worker, event: KvStored) -> None:
        # The hot path, for a worker without orphans: it holds no child of a block it lacks, so
        # storing blocks can only create an orphan at the event's first block (parent not held).
        owners = self._owners
        get = owners.get
        parents = self._parents
        child = self._child
        unlinked = self._unlinked
        clear = ~state.bit
        mine = state.blocks
        prev = event.parent_hash
        hashes = [block.block_hash for block in event.blocks]
        if prev is not None and prev not in mine and hashes:
            self._add_orphan(state, hashes[0])
        mine.update(hashes)
        for h in hashes:
            held = get(h, NOBODY)
            if held == NOBODY:  # first holder anywhere: learn the parent link (`_link`, inlined)
                parents[h] = prev
                if prev is not None:
                    if prev in child:
                        self._more_children.setdefault(prev, []).append(h)
                    else:
                        child[prev] = h
            elif unlinked and h in unlinked:
                self._link(h, prev)
            owners[h] = held & clear
            prev = h

    def _store_with_holes(self, state: _Worker, event: KvStored) -> None:
        # Same effect as `_store_clean`, but also mends holes: a stored block may be the missing
        # parent of blocks this worker already holds, or re-state an orphan's parent.
        owners = self._owners
        parents = self._parents
        clear = ~state.bit
        mine = state.blocks
        orphans = state.orphans
        prev = event.parent_hash
        for block in event.blocks:
            h = block.block_hash
            held = owners[h]
            if held == NOBODY or h in self._unlinked:
                self._link(h, prev)
            parent_held = prev is None or prev in mine
            if h in mine:
                if h in orphans and parent_held and parents[h] == prev:
                    self._drop_orphan(state, h)
            else:
                owners[h] = held & clear
                mine.add(h)
                if not parent_held:
                    self._add_orphan(state, h)
                for c in self._children_of(h):
                    self._drop_orphan(state, c)
            prev = h

    def _remove(self, state: _Worker, hashes: Iterable[int]) -> None:
        owners = self._owners
        parents = self._parents
        child = self._child
        more_children = self._more_children
        unlinked = self._unlinked
        bit = state.bit
        mine = state.blocks
        orphans = state.orphans
        for h in hashes:
            if h not in mine:  # removals of blocks we never saw stored are ignored
                continue
            mine.remove(h)
            if orphans:
                self._drop_orphan(state, h)
            held = owners[h] | bit
            if held != NOBODY:
                owners[h] = held
            else:  # gone everywhere: forget its parent link (`_forget_links`, inlined for churn)
                del owners[h]
                parent = parents.pop(h, None)
                if parent is not None:
                    if parent not in more_children:  # an only child
                        del child[parent]
                    else:
                        self._unlink_sibling(parent, h)
                if unlinked:
                    unlinked.discard(h)
            first = child.get(h)
            if first is not None:  # a held child has lost its parent: a hole
                if first in mine:
                    self._add_orphan(state, first)
                for c in more_children.get(h, ()):
                    if c in mine:
                        self._add_orphan(state, c)

    def _drop_all(self, state: _Worker) -> None:
        owners = self._owners
        bit = state.bit
        for h in state.blocks:
            held = owners[h] | bit
            if held == NOBODY:
                del owners[h]
                self._forget_links(h)
            else:
                owners[h] = held
        state.blocks.clear()
        self._clear_orphans(state)

    def _children_of(self, h: int) -> list[int]:
        first = self._child.get(h)
        if first is None:
            return []
        return [first, *self._more_children.get(h, ())]

    def _link(self, h: int, parent: int | None) -> None:
        self._unlinked.discard(h)
        self._parents[h] = parent
        if parent is not None:
            if parent in self._child:
                self._more_children.setdefault(parent, []).append(h)
            else:
                self._child[parent] = h

    def _forget_links(self, h: int) -> None:
        """`h` left every worker: drop its parent link (its own children keep theirs)."""
        if self._unlinked:
            self._unlinked.discard(h)
        parent = self._parents.pop(h, None)
        if parent is not None:
            if parent not in self._more_children:
                del self._child[parent]
            else:
                self._unlink_sibling(parent, h)

    def _unlink_sibling(self, parent: int, h: int) -> None:
        """Drop `h` from the children of a `parent` that has several."""
        more = self._more_children[parent]
        if self._child[parent] == h:
            self._child[parent] = more.pop()
        else:
            more.remove(h)
        if not more:
            del self._more_children[parent]
