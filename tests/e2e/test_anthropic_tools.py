"""Tool calls and reasoning on Anthropic's Messages API, end to end: a scripted worker (`--engine
scripted`) writes Hermes-style calls and `<think>` reasoning as real tokens, the frontend parses them
and the official `anthropic` client reads `tool_use` and `thinking` blocks, stream and not.

The parsers come from both places the frontend takes them from: the worker's card names the reasoning
parser (`--reasoning-parser qwen3`), the frontend's `--tool-call-parser hermes` the tool-call parser.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any, cast

import anthropic
import pytest
from anthropic.types import Message, MessageParam, ToolParam

from tests.e2e.conftest import Stack, wait_instances
from turbine.models import bundled_model_path

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("anthropic_tools")]

MODEL = "m-hermes"
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
MALFORMED = 'Oops <tool_call>{"name": "get_weather", "arguments": {</tool_call> ok'
SCRIPT = [
    # A tool result ("sunny", rendered as a tool message) comes back: the model answers in text.
    {"when": "<|im_start|>tool\nsunny", "reply": "It is sunny in Paris."},
    {"when": "case=hermes", "reply": "Let me check.\n" + CALL},
    {"when": "case=two", "reply": CALL + CALL.replace("Paris", "Rome")},
    {"when": "case=malformed", "reply": MALFORMED},
    {"when": "case=think", "reply": "<think>The user wants weather.</think>Checking.\n" + CALL},
]
TOOLS: list[ToolParam] = [
    {
        "name": "get_weather",
        "description": "Current weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
PARIS = {"city": "Paris"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("anthropic-tools")
    model = root / "model"
    shutil.copytree(bundled_model_path(), model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    script = root / "script.json"
    script.write_text(json.dumps(SCRIPT))
    stack = Stack(root)
    try:
        _, url = stack.frontend("--enable-anthropic-api", "--tool-call-parser", "hermes")
        stack.worker(
            "--engine", "scripted", "--script-file", str(script), "--model-path", str(model),
            "--model-name", MODEL, "--reasoning-parser", "qwen3",
        )  # fmt: skip
        wait_instances(url, 1, model=MODEL)
        yield url
    finally:
        stack.stop()


def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)


def ask(case: str) -> list[MessageParam]:
    return [{"role": "user", "content": f"case={case}"}]


def create(url: str, case: str, **kwargs: Any) -> Message:
    out = client(url).messages.create(model=MODEL, max_tokens=200, messages=ask(case), **kwargs)
    assert isinstance(out, Message)
    return out


def blocks(message: Message) -> list[tuple[str, Any]]:
    """(type, the block's payload) of each content block."""
    out: list[tuple[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            out.append(("text", block.text))
        elif block.type == "thinking":
            out.append(("thinking", block.thinking))
        elif block.type == "tool_use":
            assert block.id.startswith("toolu_")
            out.append(("tool_use", (block.name, block.input)))
        else:
            raise AssertionError(f"unexpected block {block.type}")
    return out


def raw_events(url: str, case: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The stream's events as the client decodes them, as plain dicts."""
    stream = client(url).messages.create(
        model=MODEL, max_tokens=200, messages=ask(case), stream=True, **kwargs
    )
    return [event.model_dump() for event in stream]


def test_tool_use_blocks_after_text(served: str) -> None:
    out = create(served, "hermes", tools=TOOLS)
    assert out.stop_reason == "tool_use"
    assert blocks(out) == [("text", "Let me check.\n"), ("tool_use", ("get_weather", PARIS))]

    two = create(served, "two", tools=TOOLS, tool_choice={"type": "auto"})
    assert two.stop_reason == "tool_use"
    assert blocks(two) == [
        ("tool_use", ("get_weather", PARIS)),
        ("tool_use", ("get_weather", {"city": "Rome"})),
    ]
    ids = [b.id for b in two.content if b.type == "tool_use"]
    assert len(set(ids)) == 2
    # `any` / `tool` are enforced by engines that constrain their output; the scripted one cannot.
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        with pytest.raises(anthropic.BadRequestError):
            create(served, "two", tools=TOOLS, tool_choice=choice)


def test_streamed_tool_use_has_anthropics_event_shape(served: str) -> None:
    events = raw_events(served, "hermes", tools=TOOLS)
    kinds = [e["type"] for e in events]
    # (The client drops `ping` events.)
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    tool_block = starts[1]["content_block"]
    assert tool_block["name"] == "get_weather" and tool_block["input"] == {}
    assert tool_block["id"].startswith("toolu_")
    # The tool block: start, input_json_delta fragment(s) that join into the input, stop.
    index = starts[1]["index"]
    of_tool = [e for e in events if e.get("index") == index]
    assert of_tool[0]["type"] == "content_block_start" and of_tool[-1]["type"] == "content_block_stop"
    fragments = [e["delta"] for e in of_tool[1:-1]]
    assert fragments and all(f["type"] == "input_json_delta" for f in fragments)
    assert json.loads("".join(f["partial_json"] for f in fragments)) == PARIS
    # The text block closes before the tool block opens; no markup leaks into the text.
    texts = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0]
    assert "".join(texts) == "Let me check.\n"
    assert not any("<" in t for t in texts)
    assert kinds.index("content_block_stop") < kinds.index("content_block_start", 2)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"

    # The client's own accumulation agrees with the non-streamed message.
    with client(served).messages.stream(
        model=MODEL, max_tokens=200, messages=ask("two"), tools=TOOLS
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert blocks(final) == [
        ("tool_use", ("get_weather", PARIS)),
        ("tool_use", ("get_weather", {"city": "Rome"})),
    ]


def test_malformed_calls_and_unparsed_requests_stay_text(served: str) -> None:
    out = create(served, "malformed", tools=TOOLS)
    assert (out.stop_reason, blocks(out)) == ("end_turn", [("text", MALFORMED)])
    with client(served).messages.stream(
        model=MODEL, max_tokens=200, messages=ask("malformed"), tools=TOOLS
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == MALFORMED and final.stop_reason == "end_turn"
    # tool_choice none, or no tools: the output is not parsed for calls.
    for kwargs in ({"tools": TOOLS, "tool_choice": {"type": "none"}}, {}):
        out = create(served, "hermes", **kwargs)
        assert (out.stop_reason, blocks(out)) == ("end_turn", [("text", "Let me check.\n" + CALL)])
        events = raw_events(served, "hermes", **kwargs)
        assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["text"]


def test_reasoning_becomes_thinking_blocks(served: str) -> None:
    out = create(served, "think", tools=TOOLS)
    assert out.stop_reason == "tool_use"
    assert blocks(out) == [
        ("thinking", "The user wants weather."),
        ("text", "Checking.\n"),
        ("tool_use", ("get_weather", PARIS)),
    ]
    events = raw_events(served, "think", tools=TOOLS)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    thinking = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == 0]
    assert {d["type"] for d in thinking} == {"thinking_delta"}
    assert "".join(d["thinking"] for d in thinking) == "The user wants weather."
    # Without tools only the reasoning is split off; the call stays text.
    plain = create(served, "think")
    assert blocks(plain) == [("thinking", "The user wants weather."), ("text", "Checking.\n" + CALL)]


def test_a_tool_round_trip_with_thinking_sent_back(served: str) -> None:
    first = create(served, "think", tools=TOOLS)
    call = next(b for b in first.content if b.type == "tool_use")
    messages: list[MessageParam] = [
        *ask("think"),
        # The whole answer goes back, thinking block included, as Anthropic's docs ask of clients.
        {"role": "assistant", "content": cast(Any, [b.model_dump() for b in first.content])},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    out = client(served).messages.create(model=MODEL, max_tokens=200, messages=messages, tools=TOOLS)
    assert (out.stop_reason, blocks(out)) == ("end_turn", [("text", "It is sunny in Paris.")])
