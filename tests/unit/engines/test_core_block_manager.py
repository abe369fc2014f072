"""Exact-state tests of the shared paged KV cache (accounting, block tables) and its KV events."""

from __future__ import annotations

import pytest

from turbine.engines.core.block_manager import Allocation, BlockManager
from turbine.kv.hashing import BlockHashes, block_hashes
from turbine.protocol.kv_events import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

pytestmark = pytest.mark.unit

BS = 4


def make(num_blocks: int = 8, caching: bool = True) -> tuple[BlockManager, list[KvEvent]]:
    events: list[KvEvent] = []
    return BlockManager(num_blocks, BS, enable_prefix_caching=caching, on_event=events.append), events


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def admit(bm: BlockManager, seq_id: int, tokens: list[int]) -> tuple[Allocation, BlockHashes]:
    """Admit and fully compute a prompt the way the scheduler does (one token left uncached)."""
    h = block_hashes(tokens, BS)
    alloc = bm.allocate(seq_id, h.sequence[: (len(tokens) - 1) // BS], len(tokens))
    assert alloc is not None
    bm.commit(seq_id, h, len(tokens))
    return alloc, h


def stored(h: BlockHashes, lo: int, hi: int) -> KvStored:
    return KvStored(
        parent_hash=h.sequence[lo - 1] if lo else None,
        blocks=[StoredBlock(h.sequence[i], h.local[i]) for i in range(lo, hi)],
    )


def test_first_allocation_misses_and_commit_stores_full_blocks_only() -> None:
    bm, events = make()
    alloc, h = admit(bm, 1, toks(0, 10))  # 2 full blocks + 2-token partial
    assert alloc == Allocation(cached_blocks=0, cached_tokens=0, new_blocks=3)
    assert bm.num_used_blocks == 3
    assert events == [stored(h, 0, 2)]
    assert [bm.ref_count(x) for x in h.sequence] == [1, 1]


def test_prefix_hit_is_longest_prefix_and_shares_blocks() -> None:
    bm, events = make()
    _, h1 = admit(bm, 1, toks(0, 10))
    # Same first block, different second block, then the same third "block" tokens: the hit stops at
    # the first miss even though later local hashes would match.
    other = toks(0, 4) + toks(100, 4) + toks(8, 4) + [1]
    h2 = block_hashes(other, BS)
    assert bm.lookup(h2.sequence) == 1
    alloc = bm.allocate(2, h2.sequence[:3], len(other))
    assert alloc == Allocation(1, 4, 3)
    assert bm.ref_count(h1.sequence[0]) == 2
    assert bm.num_used_blocks == 3 + 3  # one shared, 2 private of seq 1 + 3 private of seq 2
    events.clear()
    bm.commit(2, h2, len(other))
    # New blocks 1 and 2 of seq 2 are stored with block 0 (the hit) as parent.
    assert events == [stored(h2, 1, 3)]


def test_identical_prompt_hits_all_full_blocks_but_partial_is_private() -> None:
    bm, _ = make()
    _, h = admit(bm, 1, toks(0, 10))
    alloc, _ = admit(bm, 2, toks(0, 10))
    assert alloc.cached_tokens == 8
    assert alloc.new_blocks == 1  # its own partial block
    assert bm.num_used_blocks == 2 + 1 + 1
    assert [bm.ref_count(x) for x in h.sequence] == [2, 2]


def test_free_keeps_blocks_cached_and_lru_evicts_tail_first_then_oldest() -> None:
    bm, events = make(num_blocks=6)
    _, ha = admit(bm, 1, toks(0, 9))  # blocks A0 A1 + partial
    _, hb = admit(bm, 2, toks(50, 9))  # blocks B0 B1 + partial
    bm.free(1)
    bm.free(2)
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == 6
    # Tail first within a sequence, and sequence 1 before sequence 2.
    assert bm.evictable_hashes() == [ha.sequence[1], ha.sequence[0], hb.sequence[1], hb.sequence[0]]
    events.clear()
    # 3 blocks needed, 2 empty: evict exactly one, the LRU one.
    alloc = bm.allocate(3, [], 9)
    assert alloc == Allocation(0, 0, 3)
    assert events == [KvRemoved([ha.sequence[1]])]
    assert not bm.is_cached(ha.sequence[1])
    assert bm.is_cached(ha.sequence[0])


def test_hit_on_evictable_block_revives_it_and_it_is_not_evicted_for_itself() -> None:
    bm, events = make(num_blocks=3)
    _, h = admit(bm, 1, toks(0, 9))  # 3 blocks: 2 full + partial
    bm.free(1)
    events.clear()
    # Same prompt again: 2 hits (both evictable) + 1 new block from the empty pool; nothing evicted.
    alloc = bm.allocate(2, h.sequence[:2], 9)
    assert alloc == Allocation(2, 8, 1)
    assert events == []
    assert bm.evictable_hashes() == []
    assert bm.num_free_blocks == 0


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm, events = make(num_blocks=4)
    admit(bm, 1, toks(0, 9))  # 3 blocks used
    before = (bm.num_used_blocks, bm.evictable_hashes())
    events.clear()
    assert bm.allocate(2, [], 8) is None  # needs 2, only 1 free
    assert (bm.num_used_blocks, bm.evictable_hashes()) == before
    assert not bm.holds(2)
    assert events == []


def test_reserve_grows_and_fails_cleanly() -> None:
    bm, _ = make(num_blocks=3)
    h = block_hashes(toks(0, 4), BS)
    assert bm.allocate(1, [], 4) == Allocation(0, 0, 1)
    bm.commit(1, h, 4)
    assert bm.reserve(1, 5)  # needs a second block
    assert bm.num_blocks_of(1) == 2
    assert bm.reserve(1, 8)  # still fits in two
    assert bm.num_blocks_of(1) == 2
    assert not bm.reserve(1, 13)  # would need 4 blocks
    assert bm.num_blocks_of(1) == 2


def test_decode_growth_registers_blocks_as_they_fill() -> None:
    bm, events = make()
    tokens = toks(0, 3)
    assert bm.allocate(1, [], 3) is not None
    for t in range(3, 9):
        tokens.append(t)
        assert bm.reserve(1, len(tokens))
        bm.commit(1, block_hashes(tokens, BS), len(tokens))
    h = block_hashes(tokens, BS)
    assert events == [stored(h, 0, 1), stored(h, 1, 2)]
    assert events[1].parent_hash == h.sequence[0]  # type: ignore[union-attr]


def test_concurrent_identical_prefix_is_deduplicated_without_event() -> None:
    bm, events = make()
    h = block_hashes(toks(0, 9), BS)
    assert bm.allocate(1, h.sequence[:2], 9) == Allocation(0, 0, 3)
    assert bm.allocate(2, h.sequence[:2], 9) == Allocation(0, 0, 3)  # nothing cached yet
    bm.commit(1, h, 9)
    assert bm.num_used_blocks == 6
    events.clear()
    bm.commit(2, h, 9)
    assert events == []
    assert [bm.ref_count(x) for x in h.sequence] == [2, 2]
    assert bm.num_used_blocks == 4  # seq 2's private copies went back to the pool


def test_dedup_in_the_middle_splits_the_stored_run_with_correct_parent() -> None:
    bm, events = make(num_blocks=16)
    a = [*toks(0, 8), 99]
    admit(bm, 1, a)  # caches blocks 0 and 1 of prefix 0..7
    longer = toks(0, 8) + toks(8, 8) + [1]
    h = block_hashes(longer, BS)
    # Admitted while only block 0 was visible to it: block 1 will be deduplicated on commit.
    assert bm.allocate(2, h.sequence[:1], len(longer)) == Allocation(1, 4, 4)
    events.clear()
    bm.commit(2, h, len(longer))
    assert events == [stored(h, 2, 4)]


def test_prefix_caching_off_never_shares_or_emits() -> None:
    bm, events = make(num_blocks=8, caching=False)
    _, h = admit(bm, 1, toks(0, 9))
    alloc, _ = admit(bm, 2, toks(0, 9))
    assert alloc == Allocation(0, 0, 3)
    assert bm.lookup(h.sequence) == 0
    assert bm.num_used_blocks == 6
    bm.free(1)
    bm.free(2)
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 0
    assert events == []


def test_event_parent_hashes_chain_across_commits() -> None:
    bm, events = make(num_blocks=16)
    tokens = toks(0, 17)
    h = block_hashes(tokens, BS)
    assert bm.allocate(1, [], 17) is not None
    bm.commit(1, h, 6)  # block 0
    bm.commit(1, h, 6)  # nothing new
    bm.commit(1, h, 16)  # blocks 1..3
    assert events == [stored(h, 0, 1), stored(h, 1, 4)]


def test_reset_refused_while_in_use_then_clears() -> None:
    bm, events = make()
    admit(bm, 1, toks(0, 9))
    assert not bm.reset()
    bm.free(1)
    events.clear()
    assert bm.reset()
    assert events == [KvCleared()]
    assert bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 8


def test_allocate_twice_is_an_error() -> None:
    bm, _ = make()
    assert bm.allocate(1, [], 1) is not None
    with pytest.raises(ValueError):
        bm.allocate(1, [], 1)


def check_tables(bm: BlockManager, live: dict[int, BlockHashes]) -> None:
    """Physical ids are in range; a block is shared only by sequences whose prefixes name the same
    hash; every id is either held, cached-evictable or empty, never two of these."""
    owner: dict[int, int] = {}
    held: set[int] = set()
    for seq_id, h in live.items():
        table = bm.block_table(seq_id)
        assert len(table) == bm.num_blocks_of(seq_id)
        for i, phys in enumerate(table):
            assert 0 <= phys < bm.num_blocks
            named = h.sequence[i] if i < len(bm._seqs[seq_id].shared) else None
            if named is None:
                assert phys not in held, "a private block appears twice"
                owner[phys] = -1
            else:
                assert owner.get(phys, named) == named, "one physical block under two hashes"
                owner[phys] = named
            held.add(phys)
    evictable = {bm._where[h] for h in bm.evictable_hashes()}
    assert not evictable & held
    assert not set(bm._empty) & (held | evictable)
    assert len(set(bm._empty)) + len(evictable) + len(held) == bm.num_blocks


def test_block_tables_name_distinct_physical_blocks_and_share_prefixes() -> None:
    bm, _ = make(num_blocks=8)
    _, ha = admit(bm, 1, toks(0, 9))  # 3 blocks: two full (cached), one filling
    _, hb = admit(bm, 2, toks(0, 9))  # shares the two full blocks
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    assert bm.block_table(1)[2] != bm.block_table(2)[2]
    check_tables(bm, {1: ha, 2: hb})
    shared = bm.block_table(1)[:2]
    bm.free(1)
    bm.free(2)
    # Cached blocks keep their physical place and are found there again.
    _, hc = admit(bm, 3, toks(0, 9))
    assert bm.block_table(3)[:2] == shared
    check_tables(bm, {3: hc})


def test_commit_of_a_block_cached_meanwhile_adopts_the_cached_physical_block() -> None:
    bm, _ = make(num_blocks=8)
    h = block_hashes(toks(0, 8), BS)
    assert bm.allocate(1, [], 8) is not None
    assert bm.allocate(2, [], 8) is not None
    bm.commit(1, h, 8)
    bm.commit(2, h, 8)
    assert bm.block_table(2) == bm.block_table(1)
    assert bm.num_used_blocks == 2
    check_tables(bm, {1: h, 2: h})


def test_random_lifecycles_keep_block_tables_consistent() -> None:
    import random

    rng = random.Random(7)
    bm, _ = make(num_blocks=24)
    live: dict[int, BlockHashes] = {}
    computed: dict[int, int] = {}
    tokens: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.35 or not live:
            prefix = rng.choice([0, 100, 200])
            t = toks(prefix, rng.randint(1, 14))
            h = block_hashes(t, BS)
            cacheable = h.sequence[: (len(t) - 1) // BS]
            alloc = bm.allocate(next_id, cacheable, rng.randint(1, len(t)))
            if alloc is not None:
                live[next_id], computed[next_id], tokens[next_id] = h, alloc.cached_tokens, t
            next_id += 1
        elif op < 0.7:
            seq_id = rng.choice(list(live))
            n = min(len(tokens[seq_id]), computed[seq_id] + rng.randint(1, 6))
            if bm.reserve(seq_id, n):
                bm.commit(seq_id, live[seq_id], n)
                computed[seq_id] = max(computed[seq_id], n)
        else:
            seq_id = rng.choice(list(live))
            bm.free(seq_id)
            del live[seq_id], computed[seq_id], tokens[seq_id]
        check_tables(bm, live)
