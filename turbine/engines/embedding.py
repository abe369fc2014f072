"""Deterministic stand-in embeddings for the GPU-free engines (echo, mocker).

The vector of a token sequence has `EMBEDDING_DIM` components: component i is XXH3-64 of the
sequence's token ids (little-endian uint32) seeded with i, mapped to [-1, 1); the vector is then
L2-normalised. Same tokens → same vector, on every worker and every run; an empty sequence gets the
zero vector. The values carry no meaning beyond identity: they only exercise the serving path.
"""

from __future__ import annotations

import math
import struct

import xxhash

EMBEDDING_DIM = 64
_SCALE = 2.0 / 2.0**64


def hash_embedding(token_ids: list[int], dim: int = EMBEDDING_DIM) -> list[float]:
    if not token_ids:
        return [0.0] * dim
    data = struct.pack(f"<{len(token_ids)}I", *token_ids)
    raw = [xxhash.xxh3_64_intdigest(data, seed) * _SCALE - 1.0 for seed in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
