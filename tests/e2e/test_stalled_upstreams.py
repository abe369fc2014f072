"""An upstream server that hangs under load (SIGSTOP: alive, connections open, silent): the sidecar
finds it by `--request-stall-timeout-s` and cuts its streams, which move to the other server."""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Callable

import pytest

from tests.e2e.conftest import Stack, wait_instances, wait_until
from tests.e2e.test_upstream import Upstream, client, upstreams
from turbine.models import bundled_model_path

pytestmark = pytest.mark.e2e

__all__ = ["upstreams"]  # the fixture, shared with test_upstream.py


def test_a_frozen_upstreams_streams_complete_through_the_other(
    stack: Stack, upstreams: Callable[..., list[Upstream]]
) -> None:
    ups = upstreams(2, "--token-delay-s", "0.03")
    args = ["--model-path", str(bundled_model_path()), "--migration-limit", "3"]
    args += ["--request-stall-timeout-s", "1.5"]
    for up in ups:
        args += ["--upstream", f"tiny={up.url}"]
    front, url = stack.frontend(*args)
    wait_instances(url, 2, model="tiny")
    oai = client(url)
    prompts = [f"Tell story number {i} about a lighthouse keeper" for i in range(12)]

    def stream(prompt: str) -> tuple[str, int]:
        chunks = list(
            oai.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=60,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
        return "".join(
            c.choices[0].text for c in chunks if c.choices
        ), usage.completion_tokens if usage else -1

    victim = ups[0]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream, p) for p in prompts]
            wait_until(lambda: victim.running() > 0, 30)
            victim.proc.signal(signal.SIGSTOP)
            results = [f.result() for f in futures]
        assert [tokens for _, tokens in results] == [60] * len(prompts)
        assert "not answering: cut them" in front.log()
        # Generation is a function of the context: each moved text equals an uninterrupted run's.
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            whole = list(pool.map(lambda p: stream(p)[0], prompts))
        assert [text for text, _ in results] == whole
    finally:
        victim.proc.signal(signal.SIGCONT)
