"""Block hashes must match Dynamo's bit for bit (golden values from REFERENCE.md)."""

from __future__ import annotations

import struct
from array import array

import pytest
import xxhash

from turbine.kv.hashing import BlockHashes, block_hashes, chain_hashes, hash_block, local_block_hashes

pytestmark = pytest.mark.unit

GOLDEN_LOCAL = {
    (100, 32): [5756925433886871916, 13958166640625465031, 2381933239375015279],
    (100, 16): [
        15310707395893867146,
        15292316782987903195,
        5532946206955930018,
        14928757266181269122,
        16071864640778362908,
        6217069463196640829,
    ],
    (64, 64): [3480597578098033343],
}


def _reference_local(tokens: list[int], block_size: int) -> list[int]:
    """The formula exactly as REFERENCE.md states it, one struct.pack per block."""
    n = len(tokens) // block_size
    return [
        xxhash.xxh3_64_intdigest(
            struct.pack(f"<{block_size}I", *tokens[i * block_size : (i + 1) * block_size]), seed=1337
        )
        for i in range(n)
    ]


def _reference_chain(local: list[int]) -> list[int]:
    seq: list[int] = []
    for i, h in enumerate(local):
        seq.append(h if i == 0 else xxhash.xxh3_64_intdigest(struct.pack("<QQ", seq[-1], h), seed=1337))
    return seq


@pytest.mark.parametrize(("num_tokens", "block_size"), sorted(GOLDEN_LOCAL))
def test_local_hashes_match_golden_values(num_tokens: int, block_size: int) -> None:
    assert local_block_hashes(list(range(num_tokens)), block_size) == GOLDEN_LOCAL[num_tokens, block_size]


def test_other_sequence_types_give_the_same_hashes() -> None:
    assert local_block_hashes(array("I", range(100)), 32) == GOLDEN_LOCAL[100, 32]
    assert local_block_hashes(array("q", range(100)), 32) == GOLDEN_LOCAL[100, 32]
    assert local_block_hashes(tuple(range(100)), 16) == GOLDEN_LOCAL[100, 16]
    assert local_block_hashes(range(64), 64) == GOLDEN_LOCAL[64, 64]


def test_partial_tail_and_short_inputs_are_ignored() -> None:
    assert local_block_hashes(list(range(63)), 64) == []
    assert local_block_hashes([], 16) == []
    assert block_hashes(list(range(15)), 16) == BlockHashes([], [])


def test_chain_formula() -> None:
    local = GOLDEN_LOCAL[100, 16]
    seq = chain_hashes(local)
    assert seq[0] == local[0]
    assert seq[1] == xxhash.xxh3_64_intdigest(struct.pack("<QQ", local[0], local[1]), seed=1337)
    assert seq == _reference_chain(local)
    # Extending a chain from a parent equals hashing the whole chain at once.
    assert chain_hashes(local[3:], parent=seq[2]) == seq[3:]


def test_block_hashes_matches_reference_on_large_ids() -> None:
    tokens = [(i * 2654435761) % (1 << 32) for i in range(1000)]
    got = block_hashes(tokens, 64)
    local = _reference_local(tokens, 64)
    assert got.local == local
    assert got.sequence == _reference_chain(local)


def test_hash_block_extends_chain_one_block_at_a_time() -> None:
    tokens = list(range(100))
    full = block_hashes(tokens, 16)
    parent: int | None = None
    for i in range(len(full.local)):
        local, seq = hash_block(tokens[i * 16 : (i + 1) * 16], parent)
        assert (local, seq) == (full.local[i], full.sequence[i])
        parent = seq


def test_ids_outside_u32_are_rejected() -> None:
    with pytest.raises(OverflowError):
        local_block_hashes([1 << 32] * 16, 16)
    with pytest.raises(OverflowError):
        local_block_hashes([-1] * 16, 16)
    with pytest.raises(ValueError):
        local_block_hashes([1] * 16, 0)
