"""Engine block hashes re-keyed onto Turbine's XXH3 chain."""

from __future__ import annotations

import pytest

from turbine.engines.upstream.kv_codec import AllBlocksCleared, BlockRemoved, BlockStored
from turbine.engines.upstream.rekey import Rekeyer
from turbine.kv.hashing import block_hashes
from turbine.protocol.kv_events import KvCleared, KvRemoved, KvStored, StoredBlock

pytestmark = pytest.mark.unit

TOKENS = list(range(100, 132))  # 32 tokens


def _expected(tokens: list[int], size: int) -> list[StoredBlock]:
    h = block_hashes(tokens, size)
    return [StoredBlock(s, t) for s, t in zip(h.sequence, h.local, strict=True)]


def test_same_block_size_parent_chain_matches_turbine_hashes() -> None:
    rk = Rekeyer(8)
    want = _expected(TOKENS, 8)
    first = rk.apply([BlockStored((b"a", b"b"), None, tuple(TOKENS[:16]), 8)])
    # A child stored later continues the chain from its parent's entry.
    second = rk.apply([BlockStored((b"c", b"d"), b"b", tuple(TOKENS[16:]), 8)])
    assert first == [KvStored(None, want[:2])]
    assert second == [KvStored(want[1].block_hash, want[2:])]
    assert sorted(rk.cached()) == sorted(b.block_hash for b in want)


def test_two_engines_with_different_hashes_agree() -> None:
    a, b = Rekeyer(8), Rekeyer(8)
    out_a = a.apply([BlockStored((1, 2, 3, 4), None, tuple(TOKENS), 8)])
    out_b = b.apply([BlockStored((b"w", b"x", b"y", b"z"), None, tuple(TOKENS), 8)])
    assert out_a == out_b == [KvStored(None, _expected(TOKENS, 8))]


def test_smaller_engine_blocks_fill_turbine_blocks() -> None:
    # Engine blocks of 4 tokens, Turbine blocks of 16: every fourth engine block completes one.
    rk = Rekeyer(16)
    want = _expected(TOKENS, 16)
    out = rk.apply([BlockStored(tuple(range(1, 7)), None, tuple(TOKENS[:24]), 4)])
    assert out == [KvStored(None, want[:1])]
    out = rk.apply([BlockStored((7, 8), 6, tuple(TOKENS[24:32]), 4)])
    assert out == [KvStored(want[0].block_hash, want[1:])]
    # Removing the engine block that completed a Turbine block removes it; others remove nothing.
    assert rk.apply([BlockRemoved((7,))]) == []
    assert rk.apply([BlockRemoved((8,))]) == [KvRemoved([want[1].block_hash])]
    assert rk.apply([BlockRemoved((4,))]) == [KvRemoved([want[0].block_hash])]


def test_larger_engine_blocks_complete_several() -> None:
    rk = Rekeyer(8)
    out = rk.apply([BlockStored((1,), None, tuple(TOKENS), 32)])
    assert out == [KvStored(None, _expected(TOKENS, 8))]
    assert rk.apply([BlockRemoved((1,))]) == [KvRemoved([b.block_hash for b in _expected(TOKENS, 8)])]


def test_shared_turbine_block_removed_with_its_last_engine_block() -> None:
    rk = Rekeyer(8)
    rk.apply([BlockStored((1,), None, tuple(TOKENS[:8]), 8)])
    rk.apply([BlockStored((2,), None, tuple(TOKENS[:8]), 8)])  # same tokens, another engine hash
    h = _expected(TOKENS[:8], 8)[0].block_hash
    assert rk.apply([BlockRemoved((1,))]) == []
    assert rk.cached() == [h]
    assert rk.apply([BlockRemoved((2,))]) == [KvRemoved([h])]


def test_orphans_ignored_media_and_unknown_removals_are_counted() -> None:
    rk = Rekeyer(8)
    assert rk.apply([BlockStored((2,), 99, tuple(TOKENS[:8]), 8)]) == []
    assert rk.apply([BlockStored((3,), None, tuple(TOKENS[:8]), 8, medium="CPU")]) == []
    assert rk.apply([BlockStored((4,), None, tuple(TOKENS[:8]), 8, lora_id=2)]) == []
    assert rk.apply([BlockStored((5,), None, tuple(TOKENS[:8]), 8, group_idx=1)]) == []
    assert rk.apply([BlockRemoved((6,))]) == []
    assert (rk.stats.orphans, rk.stats.ignored, rk.stats.unknown_removals) == (1, 3, 1)
    assert len(rk) == 0


def test_cleared_forgets_everything() -> None:
    rk = Rekeyer(8)
    rk.apply([BlockStored((1, 2), None, tuple(TOKENS[:16]), 8)])
    assert rk.apply([AllBlocksCleared()]) == [KvCleared()]
    assert rk.cached() == [] and rk.lookup(1) == ()
    # A child of a block from before the clear is an orphan now.
    assert rk.apply([BlockStored((3,), 2, tuple(TOKENS[16:24]), 8)]) == []
