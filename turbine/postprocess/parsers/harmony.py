"""gpt-oss tool calls (Harmony): a message addressed to `functions.NAME`, its body the JSON arguments.

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
    {"city": "Paris"}<|call|>

(one line in the model's output; the arguments follow `<|message|>` directly).

The recipient may also sit in the role part (`<|start|>assistant to=functions.get_weather<|channel|>…`).
Meant to run after the `gpt_oss` reasoning parser, which hands each such message on in this form.
"""

from __future__ import annotations

import re
from typing import Any

from turbine.postprocess.parsers.base import MarkedCalls, ToolCall, arguments_text, json_values

START = "<|start|>"
MESSAGE = "<|message|>"
CALL = "<|call|>"
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


def parse_body(body: str) -> list[ToolCall] | None:
    header, sep, args = body.partition(MESSAGE)
    recipient = _RECIPIENT.search(header)
    if not sep or recipient is None:
        return None
    values = json_values(args)
    if values is None or len(values) != 1:
        return None
    text = arguments_text(values[0])
    return None if text is None else [ToolCall(recipient[1], text)]


def make_parser(tools: list[dict[str, Any]] | None = None) -> MarkedCalls:
    return MarkedCalls([START], CALL, parse_body)
