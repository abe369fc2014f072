"""A real llama.cpp server (llama-cpp-python's) frozen with SIGSTOP under load: the sidecar finds
it by `--request-stall-timeout-s` and every stream completes through the other server."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_upstream_llama_cpp import MODEL, LlamaServer, front, model_dir

pytestmark = pytest.mark.e2e

__all__ = ["model_dir"]  # the fixture, shared with test_upstream_llama_cpp.py


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[LlamaServer]]:
    started = [LlamaServer(tmp_path, i) for i in range(2)]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.proc.signal(signal.SIGCONT)
            server.proc.stop()


def test_a_frozen_llama_server_s_streams_complete_through_the_other(
    stack: Stack, model_dir: Path, servers: list[LlamaServer]
) -> None:
    oai, _ = front(stack, model_dir, servers, "--migration-limit", "3", "--request-stall-timeout-s", "2")

    def stream(i: int) -> tuple[str | None, int]:
        chunks = list(
            oai.completions.create(
                model=MODEL,
                prompt=f"Write story number {i} about a lighthouse keeper and the sea.",
                max_tokens=24,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )
        )
        finish = next(
            (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None
        )
        usage = chunks[-1].usage
        return finish, usage.completion_tokens if usage else -1

    before = [s.cpu_ticks() for s in servers]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        deadline = time.monotonic() + 30
        while all(s.cpu_ticks() == b for s, b in zip(servers, before, strict=True)):
            assert time.monotonic() < deadline, "no server started working"
            time.sleep(0.05)
        spent = [s.cpu_ticks() - b for s, b in zip(servers, before, strict=True)]
        victim = servers[spent.index(max(spent))]
        victim.proc.signal(signal.SIGSTOP)
        results = [f.result() for f in futures]
    assert results == [("length", 24)] * 4
    log = stack.procs[-1].log()
    assert "not answering: cut them" in log, log[-3000:]
