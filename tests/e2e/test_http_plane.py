"""The HTTP request plane end to end: frontend and workers with `--request-plane http`."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import MODEL, Stack, wait_instances

pytestmark = pytest.mark.e2e


def test_chat_over_the_http_request_plane(stack: Stack) -> None:
    _, url = stack.frontend("--request-plane", "http")
    stack.worker(
        "--request-plane", "http", "--engine", "mocker", "--speedup-ratio", "100", "--num-workers", "2"
    )
    wait_instances(url, 2)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    whole = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "over http"}], max_tokens=12, seed=4
    )
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "over http"}],
            max_tokens=12,
            seed=4,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage is not None and whole.usage.completion_tokens == 12
