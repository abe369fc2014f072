"""CompileWatch: compiles during a warm-up are expected; after it, each is a logged warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from turbine.engines.torch.compile_watch import CompileWatch


def test_compiles_after_the_warm_up_are_warnings(caplog: pytest.LogCaptureFixture) -> None:
    watch = CompileWatch()
    watch.record("before any warm-up")
    with watch.warming_up():
        watch.record("a warm-up compile")
    assert (watch.compiles, watch.late) == (2, 0)
    with caplog.at_level(logging.WARNING, logger="turbine.engines.torch.compile_watch"):
        watch.record("Triton kernel _k")
    assert (watch.compiles, watch.late) == (3, 1)
    assert "compiled Triton kernel _k while serving" in caplog.text
    # A second engine of the process warming up: its compiles are expected again.
    with watch.warming_up():
        watch.record("the second engine's graphs")
    assert watch.late == 1


def test_the_triton_hook_is_chained_and_restored() -> None:
    knobs = pytest.importorskip("triton").knobs
    seen: list[Any] = []
    before = knobs.runtime.jit_post_compile_hook

    def previous(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("repr"))

    knobs.runtime.jit_post_compile_hook = previous
    try:
        watch = CompileWatch()
        watch.open()
        hook = knobs.runtime.jit_post_compile_hook
        assert hook is not previous
        hook(
            key=None, repr="_kernel[...]", fn=None, compile={}, is_manual_warmup=False, already_compiled=False
        )
        assert watch.compiles == 1 and seen == ["_kernel[...]"]
        watch.close()
        assert knobs.runtime.jit_post_compile_hook is previous
    finally:
        knobs.runtime.jit_post_compile_hook = before


@pytest.mark.slow  # loads a model and runs its warm-up
def test_a_full_budget_warm_up_step_writes_only_the_scratch_block(tiny_llama_dir: Path) -> None:
    """A prompt served, then a full-budget warm-up (longer than the tiny model's context, so split
    into several sequences): every block but the scratch one holds exactly what it held, and the
    prompt served again from the prefix cache gives the same greedy tokens."""
    import asyncio

    import torch

    from turbine.engines.base import NullEventSink
    from turbine.engines.torch.engine import TorchEngine, load_model

    from .helpers import collect, engine_config, request, tokens_of

    cfg = engine_config(tiny_llama_dir)
    loaded = load_model(cfg)
    prompt = list(range(20, 150))

    async def serve() -> tuple[list[int], list[int], int, bool]:
        engine = TorchEngine(cfg, loaded, worker_id=1, events=NullEventSink())
        await engine.start()
        try:
            executor: Any = engine.executor()
            first = await collect(engine, request(prompt, 12, temperature=0.0))
            blocks = engine.blocks.num_blocks
            before = [(k[:blocks].clone(), v[:blocks].clone()) for k, v in executor.kv_cache]
            await executor.warm_up(blocks, 2500)
            untouched = all(
                torch.equal(k[:blocks], k0) and torch.equal(v[:blocks], v0)
                for (k, v), (k0, v0) in zip(executor.kv_cache, before, strict=True)
            )
            again = await collect(engine, request(prompt, 12, temperature=0.0))
            return tokens_of(first), tokens_of(again), again[-1].cached_tokens or 0, untouched
        finally:
            await engine.stop()

    first, again, cached, untouched = asyncio.run(serve())
    assert untouched
    assert cached > 0 and again == first
