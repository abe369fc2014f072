"""Chat shapes of parsed output (reasoning, tool calls), read back through the openai client's types."""

from __future__ import annotations

import json

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from turbine.frontend.openai_format import Choice, ChunkFormatter, chat_completion
from turbine.postprocess.parsers.output import ToolCallDelta
from turbine.postprocess.postprocessor import TextDelta
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.unit

CALL = ToolCallDelta(0, "call_1", "f", '{"x": 1}')
USAGE = {
    "prompt_tokens": 1,
    "completion_tokens": 2,
    "total_tokens": 3,
    "prompt_tokens_details": {"cached_tokens": 0},
}


def _events(raw: bytes) -> list[ChatCompletionChunk]:
    lines = [line for line in raw.split(b"\n\n") if line]
    return [ChatCompletionChunk.model_validate(orjson.loads(line.removeprefix(b"data: "))) for line in lines]


def test_stream_chunks_reasoning_content_then_call_name_then_arguments_then_finish() -> None:
    fmt = ChunkFormatter(
        chat=True, request_id="x", model="m", created=1, include_usage=False, reasoning_field="reasoning"
    )
    events = _events(fmt.delta(TextDelta("Sure.", FinishReason.TOOL_CALLS, None, "think", (CALL,))))
    deltas = [e.choices[0].delta for e in events]
    assert (deltas[0].content, (deltas[0].model_extra or {})["reasoning"]) == ("Sure.", "think")
    opening = (deltas[1].tool_calls or [])[0]
    assert (opening.index, opening.id, opening.type) == (0, "call_1", "function")
    assert opening.function is not None and (opening.function.name, opening.function.arguments) == ("f", "")
    arguments = (deltas[2].tool_calls or [])[0]
    assert (
        arguments.id is None and arguments.function is not None and arguments.function.arguments == '{"x": 1}'
    )
    assert [e.choices[0].finish_reason for e in events] == [None, None, None, "tool_calls"]


def test_whole_message_with_calls_has_null_content_and_reasoning_field() -> None:
    body = chat_completion(
        request_id="x",
        model="m",
        created=1,
        choices=[Choice("", "tool_calls", None, "why", (CALL,))],
        usage=USAGE,
    )
    parsed = ChatCompletion.model_validate(json.loads(body))
    message = parsed.choices[0].message
    assert message.content is None and (message.model_extra or {})["reasoning_content"] == "why"
    assert message.tool_calls is not None and message.tool_calls[0].id == "call_1"
