"""EchoEngine streams the prompt back."""

from __future__ import annotations

import pytest

from turbine.engines.base import Engine, EngineCapacity
from turbine.engines.echo import EchoEngine
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.unit


def req(tokens: list[int], max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest("r", "m", tokens, SamplingOptions(), StopConditions(max_tokens=max_tokens))


async def run(engine: Engine, request: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def test_echoes_whole_prompt_then_stops() -> None:
    outs = await run(EchoEngine(), req([5, 6, 7], 10))
    assert [o.token_ids for o in outs] == [[5], [6], [7]]
    assert outs[-1].finish_reason == FinishReason.STOP and outs[-1].cached_tokens == 0
    assert all(o.finish_reason is None for o in outs[:-1])


async def test_max_tokens_gives_length() -> None:
    outs = await run(EchoEngine(), req([5, 6, 7], 2))
    assert [o.token_ids for o in outs] == [[5], [6]]
    assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].cached_tokens == 0


async def test_empty_prompt_and_zero_max_tokens() -> None:
    assert await run(EchoEngine(), req([], 4)) == [
        EngineOutput(finish_reason=FinishReason.STOP, cached_tokens=0)
    ]
    outs = await run(EchoEngine(), req([1], 0))
    assert outs == [EngineOutput(finish_reason=FinishReason.LENGTH, cached_tokens=0)]


async def test_delay_and_capacity() -> None:
    engine = EchoEngine(delay_s=0.001, block_size=32)
    await engine.start()
    assert engine.capacity() == EngineCapacity(kv_block_size=32)
    outs = await run(engine, req([1, 2], 5))
    assert [o.token_ids for o in outs] == [[1], [2]]
    await engine.stop()
