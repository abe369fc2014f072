"""Run the torch engine in-process over a model directory, and `transformers` beside it as the oracle."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turbine.engines.base import NullEventSink
from turbine.engines.torch.engine import TorchEngine, TorchEngineConfig, load_model
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput

_ids = iter(range(10**9))


def request(
    tokens: Sequence[int], max_tokens: int, *, ignore_eos: bool = True, **sampling: Any
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{next(_ids)}",
        model="m",
        token_ids=list(tokens),
        sampling=SamplingOptions(**sampling),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=ignore_eos),
        eos_token_ids=(2,),
    )


async def collect(engine: TorchEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]


def tokens_of(outputs: list[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


TEST_KV_BYTES = 64 << 20
"""A test engine's CPU KV cache: thousands of blocks of the tiny model, where the default (1 GiB) is
memory every engine would zero (and some tests copy and compare) for nothing."""


def engine_config(model_dir: Path, **config: Any) -> TorchEngineConfig:
    """A test engine's configuration: CPU, float32, `TEST_KV_BYTES`, unless `config` says otherwise."""
    config.setdefault("device", "cpu")
    config.setdefault("dtype", "float32")
    config.setdefault("kv_cache_memory_bytes", TEST_KV_BYTES)
    return TorchEngineConfig(model_dir=model_dir, progress=False, **config)


def run_engine(
    model_dir: Path, requests: list[PreprocessedRequest], **config: Any
) -> tuple[list[list[EngineOutput]], TorchEngine]:
    """Serve every request concurrently on a fresh engine; returns the outputs and the stopped engine."""
    cfg = engine_config(model_dir, **config)
    loaded = load_model(cfg)

    async def main() -> tuple[list[list[EngineOutput]], TorchEngine]:
        engine = TorchEngine(cfg, loaded, worker_id=1, events=NullEventSink())
        await engine.start()
        try:
            return list(await asyncio.gather(*(collect(engine, r) for r in requests))), engine
        finally:
            await engine.stop()

    return asyncio.run(main())
