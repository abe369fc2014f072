"""Anthropic's Messages API (`--enable-anthropic-api`), driven by the official `anthropic` client
against a real frontend with a mocker worker (generation, limits, streaming), an echo worker (it
answers the rendered prompt back, so translation of system, turns and stop sequences is visible) and
an echo worker whose chat template renders tools, tool calls and tool results."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances
from turbine.models import bundled_model_path

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("anthropic")]

ECHO = "tiny-echo"
TOOLS = "tiny-tools"
JSON = {"Content-Type": "application/json"}

# Shows everything the translation hands a template: tools, assistant tool calls, tool results.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS{% for t in tools %} {{ t.function.name }}:"
    "{{ t.function.parameters | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.id }} {{ c.function.name }}"
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% if m.tool_call_id %} RESULT-FOR {{ m.tool_call_id }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("anthropic")
    tools_model = root / "tools-model"
    shutil.copytree(bundled_model_path(), tools_model)
    (tools_model / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    stack = Stack(root)
    try:
        _, url = stack.frontend("--enable-anthropic-api")
        stack.worker("--engine", "mocker", "--speedup-ratio", "1000")
        stack.worker("--engine", "echo", "--model-name", ECHO)
        stack.worker("--engine", "echo", "--model-name", TOOLS, "--model-path", str(tools_model))
        for model in (MODEL, ECHO, TOOLS):
            wait_instances(url, 1, model=model)
        yield url
    finally:
        stack.stop()


def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)


def _text(message: Any) -> str:
    assert message.content and message.content[0].type == "text"
    text: str = message.content[0].text
    return text


def test_create_and_max_tokens(served: str) -> None:
    out = client(served).messages.create(
        model=MODEL,
        max_tokens=12,
        messages=[{"role": "user", "content": "Tell me a story."}],
        metadata={"user_id": "u-1"},
        # This client version no longer has typed sampling arguments; the API still takes them.
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )
    assert out.type == "message" and out.role == "assistant" and out.model == MODEL
    assert out.id.startswith("msg_")
    assert out.stop_reason in ("max_tokens", "end_turn")
    assert out.stop_sequence is None
    assert out.usage.input_tokens > 0
    assert 1 <= out.usage.output_tokens <= 12
    # ignore_eos is not in the Messages API: ask for more tokens than the mocker's answer can end
    # within, and one of them must stop on the limit.
    reasons = {
        client(served)
        .messages.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": f"q{i}"}])
        .stop_reason
        for i in range(4)
    }
    assert "max_tokens" in reasons


def test_system_multi_turn_and_stop_sequences(served: str) -> None:
    c = client(served)
    out = c.messages.create(
        model=ECHO,
        max_tokens=200,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": [{"type": "text", "text": "first answer"}]},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
        ],
    )
    # The echo worker answers with the prompt: system first, then the turns in order.
    assert _text(out) == (
        "system\nBe brief.\nBe kind.\nuser\nfirst question\n"
        "assistant\nfirst answer\nuser\nsecond question\nassistant\n"
    )
    assert out.stop_reason == "end_turn" and out.stop_sequence is None
    count = c.messages.count_tokens(
        model=ECHO,
        system="Be brief.\nBe kind.",
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
        ],
    )
    assert count.input_tokens == out.usage.input_tokens

    stopped = c.messages.create(
        model=ECHO,
        max_tokens=200,
        messages=[{"role": "user", "content": "alpha beta HALT gamma delta"}],
        stop_sequences=["never", "HALT"],
    )
    assert _text(stopped) == "user\nalpha beta "
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "HALT"

    # A final assistant message is a prefill: the answer continues after it.
    prefilled = c.messages.create(
        model=ECHO,
        max_tokens=200,
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}],
    )
    assert _text(prefilled).endswith("assistant\nSure:")


def test_stream_event_sequence(served: str) -> None:
    c = client(served)
    with c.messages.stream(
        model=ECHO,
        max_tokens=6,
        messages=[{"role": "user", "content": "one two three four five six seven"}],
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6
    assert _text(final) == "user\none two three"  # <|im_start|> is the first of the 6 tokens

    # The raw SSE: named events (ping included, after the first block starts) and typed data.
    body = {
        "model": ECHO,
        "max_tokens": 50,
        "stream": True,
        "stop_sequences": ["four"],
        "messages": [{"role": "user", "content": "one two three four five"}],
    }
    status, headers, raw = http("POST", served + "/v1/messages", json.dumps(body).encode(), JSON)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    frames = [f for f in raw.decode().split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    datas = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert [d["type"] for d in datas] == names
    start = datas[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    text = "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta")
    assert text == "user\none two three "
    delta = datas[-2]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "four"}
    assert delta["usage"]["output_tokens"] >= 1

    # The mocker, streamed with the client's text iterator.
    with c.messages.stream(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == _text(final)
    assert final.usage.output_tokens <= 8


def test_tools_and_tool_results_reach_the_template(served: str) -> None:
    c = client(served)
    out = c.messages.create(
        model=TOOLS,
        max_tokens=400,
        tools=[
            {
                "name": "get_weather",
                "description": "Weather of a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
    )
    assert _text(out) == (
        'system\nTOOLS get_weather:{"type": "object", "properties": {"city": {"type": "string"}}}\n'
        "user\nWeather in Paris?\n"
        'assistant\nChecking.CALL toolu_1 get_weather{"city": "Paris"}\n'
        "tool\nsunny RESULT-FOR toolu_1\n"
        "user\nThanks\nassistant\n"
    )
    # tool_choice none: the template is not shown the tools.
    none = c.messages.count_tokens(
        model=TOOLS,
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "x"}],
    )
    plain = c.messages.count_tokens(model=TOOLS, messages=[{"role": "user", "content": "x"}])
    assert none.input_tokens == plain.input_tokens


BAD = [
    (
        "missing max_tokens",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        400,
        "max_tokens",
    ),
    (
        "bad role",
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "role",
    ),
    (
        "unknown model",
        {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        404,
        "nope",
    ),
    ("no messages", {"model": MODEL, "max_tokens": 5, "messages": []}, 400, "messages"),
    (
        "zero max_tokens",
        {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        400,
        "max_tokens",
    ),
    (
        "temperature above 1",
        {"model": MODEL, "max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]},
        400,
        "temperature",
    ),
    (
        "image block",
        {
            "model": MODEL,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}],
        },
        400,
        "image",
    ),
    (
        "server tool",
        {
            "model": MODEL,
            "max_tokens": 5,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": "x"}],
        },
        400,
        "tools.0",
    ),
    (
        "structured output",
        {
            "model": MODEL,
            "max_tokens": 5,
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "messages": [{"role": "user", "content": "x"}],
        },
        400,
        "output_config.format",
    ),
    (
        "over the context",
        {"model": MODEL, "max_tokens": 10**6, "messages": [{"role": "user", "content": "x"}]},
        400,
        "context length",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_anthropic_errors(
    served: str, name: str, body: dict[str, Any], status: int, mentions: str
) -> None:
    got, _, raw = http("POST", served + "/v1/messages", json.dumps(body).encode(), JSON)
    assert got == status, raw
    payload = json.loads(raw)
    assert payload["type"] == "error"
    error = payload["error"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert mentions in error["message"]


def test_client_sees_typed_errors_and_bad_bytes(served: str) -> None:
    c = client(served)
    with pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "wizard", "content": "x"}])  # type: ignore[misc,list-item]
    with pytest.raises(anthropic.BadRequestError):
        c.messages.count_tokens(model=MODEL, messages=[])
    for raw_body in (b"{not json", b"", b'{"model": "\xff", "max_tokens": 1, "messages": []}'):
        status, _, raw = http("POST", served + "/v1/messages/count_tokens", raw_body, JSON)
        assert status == 400
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_off_by_default(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        _, url = stack.frontend()
        status, _, _ = http("POST", url + "/v1/messages", b"{}", JSON)
        assert status == 404
    finally:
        stack.stop()
