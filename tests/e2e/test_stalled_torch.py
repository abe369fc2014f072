"""A torch worker (greedy, float32) frozen with SIGSTOP under load: its streams move to the other
one by the request plane's heartbeats (its lease outlives the test), with the same texts as an
uninterrupted run."""

from __future__ import annotations

import concurrent.futures
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import TINY, Stack, StreamProgress, tiny_torch_worker, wait_instances, wait_until
from tests.e2e.test_stalled_workers import _metric
from tests.e2e.test_torch_engine import _client, _story

pytestmark = pytest.mark.e2e

STALL = ("--request-stall-timeout-s", "1.5")


def test_a_frozen_torch_workers_greedy_streams_move_unchanged(stack: Stack, tiny_llama_dir: Path) -> None:
    _, url = stack.frontend("--migration-limit", "3", *STALL)
    tiny_torch_worker(stack, tiny_llama_dir, *STALL, ttl=120.0)
    victim = stack.procs[-1]
    tiny_torch_worker(stack, tiny_llama_dir, *STALL, ttl=120.0)
    wait_instances(url, 2, timeout=60, model=TINY)
    oai = _client(url)
    progress = StreamProgress()

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(_story, oai, i, progress.counter(i)) for i in range(8)]
            # Frozen once every stream has its first tokens (not on a timer: see the kill test).
            wait_until(lambda: progress.all_past(8, 5), 60)
            victim.signal(signal.SIGSTOP)
            results = [f.result() for f in futures]
        assert all(finish == "length" for _, finish in results)
        assert _metric(url, "turbine_request_stalls_total") > 0
        assert _metric(url, "turbine_migrations_total") > 0
        # The survivor alone (the frozen one is skipped until it answers), uninterrupted.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            reference = list(pool.map(lambda i: _story(oai, i), range(8)))
        assert [r[0] for r in results] == [r[0] for r in reference]
    finally:
        victim.signal(signal.SIGCONT)
