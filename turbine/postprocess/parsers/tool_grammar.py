"""Grammars that force tool calls in a model's own tool-call format (enforced `tool_choice`).

`tool_choice: "required"` (Anthropic's `any`) constrains the answer to one or more calls of the
request's tools; a named function (Anthropic's `tool`) to one call of that function; and
`parallel_tool_calls: false` (Anthropic's `disable_parallel_tool_use`) to exactly one call, or with
`auto` to text optionally followed by one call (the text may not contain the call marker). Each call
is the format's markup around a JSON object whose `name` is one of the allowed functions and whose
`arguments` follow that function's `parameters` schema, so what comes out is exactly what the
format's parser (same package) reads back as calls.

The grammar is written in llguidance's Lark dialect (JSON schemas embedded with `%json`). Formats
without an entry here cannot be forced: the frontend refuses such requests with a 400.

Engines that read no such grammar but take a JSON schema (upstream servers) get `forced_call`: the
format's markup around one call as text, and the call's JSON as a schema; the frontend writes the
markup itself (`turbine/frontend/forced_calls.py`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from turbine.postprocess.parsers import hermes

# Format → (text before a call's JSON, text after it, text between two calls).
_MARKUP = {
    "hermes": (hermes.START + "\n", "\n" + hermes.END, "\n"),
}

FORCEABLE = tuple(_MARKUP)
# Compact JSON, as `engines/grammar.py` writes every JSON constraint: free whitespace would let a
# small model pad a call with newlines until max_tokens.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ForcedCall(NamedTuple):
    """One call that must come, in a format's markup: `opening`, then a JSON object `schema`
    describes (`name` one of the allowed functions, `arguments` per its parameters), then `closing`."""

    opening: str
    schema: dict[str, Any]
    closing: str


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    if not isinstance(parameters, dict):
        parameters = {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _calls_schema(tools: list[dict[str, Any]], only: str | None) -> dict[str, Any]:
    """The schema of one call's JSON object: of `only`, or of any of `tools`."""
    functions = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    schemas = [_call_schema(f) for f in functions]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def forced_call(parser: str | None, tools: list[dict[str, Any]], *, only: str | None) -> ForcedCall | None:
    """Exactly one call of `tools` (`only`: of that function) in the `parser` format, as markup and a
    JSON schema; None: this format cannot be forced."""
    markup = _MARKUP.get(parser or "")
    if markup is None:
        return None
    before, after, _ = markup
    return ForcedCall(before, _calls_schema(tools, only), after)


def tool_call_grammar(
    parser: str | None,
    tools: list[dict[str, Any]],
    *,
    only: str | None,
    parallel: bool,
    optional: bool = False,
) -> str | None:
    """The Lark grammar forcing calls of `tools` (`only`: of that function alone, once) in the
    `parser` format; several calls when `parallel` (and no `only`); with `optional` (tool_choice
    auto, not parallel), text, then at most one call. None: this format cannot be forced."""
    markup = _MARKUP.get(parser or "")
    if markup is None:
        return None
    before, after, between = markup
    schema = {**_calls_schema(tools, only), "x-guidance": _COMPACT}
    calls = "call" if only is not None or not parallel else f"call ({json.dumps(between)} call)*"
    head = [f"start: {calls}", f"call: {json.dumps(before)} body {json.dumps(after)}"]
    if optional:
        # Text without the marker, or text up to the marker (a lazy lexeme ending at it: the
        # marker's tokens are generated as usual) and then one call; nothing after it.
        marker = before.rstrip("\n")
        rest = json.dumps(before[len(marker) :])
        no_marker = f"/(.|\\n)*/ & ~/(.|\\n)*{_regex_literal(marker)}(.|\\n)*/"
        head = [
            f"start: TEXT | prefix {rest} body {json.dumps(after)}",
            f"TEXT: {no_marker}",
            f"prefix[stop={json.dumps(marker)}]: /(.|\\n)*/",
        ]
    return "\n".join([*head, f"body: %json {json.dumps(schema)}", ""])


def _regex_literal(text: str) -> str:
    """`text` as a regex matching itself (inside /.../ of a Lark grammar)."""
    return "".join(c if c.isalnum() or c in "_<> " else "\\" + c for c in text)
