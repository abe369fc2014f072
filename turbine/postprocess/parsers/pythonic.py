"""Pythonic tool calls (Llama 3.2/4, ToolACE): the reply is a Python list of calls with keyword
arguments whose values are literals, optionally wrapped in Llama 4's `<|python_start|>`/`<|python_end|>`:

    [get_weather(city="San Francisco", metric="celsius"), get_time()]

Parsed with `ast` (never evaluated): only names called with literal keyword arguments count.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from turbine.postprocess.parsers.base import ToolCall, WholeOutputCalls

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


def _call(node: ast.expr) -> ToolCall | None:
    if not isinstance(node, ast.Call) or node.args:
        return None
    func = node.func
    if isinstance(func, ast.Name):
        name = func.id
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        name = f"{func.value.id}.{func.attr}"
    else:
        return None
    args: dict[str, object] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None  # **kwargs
        try:
            args[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    try:
        return ToolCall(name, json.dumps(args, ensure_ascii=False))
    except (TypeError, ValueError):
        return None  # a literal JSON cannot hold (a set, bytes, complex)


def parse_body(body: str) -> list[ToolCall] | None:
    text = body.strip()
    if text.startswith(PYTHON_START):
        text = text[len(PYTHON_START) :]
    text = text.removesuffix(PYTHON_END).strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = [_call(e) for e in tree.body.elts]
    return None if any(c is None for c in calls) else [c for c in calls if c is not None]


def make_parser(tools: list[dict[str, Any]] | None = None) -> WholeOutputCalls:
    return WholeOutputCalls([PYTHON_START, "["], parse_body)
