"""Padded step sizes: the few row counts a prefill or mixed step is padded up to.

Everything a GPU library prepares per shape (cuBLAS kernel choice, allocator blocks, kernel
specialisations) is then met at start-up, where the warm-up runs each size once, instead of on the
request path at every new prompt length. Sizes grow geometrically so padding wastes at most
1 / `per_octave` of a step.
"""

from __future__ import annotations


def bucket(count: int, *, floor: int = 16, per_octave: int = 8) -> int:
    """The smallest padded size >= `count`: a multiple of `floor` up to `floor * per_octave`, then
    `per_octave` evenly spaced sizes in every doubling."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    octave = 1 << (count - 1).bit_length()  # the power of two >= count
    step = max(floor, octave // (2 * per_octave))
    return -(-count // step) * step


def buckets(limit: int, *, floor: int = 16, per_octave: int = 8) -> list[int]:
    """Every padded size of counts 1..`limit`, ascending (the last one may exceed `limit`)."""
    sizes: list[int] = []
    count = 1
    while count <= limit:
        size = bucket(count, floor=floor, per_octave=per_octave)
        sizes.append(size)
        count = size + 1
    return sizes
