"""Anthropic Messages API bodies: the message object, the stream's events, errors, content blocks.

What the model's parsers (turbine/postprocess/parsers/) split off the answer becomes Anthropic's
blocks: reasoning a `thinking` block, tool calls `tool_use` blocks (`ToolUse`, built from a parsed
call with `tool_use`) and `stop_reason: "tool_use"`. Our thinking blocks carry an empty `signature`:
the field is required in Anthropic's shape, but there is nothing here to sign the text with.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from turbine.errors import TurbineError


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class ToolUse(NamedTuple):
    """One tool call of the answer, as a `tool_use` content block."""

    id: str
    name: str
    input: dict[str, Any]


def tool_use(name: str, arguments: str | dict[str, Any], call_id: str | None = None) -> ToolUse:
    """A parsed tool call (OpenAI style: arguments as JSON text or an object) → a ToolUse.

    Arguments that are not a JSON object are kept under `{"arguments": ...}` rather than dropped: the
    block's `input` must be an object.
    """
    value: Any = arguments
    if isinstance(arguments, str):
        try:
            value = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            value = arguments
    if not isinstance(value, dict):
        value = {"arguments": value}
    return ToolUse(call_id or f"toolu_{uuid.uuid4().hex[:24]}", name, value)


def stop_reason(finish: str, matched_stop: str | None, tool_uses: Sequence[ToolUse] = ()) -> str:
    """Turbine's finish reason → Anthropic's stop_reason."""
    if tool_uses:
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    if matched_stop is not None:
        return "stop_sequence"
    return "end_turn"


def _tool_block(tool: ToolUse) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input}


def message_object(
    *,
    message_id: str,
    model: str,
    text: str,
    tool_uses: Sequence[ToolUse],
    stop: str | None,
    stop_sequence: str | None,
    input_tokens: int,
    output_tokens: int,
    thinking: str = "",
) -> dict[str, Any]:
    """A `message`; `stop` None is the stream's opening snapshot (no content yet). Blocks in
    Anthropic's order: thinking, text (also when empty, unless there are tool calls), tool_use."""
    content: list[dict[str, Any]] = []
    if stop is not None:
        if thinking:
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if text or not tool_uses:
            content.append({"type": "text", "text": text})
        content += [_tool_block(t) for t in tool_uses]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **body}) + b"\n\n"


class StreamFormatter:
    """The SSE events of one streamed message, in Anthropic's order: message_start, then per content
    block content_block_start / content_block_delta* / content_block_stop (a ping after the first
    start), then message_delta (stop_reason, usage) and message_stop.

    Blocks open as their content arrives: thinking, text and tool_use in the order the model wrote
    them, a new block whenever the kind changes. A message with neither text nor tool calls still
    gets its (empty) text block, as the non-streamed message does.
    """

    __slots__ = ("_index", "_open", "_texted", "_tools", "message_id", "model")

    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self._index = -1
        # The kind of the open block ("thinking", "text"), None when none is open.
        self._open: str | None = None
        self._texted = False
        self._tools = 0

    def start(self, input_tokens: int) -> bytes:
        snapshot = message_object(
            message_id=self.message_id,
            model=self.model,
            text="",
            tool_uses=(),
            stop=None,
            stop_sequence=None,
            input_tokens=input_tokens,
            output_tokens=0,
        )
        return _event("message_start", {"message": snapshot})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._index += 1
        self._open = kind
        out += _event("content_block_start", {"index": self._index, "content_block": block})
        return out + _event("ping", {}) if self._index == 0 else out

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"index": self._index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"index": self._index, "delta": delta})

    def thinking(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open != "thinking":
            out = self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return out + self._delta({"type": "thinking_delta", "thinking": text})

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open != "text":
            out = self._open_block("text", {"type": "text", "text": ""})
            self._texted = True
        return out + self._delta({"type": "text_delta", "text": text})

    def tool(self, tool: ToolUse) -> bytes:
        """A whole tool_use block: start (empty input), the input as one JSON delta, stop."""
        self._tools += 1
        partial = orjson.dumps(tool.input).decode()
        return (
            self._open_block("tool_use", {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}})
            + self._delta({"type": "input_json_delta", "partial_json": partial})
            + self._close_block()
        )

    def finish(self, stop: str, stop_sequence: str | None, output_tokens: int) -> bytes:
        out = self._close_block()
        if not self._texted and not self._tools:
            out += self._open_block("text", {"type": "text", "text": ""}) + self._close_block()
        return (
            out
            + _event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
                    "usage": {"output_tokens": output_tokens},
                },
            )
            + _event("message_stop", {})
        )

    @staticmethod
    def error(exc: TurbineError) -> bytes:
        return _event("error", {"error": error_detail(exc)})


# Anthropic's error types by HTTP status; other 4xx are invalid_request_error, other 5xx api_error.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_detail(exc: TurbineError) -> dict[str, str]:
    status = exc.http_status
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": kind, "message": exc.message}


def error_body(exc: TurbineError) -> bytes:
    """`{"type": "error", "error": {"type": ..., "message": ...}}`, sent with `exc.http_status`."""
    return orjson.dumps({"type": "error", "error": error_detail(exc)})
