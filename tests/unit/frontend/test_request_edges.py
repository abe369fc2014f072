"""Edges of the request and reply shapes, over real HTTP in one process: the byte offset of a
non-UTF-8 body, a message without content, Anthropic's error shape for routing errors, and the
content of a reply that is all reasoning."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.unit.frontend.harness import MODEL, Harness
from turbine.engines.echo import EchoEngine
from turbine.frontend.anthropic import AnthropicService
from turbine.frontend.http import OpenAIService
from turbine.frontend.openai_format import Choice, chat_completion

pytestmark = pytest.mark.integration


async def test_a_non_utf8_body_is_a_400_giving_the_body_offset(
    harness: tuple[Harness, TestClient[Any, Any]],
) -> None:
    h, client = harness
    await h.add_worker(EchoEngine())
    await h.wait_instances(1)
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "abc\xffdef"}]}'
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    offset = body.index(b"\xff")
    assert message.endswith(f"at byte {offset}"), message


@pytest.mark.parametrize(
    "message", [{"role": "user"}, {"role": "user", "content": None}, {"role": "assistant"}]
)
async def test_a_message_without_content_is_a_400_naming_it(
    harness: tuple[Harness, TestClient[Any, Any]], message: dict[str, Any]
) -> None:
    h, client = harness
    await h.add_worker(EchoEngine())
    await h.wait_instances(1)
    messages = [{"role": "system", "content": "be brief"}, message]
    resp = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "messages[1].content"
    assert "TypeError" not in error["message"] and "NoneType" not in error["message"]
    # An assistant turn that only carries tool calls needs no content.
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    ok = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            ],
        },
    )
    assert ok.status == 200, await ok.text()


async def test_anthropic_routes_answer_routing_errors_in_anthropic_shape() -> None:
    h = Harness()
    service = OpenAIService(h.registry, max_body_bytes=1 << 20)
    app = service.app()
    AnthropicService(h.registry, service).add_routes(app)
    from aiohttp.test_utils import TestServer

    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        for method, path, status in (
            ("GET", "/v1/messages", 405),
            ("PUT", "/v1/messages/count_tokens", 405),
            ("POST", "/v1/messages/nothing-here", 404),
        ):
            resp = await client.request(method, path)
            body = await resp.json()
            assert resp.status == status
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        # The OpenAI routes keep OpenAI's shape.
        resp = await client.get("/v1/chat/completions")
        assert resp.status == 405 and "error" in await resp.json() and "type" not in await resp.json()
    finally:
        await client.close()
        await h.store.close()
        h.executor.shutdown()


def test_a_reply_that_is_all_reasoning_has_null_content() -> None:
    body = orjson.loads(
        chat_completion(
            request_id="r",
            model="m",
            created=0,
            choices=[
                Choice("", "stop", None, reasoning="thinking only"),
                Choice("hi", "stop", None, reasoning="x"),
            ],
            usage={},
        )
    )
    first, second = (c["message"] for c in body["choices"])
    assert first["content"] is None and first["reasoning_content"] == "thinking only"
    assert second["content"] == "hi"
