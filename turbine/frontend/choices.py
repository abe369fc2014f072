"""A request's n choices (`n > 1`): their joint usage, collecting one, interleaving their streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from turbine.frontend.openai_format import Choice
from turbine.frontend.pipeline import Generation
from turbine.postprocess.postprocessor import TextDelta


def usage_of(gens: list[Generation], per_prompt: int = 1) -> dict[str, Any]:
    """`per_prompt` choices of each prompt, prompt by prompt: each prompt counts once (as OpenAI's
    usage does)."""
    usage = gens[0].usage()
    if len(gens) > 1:
        completion = sum(g.completion_tokens for g in gens)
        prompt = sum(g.prompt_tokens for g in gens[:: max(1, per_prompt)])
        usage["prompt_tokens"] = prompt
        usage["completion_tokens"] = completion
        usage["total_tokens"] = prompt + completion
    return usage


async def collect(gen: Generation, first: TextDelta) -> Choice:
    """The whole choice: its text, finish reason and logprobs (None if no delta carried any), and
    what the model's parsers split off: reasoning and tool calls."""
    parts = [first.text]
    reasoning = [first.reasoning]
    calls = list(first.tool_calls)
    finish = first.finish_reason
    logprobs = first.logprobs
    if finish is None:
        async for delta in gen:
            parts.append(delta.text)
            reasoning.append(delta.reasoning)
            calls += delta.tool_calls
            finish = delta.finish_reason
            if delta.logprobs is not None:
                logprobs = delta.logprobs if logprobs is None else logprobs + delta.logprobs
    assert finish is not None
    return Choice("".join(parts), finish.value, logprobs, "".join(reasoning), tuple(calls))


async def merge(gens: list[Generation], firsts: list[TextDelta]) -> AsyncIterator[tuple[int, TextDelta]]:
    """Interleave the choices' deltas as they arrive, each tagged with its choice index."""
    queue: asyncio.Queue[tuple[int, TextDelta] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, gen: Generation) -> None:
        try:
            async for delta in gen:
                queue.put_nowait((index, delta))
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    pumps = [
        asyncio.create_task(pump(i, g))
        for i, (g, f) in enumerate(zip(gens, firsts, strict=True))
        if f.finish_reason is None
    ]
    try:
        remaining = len(pumps)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
