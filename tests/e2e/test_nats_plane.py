"""Frontend and worker processes talking over the NATS request plane (a real nats-server)."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, wait_instances
from tests.nats_server import NatsServer

pytestmark = pytest.mark.e2e

FAST = ("--engine", "mocker", "--speedup-ratio", "1000")


def test_chat_over_nats_stream_and_not(stack: Stack, nats_server: NatsServer) -> None:
    plane = ("--request-plane", "nats", "--nats-server", nats_server.url)
    _, url = stack.frontend(*plane)
    stack.worker(*FAST, *plane, "--num-workers", "2")
    wait_instances(url, 2)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)

    messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
    chat = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=7)
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens == 12

    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    # Workers registered their NATS subjects as addresses, with transport "nats" (the file store
    # keeps msgpack records: look for the strings in them).
    records = [p.read_bytes() for p in stack.store.rglob("*") if p.is_file() and "instances" in str(p)]
    assert len(records) == 2
    assert all(b"\xa4nats" in r and b"turbine.req." in r for r in records)
