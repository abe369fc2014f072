"""Call ids each model's template accepts back, and the layout between calls that is not content."""

from __future__ import annotations

import re
from typing import Any

import pytest

from turbine.errors import InvalidRequest
from turbine.postprocess.parsers.output import ParserSettings, make_output_parser
from turbine.preprocess.chat_template import ChatTemplate

pytestmark = pytest.mark.unit

# The rule Mistral's chat templates enforce on the ids of an earlier turn's calls.
MISTRAL_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.id is not defined or call.id|length != 9 or not call.id.isalnum() %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{%- endif %}[TOOL_CALLS]{{ call.function.name }}[CALL_ID]{{ call.id }}"
    "{%- endfor %}"
    "{%- else %}[INST]{{ message.content }}[/INST]{%- endif %}"
    "{%- endfor %}"
)


def _calls(parser_name: str, text: str) -> list[tuple[str, str]]:
    parser = make_output_parser(ParserSettings(parser_name, None), tools=[])
    assert parser is not None
    outs = [parser.feed(text), parser.finish()]
    return [(c.id, c.name) for o in outs for c in o.calls]


def test_mistral_call_ids_are_nine_alphanumerics_that_its_template_takes_back() -> None:
    calls = _calls("mistral", '[TOOL_CALLS][{"name": "w", "arguments": {}}, {"name": "v", "arguments": {}}]')
    assert [name for _, name in calls] == ["w", "v"]
    ids = [i for i, _ in calls]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids) and ids[0] != ids[1]
    template = ChatTemplate(MISTRAL_LIKE_TEMPLATE, "<s>", "</s>")
    second_turn: list[dict[str, Any]] = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": i, "type": "function", "function": {"name": "w", "arguments": "{}"}} for i in ids
            ],
        },
        {"role": "user", "content": "thanks"},
    ]
    assert "[CALL_ID]" + ids[0] in template.render(second_turn)
    # The OpenAI-style ids other parsers give would not pass.
    ((hermes_id, _),) = _calls("hermes", '<tool_call>{"name": "w", "arguments": {}}</tool_call>')
    assert hermes_id.startswith("call_")
    second_turn[1]["tool_calls"][0]["id"] = hermes_id
    with pytest.raises(InvalidRequest):
        template.render(second_turn)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_whitespace_between_and_after_hermes_calls_is_not_content(step: int) -> None:
    call = '<tool_call>{"name": "w", "arguments": {"c": "P"}}</tool_call>'
    text = "Checking.\n" + call + "\n\n" + call + "\n"
    parser = make_output_parser(ParserSettings("hermes", None), tools=[])
    assert parser is not None
    outs = [parser.feed(text[i : i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    assert "".join(o.content for o in outs) == "Checking.\n"
    assert len([c for o in outs for c in o.calls]) == 2


def test_text_after_a_call_is_still_content() -> None:
    call = '<tool_call>{"name": "w", "arguments": {}}</tool_call>'
    parser = make_output_parser(ParserSettings("hermes", None), tools=[])
    assert parser is not None
    text = call + "\n Done, <tool that is not a call"
    outs = [parser.feed(text[i : i + 2]) for i in range(0, len(text), 2)] + [parser.finish()]
    assert "".join(o.content for o in outs) == "\n Done, <tool that is not a call"
