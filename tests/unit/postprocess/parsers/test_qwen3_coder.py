"""Qwen3-Coder tool calls; golden texts after the Qwen3-Coder chat template's XML format."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.qwen3_coder import make_parser

pytestmark = pytest.mark.unit

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_products",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "in_stock": {"type": "boolean"},
                    "filters": {"type": "object"},
                    "code": {"type": "string"},
                },
            },
        },
    }
]

DOC = """I'll search.
<tool_call>
<function=search_products>
<parameter=query>
waterproof running shoes
</parameter>
<parameter=limit>
5
</parameter>
<parameter=in_stock>
true
</parameter>
<parameter=filters>
{"brand": ["a", "b"]}
</parameter>
<parameter=code>
42
</parameter>
</function>
</tool_call>"""


def test_values_typed_by_the_tool_schema() -> None:
    content, calls = parse_tools(lambda: make_parser(TOOLS), DOC, never_shown=("<tool", "<function"))
    assert content == "I'll search.\n"
    name, args = calls[0]
    assert name == "search_products"
    assert json.loads(args) == {
        "query": "waterproof running shoes",
        "limit": 5,
        "in_stock": True,
        "filters": {"brand": ["a", "b"]},
        "code": "42",
    }


def test_without_schemas_values_are_strings_and_multiline_values_keep_inner_newlines() -> None:
    text = (
        "<tool_call>\n<function=write>\n<parameter=text>\nline 1\nline 2\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert parse_tools(make_parser, text) == ("", [("write", '{"text": "line 1\\nline 2"}')])


def test_malformed_stays_text() -> None:
    text = "<tool_call>\n<function=f>\n<parameter=x>\n1\n</function>\n</tool_call>"
    assert parse_tools(make_parser, text) == (text, [])
