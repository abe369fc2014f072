"""/openapi.json: the routes the app serves, schemas generated from the protocol structs with the
preprocessor's ranges on top, and the bodies the frontend writes conform to them."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from schemathesis.specs.openapi.converter import to_json_schema
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from turbine.errors import ModelNotFound, ServiceUnavailable
from turbine.frontend.openai_format import Choice, chat_completion, text_completion
from turbine.frontend.openapi import spec, spec_json
from turbine.postprocess.logprobs import TokenLogprob, TopLogprob
from turbine.postprocess.parsers.output import ToolCallDelta
from turbine.preprocess.preprocessor import MAX_N
from turbine.protocol.openai import UNBUILT_CHAT

pytestmark = pytest.mark.unit

ROUTES = {
    "/v1/chat/completions": ["post"],
    "/v1/completions": ["post"],
    "/v1/models": ["get"],
    "/v1/models/{model}": ["get"],
    "/health": ["get"],
    "/live": ["get"],
    "/metrics": ["get"],
    "/openapi.json": ["get"],
}
ENTRIES = [
    TokenLogprob("Hi", b"Hi", -0.25, [TopLogprob("Hi", b"Hi", -0.25), TopLogprob(" Yo", b" Yo", -2.0)], 0)
]
USAGE = {
    "prompt_tokens": 3,
    "completion_tokens": 1,
    "total_tokens": 4,
    "prompt_tokens_details": {"cached_tokens": 0},
}


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = json.loads(spec_json())["components"]["schemas"]
    return schemas


def _check(schema: str, body: Any) -> None:
    # As schemathesis reads the document: each OpenAPI 3.0 schema as JSON Schema (`nullable` → null
    # allowed), and the components beside the root, so that the document's references resolve.
    schemas = {
        name: to_json_schema(s, "nullable", upgrade_legacy_exclusive_bounds=True)
        for name, s in _schemas().items()
    }
    jsonschema_rs.validate(
        {"$ref": f"#/components/schemas/{schema}", "components": {"schemas": schemas}}, body
    )


def test_the_document_is_openapi_3_0_with_every_route_and_method() -> None:
    OPENAPI_30_VALIDATOR.validate(json.loads(spec_json()))
    assert {path: [m for m in item if m != "parameters"] for path, item in spec()["paths"].items()} == ROUTES


def test_request_schemas_come_from_the_structs_with_the_preprocessors_ranges() -> None:
    chat = _schemas()["ChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    n = chat["properties"]["n"]
    assert n == {"type": "integer", "nullable": True, "default": None, "minimum": 1, "maximum": MAX_N}
    # Fields decoded only to be refused are not offered.
    assert not set(UNBUILT_CHAT) & set(chat["properties"])
    # Struct fields that the hand-written document used to miss are there.
    assert {"guided_json", "structured_outputs", "chat_template_kwargs"} <= set(chat["properties"])


def test_request_bounds_accept_what_the_preprocessor_accepts() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 1, "stop": ["x"]}
    _check("ChatCompletionRequest", body)
    _check("ChatCompletionRequest", {**body, "top_p": None, "stop": None, "seed": -1})
    _check("CompletionRequest", {"model": "m", "prompt": [[1, 2], "text"], "echo": False})


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user"}], "top_p": 0}),
        ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "robot"}]}),
        ("ChatCompletionRequest", {"model": "m", "messages": []}),
        ("ChatCompletionRequest", {"model": "m", "messages": [{"role": "user"}], "tool_choice": "any"}),
        ("CompletionRequest", {"model": "m", "prompt": ""}),
        ("CompletionRequest", {"model": "m", "prompt": "x", "logprobs": 6}),
    ],
)
def test_request_bounds_refuse_what_the_preprocessor_refuses(schema: str, body: dict[str, Any]) -> None:
    with pytest.raises(jsonschema_rs.ValidationError):
        _check(schema, body)


def test_chat_completion_bodies_conform() -> None:
    choices = [
        Choice("Hello", "stop", ENTRIES),
        Choice("", "tool_calls", None, "thinking", (ToolCallDelta(0, "call_1", "f", "{}"),)),
    ]
    body = chat_completion(request_id="c", model="m", created=1, choices=choices, usage=USAGE)
    _check("ChatCompletion", json.loads(body))


def test_text_completion_bodies_conform() -> None:
    choices = [Choice("Hello", "length", ENTRIES), Choice("", "stop", None)]
    body = text_completion(request_id="c", model="m", created=1, choices=choices, usage=USAGE)
    _check("Completion", json.loads(body))


def test_error_bodies_conform() -> None:
    _check("Error", ModelNotFound("m").to_openai())
    _check("Error", ServiceUnavailable("busy").to_openai())
    with pytest.raises(jsonschema_rs.ValidationError):
        _check("Error", {"error": {"message": "x"}})
