"""Paged KV cache bookkeeping with prefix caching, shared by the mocker and the torch engine.

The cache has `num_blocks` physical blocks of `block_size` tokens, numbered 0..num_blocks-1. This
module holds no tensors: it decides which physical block holds which tokens of which sequence (the
block table an executor turns into KV-cache addresses), which blocks are named in the prefix cache,
and when they are evicted. The mocker only observes the accounting; the torch engine reads and writes
its KV tensors at the block ids given here.

- A sequence holds a list of blocks (its block table). Its full, computed blocks are *shared*: named
  by the chained sequence hash of `turbine.kv.hashing` and reference-counted, so another sequence
  with the same prefix reuses them. Blocks still filling (or reserved ahead of compute) are
  *private*: not named, never shared.
- When the last reference to a shared block goes, the block stays cached (evictable) in LRU order; it
  is evicted only when a sequence needs a block and no empty one is left.
- Every block that becomes cached emits `KvStored` and every evicted one `KvRemoved` through
  `on_event`; the engine batches them per scheduler step into numbered `KvEventBatch`es.
- With prefix caching off nothing is named or shared, nothing is cached after free, and no events are
  emitted; accounting is otherwise identical.

Sequences' blocks are released tail first, so the LRU evicts the deepest blocks of a prefix before its
head (what vLLM does): the head is what other requests are most likely to share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from turbine.kv.hashing import BlockHashes
from turbine.protocol.kv_events import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

SeqId = Hashable


class Allocation(NamedTuple):
    """Result of admitting a sequence into the cache."""

    cached_blocks: int
    """Leading blocks served from the prefix cache."""
    cached_tokens: int
    """`cached_blocks × block_size`: prompt tokens that need no compute."""
    new_blocks: int
    """Blocks taken from the free pool (evicting cached ones if needed)."""


@dataclass(slots=True)
class _SeqBlocks:
    shared: list[int] = field(default_factory=list)
    """Sequence hashes of this sequence's leading full blocks, in order (prefix caching on)."""
    table: list[int] = field(default_factory=list)
    """Physical block ids, in token order: the shared blocks first, then the private ones."""
    committed: int = 0
    """Leading blocks known full and computed (== len(shared) with caching on)."""

    @property
    def num_blocks(self) -> int:
        return len(self.table)

    @property
    def private(self) -> int:
        """Blocks held but not shared: filling, reserved ahead, or everything when caching is off."""
        return len(self.table) - len(self.shared)


