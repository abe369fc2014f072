"""gpt-oss (Harmony) reasoning and tool calls; golden texts after OpenAI's Harmony format guide."""

from __future__ import annotations

import pytest

from tests.unit.postprocess.parsers.helpers import parse_reasoning, parse_tools
from turbine.postprocess.parsers.gpt_oss import HarmonyReasoningParser
from turbine.postprocess.parsers.harmony import make_parser
from turbine.postprocess.parsers.output import OutputParser

pytestmark = pytest.mark.unit

ANSWER = (
    "<|channel|>analysis<|message|>User asks a simple question.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)
CALL = (
    "<|channel|>analysis<|message|>Need to use function get_current_weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json"
    '<|message|>{"location":"San Francisco"}<|call|>'
)


def test_analysis_is_reasoning_and_final_is_content() -> None:
    assert parse_reasoning(HarmonyReasoningParser, ANSWER) == ("User asks a simple question.", "2 + 2 = 4.")


def test_a_tool_message_becomes_a_call_after_the_reasoning_parser() -> None:
    reasoning, content = parse_reasoning(HarmonyReasoningParser, CALL)
    assert reasoning == "Need to use function get_current_weather."
    assert parse_tools(make_parser, content) == (
        "",
        [("get_current_weather", '{"location": "San Francisco"}')],
    )
    # Composed the way the frontend does it, piece by piece.
    parser = OutputParser(HarmonyReasoningParser(), make_parser())
    outs = [parser.feed(CALL[i : i + 5]) for i in range(0, len(CALL), 5)] + [parser.finish()]
    assert "".join(o.content for o in outs) == ""
    assert [(c.index, c.name) for o in outs for c in o.calls] == [(0, "get_current_weather")]
    assert parser.called


def test_recipient_in_the_role_and_preamble_on_commentary() -> None:
    text = (
        "<|channel|>commentary<|message|>Checking the weather.<|end|>"
        "<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{}<|call|>"
    )
    reasoning, content = parse_reasoning(HarmonyReasoningParser, text)
    assert reasoning == ""
    assert parse_tools(make_parser, content) == ("Checking the weather.", [("lookup", "{}")])


def test_output_that_is_not_harmony_is_content() -> None:
    assert parse_reasoning(HarmonyReasoningParser, "Just text.") == ("", "Just text.")


def test_cut_off_analysis_stays_reasoning() -> None:
    assert parse_reasoning(HarmonyReasoningParser, "<|channel|>analysis<|message|>Hmm, let") == (
        "Hmm, let",
        "",
    )
