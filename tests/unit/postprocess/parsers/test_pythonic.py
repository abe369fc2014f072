"""Pythonic tool calls; golden texts after the Llama 3.2 / Llama 4 pythonic format documentation."""

from __future__ import annotations

import json

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.pythonic import make_parser

pytestmark = pytest.mark.unit


def test_documented_list_of_calls() -> None:
    text = '[get_weather(city="San Francisco", metric="celsius"), get_time()]'
    content, calls = parse_tools(make_parser, text, never_shown=("[", "get_"))
    assert content == ""
    assert calls == [("get_weather", '{"city": "San Francisco", "metric": "celsius"}'), ("get_time", "{}")]


def test_llama4_wrapper_and_literal_values() -> None:
    text = (
        "<|python_start|>[search(query='x', limit=3, exact=True, tags=['a', None], "
        "opts={'k': 1.5})]<|python_end|>"
    )
    _, calls = parse_tools(make_parser, text)
    assert calls[0][0] == "search"
    assert json.loads(calls[0][1]) == {
        "query": "x",
        "limit": 3,
        "exact": True,
        "tags": ["a", None],
        "opts": {"k": 1.5},
    }


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3]",
        "[f(x)]",  # positional argument
        "[f(a=g())]",  # not a literal: never evaluated
        "[f(a=1)",  # unterminated
        "[f(**kw)]",
        "Sure: [f(a=1)]",  # the list must be the whole reply
    ],
)
def test_anything_else_stays_text(text: str) -> None:
    assert parse_tools(make_parser, text) == (text, [])
