"""Mistral tool calls; golden texts after mistral-common's tokenizer v3 and v11 formats."""

from __future__ import annotations

import json

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.mistral import make_parser

pytestmark = pytest.mark.unit


def test_v3_json_array() -> None:
    text = (
        '[TOOL_CALLS] [{"name": "get_current_weather", '
        '"arguments": {"location": "Paris, France", "format": "celsius"}}]'
    )
    content, calls = parse_tools(make_parser, text, never_shown=("[TOOL", "TOOL_CALLS"))
    assert content == ""
    assert calls[0][0] == "get_current_weather"
    assert json.loads(calls[0][1]) == {"location": "Paris, France", "format": "celsius"}


def test_v11_name_and_args_with_text_before() -> None:
    text = (
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
        "[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}"
    )
    assert parse_tools(make_parser, text) == (
        "Checking.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    )


def test_malformed_stays_text() -> None:
    text = "[TOOL_CALLS] not json at all"
    assert parse_tools(make_parser, text) == (text, [])
    assert parse_tools(make_parser, "[1, 2] is a list") == ("[1, 2] is a list", [])
