"""Mistral tool calls: everything after `[TOOL_CALLS]`, in either of Mistral's two layouts.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]      (tokenizer v3)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                             (tokenizer v11+)

In the newer layout each call has its own `[TOOL_CALLS]`, and a `[CALL_ID]id` may precede `[ARGS]`.
`[TOOL_CALLS]` is a control token in Mistral's tokenizers: the frontend keeps such tokens in the
text when this parser is active (see `registry.KEEP_SPECIAL_TOKENS`).
"""

from __future__ import annotations

from typing import Any

from turbine.postprocess.parsers.base import (
    MarkedCalls,
    ToolCall,
    arguments_text,
    call_from_object,
    json_values,
)

START = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"


def _named_call(piece: str) -> ToolCall | None:
    name, sep, args = piece.partition(ARGS)
    if not sep:
        return None
    name = name.partition(CALL_ID)[0].strip()
    values = json_values(args)
    if not name or values is None or len(values) != 1:
        return None
    text = arguments_text(values[0])
    return None if text is None else ToolCall(name, text)


def parse_body(body: str) -> list[ToolCall] | None:
    text = body.strip()
    if text.startswith("["):
        values = json_values(text)
        if values is None or len(values) != 1 or not isinstance(values[0], list) or not values[0]:
            return None
        calls = [call_from_object(v) for v in values[0]]
    else:
        calls = [_named_call(p) for p in text.split(START) if p.strip()]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def make_parser(tools: list[dict[str, Any]] | None = None) -> MarkedCalls:
    return MarkedCalls([START], None, parse_body)
