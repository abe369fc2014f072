"""Every spelling of a structured-output request → one GuidedDecoding; malformed ones → a 400 naming
the field."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from turbine.errors import InvalidRequest
from turbine.preprocess.guided import ANY_OBJECT, structured_output
from turbine.protocol.openai import decode_chat_request, decode_completion_request
from turbine.protocol.request import GuidedDecoding

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _chat(**fields: Any) -> GuidedDecoding | None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return structured_output(decode_chat_request(json.dumps(body).encode()))


def _completion(**fields: Any) -> GuidedDecoding | None:
    body = {"model": "m", "prompt": "hi", **fields}
    return structured_output(decode_completion_request(json.dumps(body).encode()))


def test_each_spelling_becomes_one_constraint() -> None:
    schema_text = json.dumps(SCHEMA)
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert _chat(response_format=rf) == GuidedDecoding("json_schema", schema_text, "response_format")
    assert _chat(response_format={"type": "json_object"}) == GuidedDecoding(
        "json_schema", ANY_OBJECT, "response_format"
    )
    assert _chat(response_format={"type": "text"}) is None
    assert _chat() is None
    assert _chat(structured_outputs={"json": SCHEMA}) == GuidedDecoding(
        "json_schema", schema_text, "structured_outputs.json"
    )
    assert _chat(structured_outputs={"json": schema_text}).spec == schema_text  # type: ignore[union-attr]
    assert _chat(structured_outputs={"json_object": True}).spec == ANY_OBJECT  # type: ignore[union-attr]
    assert _chat(structured_outputs={"regex": "a+"}) == GuidedDecoding(
        "regex", "a+", "structured_outputs.regex"
    )
    assert _chat(structured_outputs={"choice": ["x", "y"]}) == GuidedDecoding(
        "choice", '["x", "y"]', "structured_outputs.choice"
    )
    assert _completion(structured_outputs={"grammar": 'start: "a"'}) == GuidedDecoding(
        "grammar", 'start: "a"', "structured_outputs.grammar"
    )
    assert _completion(guided_json=SCHEMA) == GuidedDecoding("json_schema", schema_text, "guided_json")
    assert _completion(guided_regex="b") == GuidedDecoding("regex", "b", "guided_regex")
    assert _chat(guided_choice=["p"]) == GuidedDecoding("choice", '["p"]', "guided_choice")
    assert _chat(guided_grammar="root ::= x") == GuidedDecoding("grammar", "root ::= x", "guided_grammar")


def test_the_constraint_travels_in_the_request() -> None:
    from turbine.protocol.request import SamplingOptions

    options = SamplingOptions(guided=GuidedDecoding("regex", "a+", "guided_regex"))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(options), type=SamplingOptions) == options


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
            "response_format.json_schema.strict",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": ""}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ],
)
def test_malformed_constraints_name_their_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        _chat(**fields)
    assert err.value.param == param, err.value
