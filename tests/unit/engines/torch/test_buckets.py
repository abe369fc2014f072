"""Padded step sizes (`buckets.py`) and a padded engine's output against an unpadded one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from turbine.engines.torch.buckets import bucket, buckets


def test_a_bucket_holds_its_count_and_wastes_at_most_an_eighth() -> None:
    for count in range(1, 20_000):
        size = bucket(count)
        assert size >= count
        assert size % 16 == 0
        assert size - count < max(16, count / 8 + 1)


def test_every_count_pads_to_one_of_the_listed_sizes() -> None:
    sizes = buckets(8192)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 8192
    assert {bucket(c) for c in range(1, 8193)} == set(sizes)
    assert len(sizes) < 60  # few enough to run each one at start-up
    assert buckets(20, floor=8) == [8, 16, 24]
    with pytest.raises(ValueError, match="positive"):
        bucket(0)


def test_padded_steps_give_the_tokens_of_unpadded_ones(tiny_llama_dir: Path) -> None:
    """Concurrent prompts of varied lengths (prefill, mixed and decode steps): padding every step
    with filler rows on the scratch block changes no greedy token, and leaves every other block as
    the unpadded run wrote it."""
    import torch

    from turbine.engines.base import NullEventSink
    from turbine.engines.torch.engine import TorchEngine, load_model

    from .helpers import collect, engine_config, request, tokens_of

    cfg = engine_config(tiny_llama_dir)
    loaded = load_model(cfg)
    prompts = [list(range(3, 3 + n)) for n in (5, 37, 61, 90)]

    async def serve(pad: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
        engine = TorchEngine(cfg, loaded, worker_id=1, events=NullEventSink())
        await engine.start()
        try:
            executor: Any = engine.executor()
            executor.pad_steps = pad
            await executor.warm_up(engine.blocks.num_blocks, 200, 4)
            outs = await asyncio.gather(*(collect(engine, request(p, 9, temperature=0.0)) for p in prompts))
            blocks = engine.blocks.num_blocks
            return [tokens_of(o) for o in outs], [k[:blocks].clone() for k, _ in executor.kv_cache]
        finally:
            await engine.stop()

    plain, plain_cache = asyncio.run(serve(False))
    padded, padded_cache = asyncio.run(serve(True))
    assert padded == plain
    assert all(len(t) == 9 for t in padded)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain_cache, padded_cache, strict=True))
