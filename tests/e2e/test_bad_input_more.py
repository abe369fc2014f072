"""Bad input a new user runs into: bodies that are not UTF-8, unknown message roles, and structured
output (`response_format`) that the engine cannot enforce. Each a 400 in OpenAI's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("bad_input_more")]

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = Stack(tmp_path_factory.mktemp("bad-input-more"))
    try:
        _, url = stack.frontend()
        stack.worker("--engine", "mocker", "--speedup-ratio", "100")
        wait_instances(url, 1)
        yield url
    finally:
        stack.stop()


def _error(status: int, raw: bytes) -> dict[str, object]:
    payload = json.loads(raw)
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "turbine-tiny", "messages": [{"role": "user", "content": "caf\xe9"}]}',
        b'{"model": "turbine-tiny", "prompt": "\xff\xfe\xfd", "max_tokens": 2}',
        b'{"model": "\xc3\x28", "messages": []}',
    ],
    ids=["latin-1 in content", "garbage bytes in prompt", "bad sequence in model"],
)
def test_body_not_utf8_is_400(served: str, body: bytes) -> None:
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    status, _, raw = http("POST", served + path, body, JSON)
    assert status == 400, raw
    assert "UTF-8" in str(_error(status, raw)["message"])


def test_unknown_role_is_400(served: str) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 2}).encode()
    status, _, raw = http("POST", served + "/v1/chat/completions", body, JSON)
    assert status == 400, raw
    error = _error(status, raw)
    assert error["param"] == "messages[1].role"
    assert "wizard" in str(error["message"])
    # Every role OpenAI knows still goes through.
    oai = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    for role in ("system", "developer", "user", "assistant", "tool"):
        out = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": role, "content": "x"}, {"role": "user", "content": "y"}],  # type: ignore[misc,list-item]
            max_tokens=2,
        )
        assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
    ids=["json_object", "json_schema"],
)
def test_response_format_the_engine_cannot_enforce_is_400(
    served: str, response_format: dict[str, Any]
) -> None:
    oai = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    chat_format: Any = response_format
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "answer in JSON"}],
            max_tokens=4,
            response_format=chat_format,
        )
    assert caught.value.param == "response_format"
    # The Responses API's `text.format` is the same request in another shape.
    flat = {k: v for k, v in response_format.items() if k != "json_schema"}
    text: Any = {"format": {**flat, **response_format.get("json_schema", {})}}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input="answer in JSON", max_output_tokens=4, text=text)
    assert caught.value.param == "text.format"


def test_text_response_format_is_accepted_and_unknown_type_is_400(served: str) -> None:
    oai = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    out = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        response_format={"type": "text"},
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "xml"},
    }
    status, _, raw = http("POST", served + "/v1/chat/completions", json.dumps(body).encode(), JSON)
    assert status == 400
    assert _error(status, raw)["param"] == "response_format"
