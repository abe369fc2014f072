"""Anthropic request translation and response shapes, without sockets."""

from __future__ import annotations

import json

import pytest

from turbine.errors import InvalidRequest, ModelNotFound, PayloadTooLarge, ServiceUnavailable, TurbineError
from turbine.frontend.anthropic_format import (
    StreamFormatter,
    error_body,
    message_object,
    stop_reason,
    tool_use,
)
from turbine.frontend.anthropic_translate import to_chat
from turbine.protocol.anthropic import decode_count_tokens_request, decode_messages_request
from turbine.protocol.openai import ChatMessage

pytestmark = pytest.mark.unit


def _req(**fields: object) -> bytes:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(body).encode()


def test_translation_of_blocks_system_tools_and_prefill() -> None:
    req = decode_messages_request(
        _req(
            system="sys",
            stop_sequences=["x"],
            top_k=5,
            tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"k": 1}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "r"}],
                        },
                        {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": True},
                    ],
                },
                {"role": "assistant", "content": "Sure "},
            ],
        )
    )
    chat, prefix = to_chat(req)
    assert prefix == "Sure"
    assert chat.messages == [
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content="a\nb"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[{"id": "t1", "type": "function", "function": {"name": "f", "arguments": {"k": 1}}}],
        ),
        ChatMessage(role="tool", content="r", tool_call_id="t1"),
        ChatMessage(role="tool", content="Error: boom", tool_call_id="t2"),
    ]
    assert chat.tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}
    ]
    assert (chat.max_tokens, chat.stop, chat.top_k) == (8, ["x"], 5)
    counted, _ = to_chat(
        decode_count_tokens_request(b'{"model": "m", "messages": [{"role": "user", "content": "q"}]}')
    )
    assert counted.max_tokens is None and counted.messages == [ChatMessage(role="user", content="q")]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages.0.content.0.type"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_result"}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages.0.content.0"),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        (
            {"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}},
            "tool_choice.name",
        ),
        ({"tools": [{"name": "f"}]}, "tools.0"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"stop_sequences": [""]}, "stop_sequences"),
    ],
)
def test_bad_requests_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_chat(decode_messages_request(_req(**fields)))
    assert caught.value.param == param


def test_tool_use_from_parsed_calls() -> None:
    assert tool_use("f", '{"a": 1}', "id1") == ("id1", "f", {"a": 1})
    assert tool_use("f", {"a": 1}).input == {"a": 1}
    assert tool_use("f", "").input == {}
    assert tool_use("f", "[1, 2]").input == {"arguments": [1, 2]}
    assert tool_use("f", "not json").input == {"arguments": "not json"}
    assert tool_use("f", "{}").id.startswith("toolu_")


def test_stop_reasons() -> None:
    assert stop_reason("stop", None) == "end_turn"
    assert stop_reason("stop", "###") == "stop_sequence"
    assert stop_reason("length", None) == "max_tokens"
    assert stop_reason("stop", None, [tool_use("f", "{}")]) == "tool_use"


def test_message_and_stream_shapes() -> None:
    call = tool_use("f", '{"a": 1}', "t")
    body = message_object(
        message_id="msg_1",
        model="m",
        text="",
        tool_uses=[call],
        stop="tool_use",
        stop_sequence=None,
        input_tokens=3,
        output_tokens=4,
    )
    assert body["content"] == [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 4}
    fmt = StreamFormatter(message_id="msg_1", model="m")
    raw = (
        fmt.start(3) + fmt.text("hi") + fmt.text("") + fmt.tool(call) + fmt.finish("tool_use", None, 4)
    ).decode()
    events = [json.loads(frame.split("\ndata: ")[1]) for frame in raw.split("\n\n") if frame]
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("ping", None),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"a":1}'}
    assert events[8]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


def _events(raw: bytes) -> list[dict[str, object]]:
    return [json.loads(frame.split("\ndata: ")[1]) for frame in raw.decode().split("\n\n") if frame]


def test_thinking_blocks_and_blocks_opened_as_content_arrives() -> None:
    call = tool_use("f", "{}", "t")
    body = message_object(
        message_id="msg_1",
        model="m",
        text="ok",
        thinking="hmm",
        tool_uses=[call],
        stop="tool_use",
        stop_sequence=None,
        input_tokens=3,
        output_tokens=4,
    )
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use"]
    assert body["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": ""}

    fmt = StreamFormatter(message_id="msg_1", model="m")
    raw = (
        fmt.start(3)
        + fmt.thinking("h")
        + fmt.thinking("mm")
        + fmt.text("ok")
        + fmt.tool(call)
        + fmt.text("after")
        + fmt.finish("tool_use", None, 4)
    )
    events = _events(raw)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "t", "name": "f", "input": {}},
        {"type": "text", "text": ""},
    ]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas[:2] == [
        {"type": "thinking_delta", "thinking": "h"},
        {"type": "thinking_delta", "thinking": "mm"},
    ]
    # Every block is closed before the next opens, indices counting up.
    opened_closed = [
        (e["type"], e["index"]) for e in events if e["type"] in ("content_block_start", "content_block_stop")
    ]
    assert opened_closed == [
        (kind, i) for i in range(4) for kind in ("content_block_start", "content_block_stop")
    ]

    # Nothing but thinking (or nothing at all): an empty text block still closes the message.
    for only_thinking in (True, False):
        fmt = StreamFormatter(message_id="msg_2", model="m")
        events = _events(
            fmt.start(3) + fmt.thinking("x" if only_thinking else "") + fmt.finish("end_turn", None, 1)
        )
        starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
        expected = [{"type": "text", "text": ""}]
        if only_thinking:
            expected.insert(0, {"type": "thinking", "thinking": "", "signature": ""})
        assert starts == expected
        assert [e["type"] for e in events][:3] == ["message_start", "content_block_start", "ping"]


def test_thinking_blocks_sent_back_are_accepted_and_dropped() -> None:
    req = decode_messages_request(
        _req(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": ""},
                        {"type": "redacted_thinking", "data": "xx"},
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
            ]
        )
    )
    assistant = to_chat(req).chat.messages[1]
    assert assistant.content == "" and assistant.tool_calls is not None and len(assistant.tool_calls) == 1


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (InvalidRequest("x"), "invalid_request_error"),
        (ModelNotFound("m"), "not_found_error"),
        (PayloadTooLarge("x"), "request_too_large"),
        (ServiceUnavailable("x"), "overloaded_error"),
        (TurbineError("x"), "api_error"),
    ],
)
def test_error_shape(exc: TurbineError, kind: str) -> None:
    assert json.loads(error_body(exc)) == {"type": "error", "error": {"type": kind, "message": exc.message}}
