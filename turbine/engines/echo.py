"""EchoEngine: streams the prompt's own tokens back, one per step.

The simplest engine that honours the Engine contract; used to test frontends, transports and workers
without any model or KV-cache simulation (see `turbine.engines.mocker` for that).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from turbine.engines.base import EngineCapacity
from turbine.engines.embedding import hash_embedding
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason


class EchoEngine:
    """Echo the prompt: token i of the output is token i of the prompt.

    Stops with "length" after `max_tokens` tokens, or with "stop" when the prompt is exhausted,
    whichever comes first. It holds no KV cache, so `cached_tokens` is always 0.
    """

    def __init__(self, delay_s: float = 0.0, block_size: int = 64) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._delay_s = delay_s
        self._block_size = block_size

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(kv_block_size=self._block_size)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def embed(self, token_ids: list[int]) -> list[float]:
        """A deterministic hash vector (see `turbine.engines.embedding`)."""
        return hash_embedding(token_ids)

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        prompt = request.token_ids
        max_tokens = request.stop.max_tokens
        emitted = 0
        while emitted < max_tokens and emitted < len(prompt):
            # Sleep even when delay is 0 so that many echo streams interleave on one loop.
            await asyncio.sleep(self._delay_s)
            token = prompt[emitted]
            emitted += 1
            if emitted >= max_tokens:
                yield EngineOutput(token_ids=[token], finish_reason=FinishReason.LENGTH, cached_tokens=0)
                return
            if emitted >= len(prompt):
                yield EngineOutput(token_ids=[token], finish_reason=FinishReason.STOP, cached_tokens=0)
                return
            yield EngineOutput(token_ids=[token])
        # Only reached without emitting anything: an empty prompt or max_tokens <= 0.
        reason = FinishReason.LENGTH if max_tokens <= 0 and prompt else FinishReason.STOP
        yield EngineOutput(finish_reason=reason, cached_tokens=0)
