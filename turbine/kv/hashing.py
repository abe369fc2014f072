"""Block hashes over token ids, bit-compatible with Dynamo's.

Shared by the KV router (hashing every prompt, on its hot path) and by workers (naming the blocks they
publish in KV events), so both sides must agree bit for bit:

- only full blocks are hashed; a trailing partial block is ignored;
- the local ("tokens") hash of a block is XXH3-64, seed 1337, over its token ids packed as
  little-endian u32;
- the sequence hash chains them: `seq[0] = local[0]`, `seq[i] = XXH3-64(seed 1337)` over
  `u64le(seq[i-1]) ‖ u64le(local[i])`, so a block's sequence hash names its whole prefix.

Speed: the prompt is packed once into a contiguous u32 buffer and each block is hashed from a
zero-copy memoryview slice of it; packing per block with `struct.pack` is several times slower on
8k-token prompts.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import xxhash

HASH_SEED = 1337
"""Seed Dynamo uses for both the local and the chained hash."""

_U32 = "I"
# `array("I")` is native-endian and its item size is platform-defined; we rely on 4-byte items and
# byte-swap on big-endian hosts so the hashed bytes are always little-endian u32.
if array(_U32).itemsize != 4:  # pragma: no cover - no mainstream platform hits this
    raise ImportError("turbine.kv.hashing needs a 4-byte array('I')")
_BIG_ENDIAN = sys.byteorder == "big"

_pack_pair = struct.Struct("<QQ").pack
_xxh3 = xxhash.xxh3_64_intdigest


class BlockHashes(NamedTuple):
    """The hashes of a token sequence's full blocks, index i for block i."""

    local: list[int]
    """Hash of each block's own tokens (Dynamo's `tokens_hash`)."""
    sequence: list[int]
    """Chained hash naming the block together with every block before it (Dynamo's `block_hash`)."""


def _as_u32_bytes(token_ids: Sequence[int], num_tokens: int) -> memoryview:
    """Little-endian u32 bytes of the first `num_tokens` tokens, without copying when already packed."""
    if isinstance(token_ids, array) and token_ids.typecode == _U32 and not _BIG_ENDIAN:
        packed = token_ids
    else:
        # One C-level conversion for the whole prompt (`fromlist` is faster than the
        # `array(code, list)` constructor); raises OverflowError on ids outside u32.
        packed = array(_U32)
        if isinstance(token_ids, list):
            packed.fromlist(token_ids if len(token_ids) == num_tokens else token_ids[:num_tokens])
        else:  # tuples, arrays of other item types, ...
            packed.fromlist(list(token_ids[:num_tokens]))
        if _BIG_ENDIAN:  # pragma: no cover
            packed.byteswap()
    return memoryview(packed).cast("B")


def local_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """XXH3-64 (seed 1337) of each full block's tokens as little-endian u32; partial tail ignored."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    buf = _as_u32_bytes(token_ids, num_blocks * block_size)
    stride = block_size * 4
    xxh3 = _xxh3
    return [xxh3(buf[off : off + stride], HASH_SEED) for off in range(0, num_blocks * stride, stride)]


def chain_hashes(local: Sequence[int], parent: int | None = None) -> list[int]:
    """Sequence hashes of blocks whose local hashes are `local`.

    `parent` is the sequence hash of the block before `local[0]` (None when `local[0]` is the first
    block of the sequence), which lets callers extend a chain one block at a time.
    """
    out: list[int] = []
    append = out.append
    xxh3 = _xxh3
    pack = _pack_pair
    prev = parent
    for h in local:
        prev = h if prev is None else xxh3(pack(prev, h), HASH_SEED)
        append(prev)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int) -> BlockHashes:
    """Local and chained sequence hashes of every full block of `token_ids`."""
    local = local_block_hashes(token_ids, block_size)
    return BlockHashes(local, chain_hashes(local))


def hash_block(token_ids: Sequence[int], parent: int | None) -> tuple[int, int]:
    """(local, sequence) hash of one full block following the block whose sequence hash is `parent`.

    For workers that register blocks one at a time as they fill during decode.
    """
    local = _xxh3(_as_u32_bytes(token_ids, len(token_ids)), HASH_SEED)
    seq = local if parent is None else _xxh3(_pack_pair(parent, local), HASH_SEED)
    return local, seq
