"""The torch engine as served: every sampled token is its own SSE event, and prompts of lengths the
worker has never seen compile nothing on the request path (its start-up warm-up covers them)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import TINY, Proc, Stack, live_instances, tiny_torch_worker, wait_until

pytestmark = pytest.mark.e2e


def _ready(stack: Stack, tiny_llama_dir: Path) -> tuple[Proc, openai.OpenAI]:
    _, url = stack.frontend()
    worker = tiny_torch_worker(stack, tiny_llama_dir, "--log-level", "info")
    wait_until(lambda: live_instances(url, TINY) == 1, 60, worker)
    return worker, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_stream_of_n_tokens_arrives_as_n_events(stack: Stack, tiny_llama_dir: Path) -> None:
    _, client = _ready(stack, tiny_llama_dir)
    n = 24
    stream = client.completions.create(
        model=TINY,
        prompt=[5, 17, 99, 250, 31, 8],
        max_tokens=n,
        temperature=0,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    per_event: list[int] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.tokens:
                per_event.append(len(choice.logprobs.tokens))
    assert usage is not None and usage.completion_tokens == n
    # One event per sampled token: none arrives batched with the next.
    assert per_event == [1] * n, per_event


def test_prompts_of_unseen_lengths_compile_nothing_while_serving(stack: Stack, tiny_llama_dir: Path) -> None:
    worker, client = _ready(stack, tiny_llama_dir)
    wait_until(lambda: "warm-up done" in worker.log(), 30, worker)
    for length in (37, 211):  # lengths no warm-up step has
        done = client.completions.create(
            model=TINY, prompt=list(range(10, 10 + length)), max_tokens=4, temperature=0
        )
        assert done.usage is not None and done.usage.prompt_tokens == length
    assert "while serving" not in worker.log(), worker.log()
