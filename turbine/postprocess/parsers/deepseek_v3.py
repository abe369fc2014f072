"""DeepSeek V3 / R1 tool calls, between DeepSeek's own tokens (fullwidth bars, `▁` for spaces):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek V3.1 drops the type and the code fence: `<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city":
"Paris"}<｜tool▁call▁end｜>`; both layouts are accepted.
"""

from __future__ import annotations

from typing import Any

from turbine.postprocess.parsers.base import MarkedCalls, ToolCall, arguments_text, json_values

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```"


def _call(piece: str) -> ToolCall | None:
    if not piece.startswith(CALL_BEGIN):
        return None
    head, sep, rest = piece[len(CALL_BEGIN) :].partition(SEP)
    if not sep:
        return None
    if FENCE in rest:
        # V3: the head is the call type, the name ends at the newline before the fenced arguments.
        name, _, fenced = rest.partition("\n")
        fenced = fenced.strip()
        if not fenced.startswith(FENCE) or not fenced.endswith(FENCE):
            return None
        args = fenced[len(FENCE) : -len(FENCE)].removeprefix("json")
    else:
        name, args = head, rest
    values = json_values(args)
    name = name.strip()
    if not name or values is None or len(values) != 1:
        return None
    text = arguments_text(values[0])
    return None if text is None else ToolCall(name, text)


def parse_body(body: str) -> list[ToolCall] | None:
    pieces = [p.strip() for p in body.split(CALL_END)]
    calls = [_call(p) for p in pieces if p]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def make_parser(tools: list[dict[str, Any]] | None = None) -> MarkedCalls:
    return MarkedCalls([CALLS_BEGIN], CALLS_END, parse_body)
