"""Qwen3-Coder tool calls: XML-like parameters inside `<tool_call>` tags.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Values are raw text (the newline after the opening tag and before the closing one is layout, not
value); each is converted to the type the tool's JSON schema gives that parameter (integer, number,
boolean, object, array, null), and stays a string when the schema says string, is missing, or the
text does not convert.
"""

from __future__ import annotations

import json
import re
from typing import Any

from turbine.postprocess.parsers.base import MarkedCalls, ToolCall

START = "<tool_call>"
END = "</tool_call>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>(.*?)</parameter>\s*", re.DOTALL)


def _schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Function name → its parameters' properties (name → JSON schema)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            params = function.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[function["name"]] = props if isinstance(props, dict) else {}
    return out


def _convert(text: str, schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = set(kind) if isinstance(kind, list) else {kind}
    if kinds & {None, "string"} or not kinds:
        return text
    if "null" in kinds and text.lower() in ("null", "none"):
        return None
    if "boolean" in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if "integer" in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _strip_layout(value: str) -> str:
    value = value.removeprefix("\n")
    return value.removesuffix("\n")


class _BodyParser:
    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self._schemas = _schemas(tools)

    def __call__(self, body: str) -> list[ToolCall] | None:
        calls: list[ToolCall] = []
        at = 0
        while at < len(body):
            if not body[at:].strip():
                break
            function = _FUNCTION.match(body, at)
            if function is None:
                return None
            name = function[1].strip()
            props = self._schemas.get(name, {})
            args: dict[str, Any] = {}
            inner, pos = function[2], 0
            while inner[pos:].strip():
                parameter = _PARAMETER.match(inner, pos)
                if parameter is None:
                    return None
                key = parameter[1].strip()
                args[key] = _convert(_strip_layout(parameter[2]), props.get(key))
                pos = parameter.end()
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
            at = function.end()
        return calls or None


def make_parser(tools: list[dict[str, Any]] | None = None) -> MarkedCalls:
    return MarkedCalls([START], END, _BodyParser(tools))
