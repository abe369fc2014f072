"""The torch engine's greedy outputs equal `transformers`' `generate` token for token (float32), with
continuous batching, prefix-cache hits, chunked prefill and preemption all exercised in one run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

NEW_TOKENS = 24


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    shared = [rng.randrange(3, 4096) for _ in range(40)]  # 5 full blocks of 8: cache hits
    prompts = [shared + [rng.randrange(3, 4096) for _ in range(n)] for n in (3, 9, 17)]
    prompts.append([rng.randrange(3, 4096) for _ in range(150)])  # > the 64-token chunk budget
    prompts += [[rng.randrange(3, 4096) for _ in range(n)] for n in (1, 5, 12, 33, 64, 70)]
    return prompts


def _oracle(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = hf.generate(
            torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out.append(ids[0, len(p) :].tolist())
    return out


def test_greedy_equals_transformers_with_cache_hits_chunking_and_preemption(tiny_llama_dir: Path) -> None:
    prompts = _prompts()
    expected = _oracle(tiny_llama_dir, prompts)
    # 40 blocks of 8 tokens cannot hold all ten sequences at full length (~78 blocks): preemption.
    results, engine = run_engine(
        tiny_llama_dir,
        [request(p, NEW_TOKENS, temperature=0.0) for p in prompts],
        block_size=8,
        num_gpu_blocks=40,
        max_num_batched_tokens=64,
        max_num_seqs=16,
    )
    assert [tokens_of(r) for r in results] == expected
    assert all(r[-1].finish_reason == "length" for r in results)
    assert engine.scheduler.num_preemptions > 0
    cached = [r[-1].cached_tokens or 0 for r in results]
    assert max(cached[1:3]) >= 40, cached  # a later member of the shared-prefix group hit its blocks
    assert engine.blocks.num_used_blocks == 0  # every finished sequence gave its blocks back


def test_a_continuation_prompt_continues_exactly(tiny_llama_dir: Path) -> None:
    """A request whose prompt is an earlier prompt plus part of its output (what migration sends)
    continues exactly as the uninterrupted run did."""
    prompt = list(range(100, 140))
    (first,), _ = run_engine(tiny_llama_dir, [request(prompt, 40, temperature=0.0)], block_size=8)
    full = tokens_of(first)
    (head, tail), _ = run_engine(
        tiny_llama_dir,
        [request(prompt, 20, temperature=0.0), request(prompt + full[:20], 20, temperature=0.0)],
        block_size=8,
        num_gpu_blocks=64,
    )
    assert tokens_of(head) == full[:20]
    assert tokens_of(tail) == full[20:]


def test_cancelling_a_stream_frees_its_blocks_at_once(tiny_llama_dir: Path) -> None:
    import asyncio
    import contextlib

    from turbine.engines.base import NullEventSink
    from turbine.engines.torch.engine import TorchEngine, TorchEngineConfig, load_model

    cfg = TorchEngineConfig(
        model_dir=tiny_llama_dir,
        device="cpu",
        dtype="float32",
        block_size=8,
        num_gpu_blocks=64,
        progress=False,
    )
    loaded = load_model(cfg)

    async def main() -> tuple[int, int]:
        engine = TorchEngine(cfg, loaded, worker_id=1, events=NullEventSink())
        await engine.start()
        try:
            stream = engine.generate(request(list(range(100, 140)), 500, temperature=0.0))
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.token_ids:
                        break  # the client goes away after its first token
            held_after = engine.blocks.num_used_blocks
            # The scheduler lets go of it at its next step.
            await wait_for(lambda: not engine.scheduler.running and not engine.scheduler.waiting)
            return held_after, len(engine.scheduler.running) + len(engine.scheduler.waiting)
        finally:
            await engine.stop()

    held, queued = asyncio.run(main())
    assert held == 0 and queued == 0
