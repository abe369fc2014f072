"""DeepSeek V3 / V3.1 tool calls; golden texts after the DeepSeek-V3 and V3.1 chat templates."""

from __future__ import annotations

import pytest

from tests.unit.postprocess.parsers.helpers import parse_tools
from turbine.postprocess.parsers.deepseek_v3 import make_parser

pytestmark = pytest.mark.unit

V3 = (
    "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '```json\n{"location": "Tokyo"}\n```<｜tool▁call▁end｜>\n'
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>"
    "<｜tool▁calls▁end｜>"
)


def test_v3_two_calls() -> None:
    content, calls = parse_tools(make_parser, V3, never_shown=("<｜tool",))
    assert content == "Let me look."
    assert calls == [("get_weather", '{"location": "Tokyo"}'), ("get_time", "{}")]


def test_v3_1_layout() -> None:
    text = (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"location": "Tokyo"}'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    )
    assert parse_tools(make_parser, text) == ("", [("get_weather", '{"location": "Tokyo"}')])


def test_malformed_stays_text() -> None:
    text = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{oops\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    )
    assert parse_tools(make_parser, text) == (text, [])
