"""Hermes tool calls (Hermes 2 Pro/3, Qwen2.5, Qwen3): a JSON object between `<tool_call>` tags.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls are several tagged blocks (some fine-tunes put several objects, or a JSON list of
them, in one block; both are accepted); text around them is the answer's content.
"""

from __future__ import annotations

from typing import Any

from turbine.postprocess.parsers.base import MarkedCalls, ToolCall, call_from_object, json_values

START = "<tool_call>"
END = "</tool_call>"


def parse_body(body: str) -> list[ToolCall] | None:
    values = json_values(body)
    if not values:
        return None
    flat = [item for v in values for item in (v if isinstance(v, list) else [v])]
    if not flat:
        return None
    calls = [call_from_object(v) for v in flat]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def make_parser(tools: list[dict[str, Any]] | None = None) -> MarkedCalls:
    return MarkedCalls([START], END, parse_body)
