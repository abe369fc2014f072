"""Enforced tool-call grammars accept exactly the calls they should (checked token by token with the
grammar library on a real tokenizer), and what they accept parses back as those calls."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
import tokenizers

from turbine.engines.grammar import check
from turbine.models import bundled_model_path
from turbine.postprocess.parsers.output import ParserSettings, make_output_parser
from turbine.postprocess.parsers.tool_grammar import forced_call, tool_call_grammar
from turbine.protocol.request import GuidedDecoding

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters: any object
]


def _call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


WEATHER = _call("get_weather", {"city": "Paris"})
PING = _call("ping", {})


def _accepts(grammar: str, text: str) -> bool:
    path = bundled_model_path() / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(path))
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer(str(path)), grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tok.encode(text, add_special_tokens=False).ids
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def _grammar(only: str | None = None, parallel: bool = True) -> str:
    lark = tool_call_grammar("hermes", TOOLS, only=only, parallel=parallel)
    assert lark is not None
    assert check(GuidedDecoding("grammar", lark, "tool_choice")) is None
    return llguidance.LLMatcher.grammar_from_lark(lark)


def test_required_takes_one_or_more_calls_of_the_tools_only() -> None:
    grammar = _grammar()
    assert _accepts(grammar, WEATHER)
    assert _accepts(grammar, WEATHER + "\n" + PING)
    assert not _accepts(grammar, "Sure! " + WEATHER)  # no text around the calls
    assert not _accepts(grammar, _call("get_time", {}))  # not one of the tools
    assert not _accepts(grammar, _call("get_weather", {"town": "Paris"}))  # arguments off-schema
    assert not _accepts(grammar, "")


def test_named_and_not_parallel_take_exactly_one_call() -> None:
    named = _grammar(only="get_weather")
    assert _accepts(named, WEATHER)
    assert not _accepts(named, PING)
    assert not _accepts(named, WEATHER + "\n" + WEATHER)
    single = _grammar(parallel=False)
    assert _accepts(single, PING)
    assert not _accepts(single, WEATHER + "\n" + PING)


def test_auto_without_parallel_calls_takes_text_then_at_most_one_call() -> None:
    lark = tool_call_grammar("hermes", TOOLS, only=None, parallel=False, optional=True)
    assert lark is not None and check(GuidedDecoding("grammar", lark, "parallel_tool_calls")) is None
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert _accepts(grammar, "No call needed: it is sunny, 24°C.")
    assert _accepts(grammar, "Let me check.\n" + WEATHER)
    assert _accepts(grammar, PING)
    assert not _accepts(grammar, WEATHER + "\n" + PING)
    assert not _accepts(grammar, WEATHER + " and some text after")
    assert not _accepts(grammar, "Text with a broken <tool_call> call")


def test_what_the_grammar_allows_parses_back_as_the_calls() -> None:
    parser = make_output_parser(ParserSettings("hermes", None), TOOLS)
    assert parser is not None
    parsed = parser.feed(WEATHER + "\n" + PING)
    tail = parser.finish()
    calls = parsed.calls + tail.calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("ping", {}),
    ]
    assert (parsed.content + tail.content).strip() == ""


def _schema_accepts(schema: dict[str, Any], text: str) -> bool:
    return _accepts(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)), text)


def test_a_forced_call_is_the_markup_around_one_object_of_the_call_schema() -> None:
    call = forced_call("hermes", TOOLS, only=None)
    assert call is not None
    # Markup, the object, markup: exactly the text of one call the grammar takes.
    assert call.opening + json.dumps({"name": "ping", "arguments": {}}) + call.closing == PING
    one = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert _schema_accepts(call.schema, one)
    assert _schema_accepts(call.schema, json.dumps({"name": "ping", "arguments": {"any": 1}}))
    assert not _schema_accepts(call.schema, json.dumps({"name": "get_time", "arguments": {}}))
    assert not _schema_accepts(call.schema, json.dumps({"name": "get_weather", "arguments": {"town": "X"}}))
    named = forced_call("hermes", TOOLS, only="get_weather")
    assert named is not None and _schema_accepts(named.schema, one)
    assert not _schema_accepts(named.schema, json.dumps({"name": "ping", "arguments": {}}))
    # Plain JSON Schema, for any server's converter: no llguidance options in it.
    assert "x-guidance" not in json.dumps(call.schema)


@pytest.mark.parametrize("parser", [None, "mistral", "pythonic"])
def test_formats_without_a_grammar_cannot_be_forced(parser: str | None) -> None:
    assert tool_call_grammar(parser, TOOLS, only=None, parallel=True) is None
    assert forced_call(parser, TOOLS, only=None) is None
