"""Logprobs options at the edge: decoded types, OpenAI's ranges and rules, and what reaches the engine."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from turbine.errors import InvalidRequest
from turbine.models import bundled_model_path
from turbine.preprocess.preprocessor import Preprocessor
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.openai import decode_chat_request, decode_completion_request

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor("tiny", load_model_files(bundled_model_path()), None)


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _completion(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", **fields}).encode()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": None, "top_logprobs": None}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True, "top_logprobs": 3}, 3),
        ({"logprobs": True, "top_logprobs": 20}, 20),
    ],
)
async def test_chat_logprobs_reach_the_engine(
    pre: Preprocessor, fields: dict[str, Any], expected: int | None
) -> None:
    prepared = await pre.chat(decode_chat_request(_chat(**fields)), "r")
    assert prepared.request.sampling.logprobs == expected
    # Every choice of n > 1 asks for them too.
    assert {c.sampling.logprobs for c in prepared._replace(n=3).choices()} == {expected}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "within [0, 20]"),
        ({"logprobs": True, "top_logprobs": -1}, "within [0, 20]"),
        ({"top_logprobs": 3}, "requires logprobs"),
        ({"logprobs": False, "top_logprobs": 0}, "requires logprobs"),
    ],
)
async def test_chat_logprobs_rules(pre: Preprocessor, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await pre.chat(decode_chat_request(_chat(**fields)), "r")
    assert err.value.http_status == 400
    assert err.value.param == "top_logprobs"
    assert message in err.value.message


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0), (2, 2), (5, 5)])
async def test_completion_logprobs_reach_the_engine(
    pre: Preprocessor, value: int | None, expected: int | None
) -> None:
    prepared = await pre.completion(decode_completion_request(_completion(logprobs=value)), "r")
    assert prepared.request.sampling.logprobs == expected


@pytest.mark.parametrize("value", [6, -1, 20])
async def test_completion_logprobs_range(pre: Preprocessor, value: int) -> None:
    with pytest.raises(InvalidRequest) as err:
        await pre.completion(decode_completion_request(_completion(logprobs=value)), "r")
    assert err.value.param == "logprobs"
    assert "within [0, 5]" in err.value.message


@pytest.mark.parametrize(
    "body",
    [
        _chat(logprobs=1),
        _chat(logprobs="yes"),
        _chat(logprobs=True, top_logprobs=2.5),
        _completion(logprobs=True),
    ],
)
def test_wrong_types_are_decode_errors(body: bytes) -> None:
    decode = decode_chat_request if b"messages" in body else decode_completion_request
    with pytest.raises(msgspec.ValidationError, match="logprobs"):
        decode(body)