class BlockManager:
    """Block accounting and the prefix cache. Single-threaded: owned by one scheduler.

    Lifecycle of a sequence: `allocate` (admission: take cached prefix, reserve blocks) → any number
    of `reserve` (more room before a step) and `commit` (blocks now full and computed become cached) →
    `free`. All methods either succeed or leave the state unchanged.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        on_event: Callable[[KvEvent], None] | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._on_event = on_event
        # Shared blocks referenced by at least one sequence: hash → reference count.
        self._active: dict[int, int] = {}
        # Shared blocks nobody references, still cached; first = least recently freed.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Physical block of every named (active or evictable) block.
        self._where: dict[int, int] = {}
        # Physical blocks holding nothing; popped from the end, so low ids are used first.
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        self._num_private = 0
        self._seqs: dict[SeqId, _SeqBlocks] = {}

    # ---- observation -------------------------------------------------------------------------

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by some sequence (what load metrics report as used)."""
        return len(self._active) + self._num_private

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation could get: empty ones plus evictable cached ones."""
        return self.num_blocks - self.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently named in the prefix cache (referenced or evictable)."""
        return len(self._active) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, seq_hash: int) -> int:
        """References on a cached block; 0 when evictable or not cached."""
        return self._active.get(seq_hash, 0)

    def is_cached(self, seq_hash: int) -> bool:
        return seq_hash in self._active or seq_hash in self._evictable

    def cached_hashes(self) -> list[int]:
        """Every block hash in the prefix cache (referenced or evictable), for full-state dumps."""
        return [*self._active, *self._evictable]

    def evictable_hashes(self) -> list[int]:
        """Evictable cached blocks in eviction order (first goes first)."""
        return list(self._evictable)

    def num_blocks_of(self, seq_id: SeqId) -> int:
        st = self._seqs.get(seq_id)
        return 0 if st is None else st.num_blocks

    def block_table(self, seq_id: SeqId) -> list[int]:
        """Physical block ids holding `seq_id`'s tokens, in order (the live list: do not mutate)."""
        return self._seqs[seq_id].table

    def holds(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def lookup(self, seq_hashes: Sequence[int]) -> int:
        """Number of leading blocks of `seq_hashes` in the cache (longest prefix, stops at a miss)."""
        if not self.enable_prefix_caching:
            return 0
        hits = 0
        active, evictable = self._active, self._evictable
        for h in seq_hashes:
            if h not in active and h not in evictable:
                break
            hits += 1
        return hits

    # ---- mutation ------------------------------------------------------------------------------

    def allocate(self, seq_id: SeqId, seq_hashes: Sequence[int], num_tokens: int) -> Allocation | None:
        """Admit `seq_id`: reuse the cached prefix of `seq_hashes`, reserve room for `num_tokens`.

        `seq_hashes` are the sequence hashes of the blocks the caller is willing to take from cache
        (a scheduler that must compute at least one token leaves the last full block out);
        `num_tokens` counts every token the sequence needs room for, cached ones included. Returns
        None, changing nothing, when the blocks do not fit even after evicting every evictable block.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        hits = self.lookup(seq_hashes)
        hit_hashes = list(seq_hashes[:hits])
        needed = max(0, self.blocks_needed(num_tokens) - hits)
        # Hits that are evictable now will be referenced, so they cannot also be evicted for room.
        revived = sum(1 for h in hit_hashes if h in self._evictable)
        if needed > self.num_free_blocks - revived:
            return None
        for h in hit_hashes:
            if h in self._active:
                self._active[h] += 1
            else:
                del self._evictable[h]
                self._active[h] = 1
        table = [self._where[h] for h in hit_hashes]
        table += self._take(needed)
        self._seqs[seq_id] = _SeqBlocks(shared=hit_hashes, table=table, committed=hits)
        return Allocation(hits, hits * self.block_size, needed)

    def reserve(self, seq_id: SeqId, num_tokens: int) -> bool:
        """Grow `seq_id` to hold `num_tokens` tokens; False (nothing changed) when it cannot fit."""
        st = self._seqs[seq_id]
        needed = self.blocks_needed(num_tokens) - st.num_blocks
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        st.table += self._take(needed)
        return True

    def commit(self, seq_id: SeqId, hashes: BlockHashes, num_computed: int) -> None:
        """Cache every full block of `seq_id` within its first `num_computed` computed tokens.

        `hashes` covers at least those blocks. A block whose hash is already cached (another sequence
        computed the same prefix meanwhile) is deduplicated: the sequence references the cached one
        and its private copy returns to the free pool, with no event.
        """
        st = self._seqs[seq_id]
        full = min(num_computed // self.block_size, st.num_blocks)
        if full <= st.committed:
            return
        if not self.enable_prefix_caching:
            st.committed = full
            return
        run: list[StoredBlock] = []
        run_start = st.committed
        for i in range(st.committed, full):
            h = hashes.sequence[i]
            self._num_private -= 1
            st.shared.append(h)
            if h in self._active or h in self._evictable:
                if h in self._active:
                    self._active[h] += 1
                else:
                    del self._evictable[h]
                    self._active[h] = 1
                self._empty.append(st.table[i])
                st.table[i] = self._where[h]
            else:
                self._active[h] = 1
                self._where[h] = st.table[i]
                if not run:
                    run_start = i
                run.append(StoredBlock(block_hash=h, tokens_hash=hashes.local[i]))
                continue
            # A deduplicated block ends the run of new blocks: the next one needs its own parent.
            self._emit_stored(run, hashes, run_start)
            run = []
        self._emit_stored(run, hashes, run_start)
        st.committed = full

    def free(self, seq_id: SeqId) -> None:
        """Release every block of `seq_id`; unreferenced full blocks stay cached, tail first in LRU."""
        st = self._seqs.pop(seq_id, None)
        if st is None:
            return
        self._num_private -= st.private
        self._empty.extend(reversed(st.table[len(st.shared) :]))
        for h in reversed(st.shared):
            refs = self._active[h] - 1
            if refs:
                self._active[h] = refs
            else:
                del self._active[h]
                self._evictable[h] = None

    def reset(self) -> bool:
        """Drop the whole prefix cache and emit `KvCleared`; refused (False) while blocks are in use."""
        if self._seqs:
            return False
        for h in self._evictable:
            self._empty.append(self._where.pop(h))
        self._evictable.clear()
        if self.enable_prefix_caching:
            self._emit(KvCleared())
        return True

    # ---- internals -----------------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        """Turn `n` free blocks into private ones, evicting LRU cached blocks when no empty one is left;
        returns their physical ids."""
        short = n - len(self._empty)
        if short > 0:
            evicted = [self._evictable.popitem(last=False)[0] for _ in range(short)]
            for h in evicted:
                self._empty.append(self._where.pop(h))
            self._emit(KvRemoved(block_hashes=evicted))
        self._num_private += n
        taken = self._empty[len(self._empty) - n :] if n else []
        del self._empty[len(self._empty) - n :]
        return taken

    def _emit_stored(self, run: list[StoredBlock], hashes: BlockHashes, start: int) -> None:
        if run:
            parent = hashes.sequence[start - 1] if start > 0 else None
            self._emit(KvStored(parent_hash=parent, blocks=run))

    def _emit(self, event: KvEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
