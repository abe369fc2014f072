"""Llama 3.1/3.2 JSON tool calls: the whole reply is one or more JSON objects, optionally after the
`<|python_tag|>` token, separated by `;`, with the arguments under "parameters" (Meta's prompt
format) or "arguments":

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A reply that starts any other way is an ordinary answer.
"""

from __future__ import annotations

from typing import Any

from turbine.postprocess.parsers.base import ToolCall, WholeOutputCalls, call_from_object, json_values

PYTHON_TAG = "<|python_tag|>"


def parse_body(body: str) -> list[ToolCall] | None:
    text = body.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG) :]
    values = json_values(text, separators=";")
    if not values:
        return None
    calls = [call_from_object(v, ("parameters", "arguments")) for v in values]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def make_parser(tools: list[dict[str, Any]] | None = None) -> WholeOutputCalls:
    return WholeOutputCalls([PYTHON_TAG, "{"], parse_body)
