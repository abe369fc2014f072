"""Hermes / Qwen tool calls; golden texts after the Hermes-2-Pro and Qwen2.5 function-calling docs."""

from __future__ import annotations

import json

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.hermes import make_parser

pytestmark = pytest.mark.unit

# Qwen2.5's documented reply shape: optional text, then one tagged JSON object per call.
QWEN_TWO_CALLS = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": '
    '{"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n'
    "</tool_call>"
)


def test_two_calls_and_no_content() -> None:
    content, calls = parse_tools(make_parser, QWEN_TWO_CALLS, never_shown=("<tool", "tool_call"))
    assert content == ""  # the newline between the calls is layout, not content
    assert [name for name, _ in calls] == ["get_current_temperature", "get_temperature_date"]
    assert json.loads(calls[1][1]) == {"location": "San Francisco, CA, USA", "date": "2024-10-01"}


def test_text_around_a_call_is_content() -> None:
    text = 'Let me check. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call> Done.'
    content, calls = parse_tools(make_parser, text, never_shown=("<tool_call>", "<tool"))
    assert content == "Let me check.  Done."
    assert calls == [("f", '{"x": 1}')]


def test_arguments_given_as_a_json_string_and_missing_arguments() -> None:
    text = (
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>'
        '<tool_call>{"name": "g"}</tool_call>'
    )
    _, calls = parse_tools(make_parser, text)
    assert calls == [("f", '{"x": 2}'), ("g", "{}")]


def test_malformed_call_stays_text() -> None:
    text = 'Sure <tool_call>{"name": "f", "arguments": {"x": </tool_call> ok'
    content, calls = parse_tools(make_parser, text)
    assert calls == []
    assert content == text


def test_unterminated_call_at_the_end_still_parses() -> None:
    content, calls = parse_tools(make_parser, 'Hi <tool_call>\n{"name": "f", "arguments": {}}\n')
    assert (content, calls) == ("Hi ", [("f", "{}")])


def test_a_lone_angle_bracket_is_released_at_the_end() -> None:
    assert parse_tools(make_parser, "a < b and <tool") == ("a < b and <tool", [])


def test_several_objects_or_a_list_in_one_block() -> None:
    text = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>'
    assert parse_tools(make_parser, text) == ("", [("a", "{}"), ("b", "{}")])
    text = '<tool_call>{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {}}</tool_call>'
    assert parse_tools(make_parser, text) == ("", [("a", "{}"), ("b", "{}")])
    assert parse_tools(make_parser, "<tool_call>[]</tool_call>") == ("<tool_call>[]</tool_call>", [])
