"""Anthropic Messages API bodies: the message object, the stream's events, errors, tool_use blocks.

Tool calls enter through one seam, `ToolUse` (built from a parsed call with `tool_use`): whatever
parses tool calls out of model text (turbine/postprocess/parsers/) hands its calls here, and the
message gets `tool_use` blocks and `stop_reason: "tool_use"`.
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
) -> dict[str, Any]:
    """A `message`; `stop` None is the stream's opening snapshot (no content yet)."""
    content: list[dict[str, Any]] = []
    if stop is not None:
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
    start), then message_delta (stop_reason, usage) and message_stop."""

    __slots__ = ("_index", "_open", "message_id", "model")

    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self._index = -1
        self._open = False

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
        return (
            _event("message_start", {"message": snapshot})
            + self._open_block({"type": "text", "text": ""})
            + _event("ping", {})
        )

    def _open_block(self, block: dict[str, Any]) -> bytes:
        self._index += 1
        self._open = True
        return _event("content_block_start", {"index": self._index, "content_block": block})

    def _close_block(self) -> bytes:
        if not self._open:
            return b""
        self._open = False
        return _event("content_block_stop", {"index": self._index})

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        return _event(
            "content_block_delta", {"index": self._index, "delta": {"type": "text_delta", "text": text}}
        )

    def tool(self, tool: ToolUse) -> bytes:
        """A whole tool_use block: start (empty input), the input as one JSON delta, stop."""
        partial = orjson.dumps(tool.input).decode()
        return (
            self._close_block()
            + self._open_block({"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}})
            + _event(
                "content_block_delta",
                {"index": self._index, "delta": {"type": "input_json_delta", "partial_json": partial}},
            )
            + self._close_block()
        )

    def finish(self, stop: str, stop_sequence: str | None, output_tokens: int) -> bytes:
        return (
            self._close_block()
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
