"""Logprobs through a real frontend and mocker worker, read with the official openai client's types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionTokenLogprob

from tests.e2e.conftest import MODEL, Stack, wait_instances

# One worker runs the module: its servers (a module fixture) start once, not once per xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("logprobs")]

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about logprobs"}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def oai(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    stack = Stack(Path(tmp_path_factory.mktemp("logprobs")))
    try:
        _, url = stack.frontend()
        stack.worker("--engine", "mocker", "--speedup-ratio", "1000", "--num-workers", "2")
        wait_instances(url, 2)
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    finally:
        stack.stop()


def _summary(content: list[ChatCompletionTokenLogprob]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs]) for c in content]


def test_chat_logprobs_stream_and_not(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        seed=5,
        logprobs=True,
        top_logprobs=3,
    )
    choice = chat.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert chat.usage is not None and len(content) == chat.usage.completion_tokens == 16
    assert "".join(c.token for c in content) == choice.message.content
    for c in content:
        assert c.logprob < 0 and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3
        assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, c.logprob)
        values = [t.logprob for t in c.top_logprobs]
        assert values == sorted(values, reverse=True)

    stream = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed: list[ChatCompletionTokenLogprob] = []
    text = ""
    for chunk in stream:
        delta = chunk.choices[0]
        text += delta.delta.content or ""
        if delta.logprobs is not None:
            streamed += delta.logprobs.content or []
    assert text == choice.message.content
    assert _summary(streamed) == _summary(content)


def test_chat_logprobs_with_a_stop_string(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=16,
        seed=8,
        logprobs=True,
    )
    full = whole.choices[0].message.content or ""
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    tokens = [c.token for c in whole.choices[0].logprobs.content]
    assert all(c.top_logprobs == [] for c in whole.choices[0].logprobs.content)
    # A stop string from the middle of token 6 (unless those characters occur earlier): the tokens
    # whose text starts before the cut are reported (the last one only partly emitted), none after.
    stop_at = len("".join(tokens[:6])) + len(tokens[6]) // 2
    stop = full[stop_at : stop_at + 3]
    cut = full.find(stop)
    assert 0 < cut <= stop_at
    response = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, seed=8, logprobs=True, stop=[stop]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].logprobs is not None
    text = response.choices[0].message.content or ""
    results = [(text, [c.token for c in response.choices[0].logprobs.content or []])]
    text, reported = "", []
    for chunk in oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, seed=8, logprobs=True, stop=[stop], stream=True
    ):
        text += chunk.choices[0].delta.content or ""
        logprobs = chunk.choices[0].logprobs
        reported += [c.token for c in (logprobs.content or [])] if logprobs else []
    results.append((text, reported))
    for text, reported in results:
        assert text == full[:cut]
        joined = "".join(reported)
        assert joined.startswith(text) and len("".join(reported[:-1])) < len(text)
        assert reported == tokens[: len(reported)]


def test_completion_logprobs_stream_and_not(oai: openai.OpenAI) -> None:
    comp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, seed=2, logprobs=2)
    logprobs = comp.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == comp.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == 10
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(10)]

    tokens: list[str] = []
    values: list[float] = []
    offsets: list[int] = []
    tops: list[dict[str, float]] = []
    for chunk in oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, seed=2, logprobs=2, stream=True
    ):
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens or []
            values += lp.token_logprobs or []
            offsets += lp.text_offset or []
            tops += lp.top_logprobs or []
    assert tokens == logprobs.tokens
    assert values == logprobs.token_logprobs
    assert offsets == logprobs.text_offset
    assert tops == logprobs.top_logprobs


def test_no_logprobs_unless_asked(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert chat.choices[0].logprobs is None
    comp = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert comp.choices[0].logprobs is None


def test_invalid_logprobs_are_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=4,
            logprobs=True,
            top_logprobs=21,
        )
    assert err.value.body["param"] == "top_logprobs"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, top_logprobs=2)
    assert "requires logprobs" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=6)
    assert err.value.body["param"] == "logprobs"  # type: ignore[index]
