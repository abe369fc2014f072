"""tool_use blocks through the ToolCallSplitter seam: a frontend in one process (memory discovery,
in-process request plane, echo engine) with the Anthropic routes and a small Hermes-style splitter
written here, driven by the official `anthropic` client, stream and not. The echo engine answers with
its prompt, so a `<tool_call>` written in the question comes back as model output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.unit.frontend.harness import MODEL, Harness
from turbine.engines.echo import EchoEngine
from turbine.frontend.anthropic import AnthropicService, ToolCallSplitter
from turbine.frontend.anthropic_format import ToolUse, tool_use
from turbine.frontend.anthropic_translate import Translated
from turbine.frontend.http import OpenAIService
from turbine.frontend.pipeline import ModelPipeline

pytestmark = pytest.mark.integration

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesLike:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, held back while it may be one."""

    def __init__(self) -> None:
        self.buffer = ""
        self.inside = False
        self.calls: list[ToolUse] = []

    def feed(self, text: str) -> str:
        self.buffer += text
        shown: list[str] = []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end == -1:
                    return "".join(shown)
                call = json.loads(self.buffer[:end])
                self.calls.append(tool_use(call["name"], json.dumps(call["arguments"])))
                self.buffer = self.buffer[end + len(CLOSE) :]
                self.inside = False
                continue
            at = self.buffer.find(OPEN)
            if at == -1:
                keep = max((k for k in range(1, len(OPEN)) if self.buffer.endswith(OPEN[:k])), default=0)
                cut = len(self.buffer) - keep
                shown.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                return "".join(shown)
            shown.append(self.buffer[:at])
            self.buffer = self.buffer[at + len(OPEN) :]
            self.inside = True

    def finish(self) -> tuple[str, list[ToolUse]]:
        rest, self.buffer = self.buffer, ""
        return (OPEN + rest if self.inside else rest), self.calls


def _splitters(pipeline: ModelPipeline, translated: Translated) -> ToolCallSplitter | None:
    return HermesLike() if translated.chat.tools else None


@pytest.fixture
async def api() -> AsyncIterator[anthropic.AsyncAnthropic]:
    h = Harness()
    watcher = asyncio.create_task(h.registry.run())
    service = OpenAIService(h.registry, max_body_bytes=1 << 20)
    app = service.app()
    AnthropicService(h.registry, service, _splitters).add_routes(app)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        await h.add_worker(EchoEngine())
        await h.wait_instances(1)
        yield anthropic.AsyncAnthropic(base_url=str(client.make_url("")), api_key="unused", max_retries=0)
    finally:
        await client.close()
        for w in h.workers:
            await w.shutdown(1.0)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await h.store.close()
        h.executor.shutdown()


TOOLS: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


async def test_tool_calls_become_tool_use_blocks(api: anthropic.AsyncAnthropic) -> None:
    out = await api.messages.create(
        model=MODEL,
        max_tokens=500,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Let me see. " + CALL}],
    )
    assert out.stop_reason == "tool_use"
    text, call = out.content
    assert text.type == "text" and text.text == "user\nLet me see. \nassistant\n"
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_")

    async with api.messages.stream(
        model=MODEL, max_tokens=500, tools=TOOLS, messages=[{"role": "user", "content": CALL + CALL}]
    ) as stream:
        kinds = [(e.type, getattr(e, "index", None)) async for e in stream]
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "Paris"}] * 2
    # Three blocks, each opened and closed in turn, the tool calls' input in one JSON delta each.
    starts = [i for kind, i in kinds if kind == "content_block_start"]
    stops = [i for kind, i in kinds if kind == "content_block_stop"]
    assert starts == stops == [0, 1, 2]
    # No markup leaked into the streamed text.
    assert OPEN not in final.content[0].text  # type: ignore[union-attr]


async def test_unfinished_call_stays_text(api: anthropic.AsyncAnthropic) -> None:
    broken = '<tool_call>{"name": "get_weather"'
    out = await api.messages.create(
        model=MODEL, max_tokens=500, tools=TOOLS, messages=[{"role": "user", "content": broken}]
    )
    assert out.stop_reason == "end_turn"
    assert [b.type for b in out.content] == ["text"]
    assert broken in out.content[0].text  # type: ignore[union-attr]
