"""Llama 3.1 JSON tool calls; golden texts after Meta's Llama 3.1 prompt-format documentation."""

from __future__ import annotations

import json

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.llama3_json import make_parser

pytestmark = pytest.mark.unit


def test_documented_json_call_with_parameters() -> None:
    text = (
        '{"name": "get_current_conditions", '
        '"parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
    )
    content, calls = parse_tools(make_parser, text, never_shown=("{",))
    assert content == ""
    assert calls[0][0] == "get_current_conditions"
    assert json.loads(calls[0][1]) == {"location": "San Francisco, CA", "unit": "Fahrenheit"}


def test_python_tag_and_several_calls_separated_by_semicolons() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": [1, 2]}}'
    assert parse_tools(make_parser, text) == ("", [("a", "{}"), ("b", '{"k": [1, 2]}')])


def test_plain_answer_streams_through() -> None:
    assert parse_tools(make_parser, "  The answer is {x}.") == ("  The answer is {x}.", [])


def test_json_that_is_not_a_call_stays_text() -> None:
    text = '{"answer": 42}'
    assert parse_tools(make_parser, text) == (text, [])
    broken = '{"name": "a", "parameters": {'
    assert parse_tools(make_parser, broken) == (broken, [])
