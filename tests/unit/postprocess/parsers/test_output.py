"""Composition (reasoning, then tool calls on the rest), call numbering, and special-token handling."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from turbine import choices
from turbine.errors import ConfigError
from turbine.postprocess.parsers.base import held_suffix
from turbine.postprocess.parsers.output import ParserSettings, make_output_parser, special_token_filter
from turbine.postprocess.parsers.registry import REASONING_FORMATS, TOOL_CALL_FORMATS

pytestmark = pytest.mark.unit

TEXT = (
    '<think>Need the weather.</think>Checking.<tool_call>{"name": "w", "arguments": {"c": "P"}}</tool_call>'
)


def test_reasoning_first_then_tool_calls_on_the_rest() -> None:
    parser = make_output_parser(ParserSettings("hermes", "qwen3"), tools=[])
    assert parser is not None
    outs = [parser.feed(TEXT[i : i + 4]) for i in range(0, len(TEXT), 4)] + [parser.finish()]
    assert "".join(o.reasoning for o in outs) == "Need the weather."
    assert "".join(o.content for o in outs) == "Checking."
    calls = [c for o in outs for c in o.calls]
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "w", '{"c": "P"}')]
    assert calls[0].id.startswith("call_") and parser.called


def test_a_think_tag_inside_reasoning_is_not_a_tool_call_and_no_tools_means_no_tool_parsing() -> None:
    parser = make_output_parser(ParserSettings("hermes", None), tools=None)
    assert parser is None
    only_reasoning = make_output_parser(ParserSettings("hermes", "basic"), tools=None)
    assert only_reasoning is not None
    out = only_reasoning.feed("<think>x</think><tool_call>{}</tool_call>")
    tail = only_reasoning.finish()
    assert (out.reasoning, out.content + tail.content) == ("x", "<tool_call>{}</tool_call>")
    assert not only_reasoning.called


def test_settings_reject_unknown_names_and_config_lists_match_the_registry() -> None:
    with pytest.raises(ConfigError):
        ParserSettings("nope", None)
    with pytest.raises(ConfigError):
        ParserSettings(None, "nope")
    assert set(choices.TOOL_CALL_PARSERS) == set(TOOL_CALL_FORMATS)
    assert set(choices.REASONING_PARSERS) == set(REASONING_FORMATS)


def _tokenizer(specials: list[str]) -> tokenizers.Tokenizer:
    vocab = {w: i for i, w in enumerate(["hi", "there", *specials])}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="hi"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
    return tok


def test_special_token_filter_keeps_markers_and_drops_other_specials() -> None:
    tok = _tokenizer(["[TOOL_CALLS]", "</s>"])
    markers = ParserSettings("mistral", None).markers(with_tools=True)
    keep = special_token_filter(tok, markers)
    assert keep is not None
    assert keep('hi[TOOL_CALLS][{"name": "f"}]</s>') == 'hi[TOOL_CALLS][{"name": "f"}]'
    # Markers that are ordinary text in this tokenizer: skipping special tokens is enough.
    assert special_token_filter(tok, ParserSettings("hermes", None).markers(with_tools=True)) is None


def test_held_suffix_is_the_longest_end_that_may_start_a_marker() -> None:
    assert held_suffix("abc <tool", ["<tool_call>"]) == 5
    assert held_suffix("a<b<", ["<tool_call>"]) == 1
    assert held_suffix("<tool_call>", ["<tool_call>"]) == 0  # a whole marker is found, not held
    assert held_suffix("x</th", ["<think>", "</think>"]) == 4
    assert held_suffix("plain text", ["<tool_call>", "[TOOL_CALLS]"]) == 0
    assert held_suffix("", ["<a>"]) == 0
