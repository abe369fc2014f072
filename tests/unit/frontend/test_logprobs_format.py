"""Logprobs in OpenAI's response shapes (chat and legacy completions, chunks and whole responses),
checked against the official client's own types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from turbine.frontend.openai_format import Choice, ChunkFormatter, chat_completion, text_completion
from turbine.postprocess.logprobs import TokenLogprob, TopLogprob
from turbine.postprocess.postprocessor import TextDelta
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.unit

ENTRIES = [
    TokenLogprob("Hi", b"Hi", -0.25, [TopLogprob("Hi", b"Hi", -0.25), TopLogprob(" Yo", b" Yo", -2.0)], 0),
    TokenLogprob("\ufffd", b"\xf0\x9f", -0.5, [TopLogprob("\ufffd", b"\xf0\x9f", -0.5)], 2),
    TokenLogprob("\ufffd", b"\x8e\x89", -0.75, [TopLogprob("\ufffd", b"\x8e\x89", -0.75)], 2),
]
USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def _event(raw: bytes) -> dict[str, Any]:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    body: dict[str, Any] = json.loads(raw[6:])
    return body


def _formatter(chat: bool) -> ChunkFormatter:
    return ChunkFormatter(chat=chat, request_id="x", model="m", created=1, include_usage=False)


def test_chat_chunk_logprobs() -> None:
    raw = _formatter(True).delta(TextDelta("Hi🎉", None, ENTRIES), 1)
    body = _event(raw)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["content"][0] == {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": " Yo", "logprob": -2.0, "bytes": [32, 89, 111]},
        ],
    }
    chunk = ChatCompletionChunk.model_validate(body)
    content = chunk.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.logprob for c in content] == [-0.25, -0.5, -0.75]
    # The bytes of the tokens of a split character join into the character.
    assert bytes(content[1].bytes or []) + bytes(content[2].bytes or []) == "🎉".encode()


def test_chunks_without_logprobs_say_null() -> None:
    for chat in (True, False):
        body = _event(_formatter(chat).delta(TextDelta("Hi", None)))
        assert body["choices"][0]["logprobs"] is None
    body = _event(_formatter(True).delta(TextDelta("", FinishReason.STOP, [])))
    assert body["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    assert body["choices"][0]["delta"] == {}


def test_completion_chunk_logprobs() -> None:
    body = _event(_formatter(False).delta(TextDelta("Hi🎉", FinishReason.LENGTH, ENTRIES)))
    assert body["choices"][0]["logprobs"] == {
        "tokens": ["Hi", "\ufffd", "\ufffd"],
        "token_logprobs": [-0.25, -0.5, -0.75],
        "top_logprobs": [{"Hi": -0.25, " Yo": -2.0}, {"\ufffd": -0.5}, {"\ufffd": -0.75}],
        "text_offset": [0, 2, 2],
    }
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.text_offset == [0, 2, 2]


def test_whole_responses() -> None:
    chat = json.loads(
        chat_completion(
            request_id="x",
            model="m",
            created=1,
            choices=[Choice("Hi🎉", "stop", ENTRIES), Choice("Hi", "stop", None)],
            usage=USAGE,
        )
    )
    parsed = ChatCompletion.model_validate(chat)
    first = parsed.choices[0].logprobs
    assert first is not None and first.content is not None
    assert [c.top_logprobs[0].token for c in first.content] == ["Hi", "\ufffd", "\ufffd"]
    assert parsed.choices[1].logprobs is None

    text = json.loads(
        text_completion(
            request_id="x", model="m", created=1, choices=[Choice("Hi🎉", "length", ENTRIES)], usage=USAGE
        )
    )
    completion = Completion.model_validate(text)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == ["Hi", "\ufffd", "\ufffd"]
    assert logprobs.token_logprobs == [-0.25, -0.5, -0.75]
