"""`<think>` reasoning (basic, qwen3, deepseek_r1); golden texts after the DeepSeek-R1 and Qwen3 docs."""

from __future__ import annotations

import pytest

from tests.unit.postprocess.parsers.helpers import parse_reasoning
from turbine.postprocess.parsers.think import basic, deepseek_r1

pytestmark = pytest.mark.unit


def test_qwen3_thinking_block() -> None:
    text = "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"
    assert parse_reasoning(basic, text) == ("\nThe user greets me.\n", "\n\nHello! How can I help?")


def test_qwen3_without_thinking_is_all_content() -> None:
    assert parse_reasoning(basic, "Hello <thin> there") == ("", "Hello <thin> there")


def test_only_the_first_block_is_reasoning() -> None:
    assert parse_reasoning(basic, "<think>a</think>b<think>c</think>") == ("a", "b<think>c</think>")


def test_cut_off_inside_the_block_stays_reasoning() -> None:
    assert parse_reasoning(basic, "<think>still thinking </thi") == ("still thinking </thi", "")


def test_r1_starts_in_reasoning_because_the_template_opened_the_block() -> None:
    assert parse_reasoning(deepseek_r1, "Okay, 1+1.\n</think>\n\n2") == ("Okay, 1+1.\n", "\n\n2")
    assert parse_reasoning(deepseek_r1, "<think>\nOkay.</think>2") == ("\nOkay.", "2")


def test_r1_without_an_end_tag_is_all_reasoning() -> None:
    assert parse_reasoning(deepseek_r1, "hmm") == ("hmm", "")
