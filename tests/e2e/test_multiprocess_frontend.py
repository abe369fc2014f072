"""`turbine frontend --num-processes 2`: one supervisor, two frontend processes on one port."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import time

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, Proc, Stack, http, shared_prefix_hit_ratio, wait_until

pytestmark = pytest.mark.e2e

MOCKER = ("--engine", "mocker", "--num-workers", "2", "--block-size", "16")


def _children(supervisor: Proc) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(supervisor.pid).children()}
    except psutil.NoSuchProcess:
        return set()


def _served_by(url: str, i: int) -> int:
    """One completion on a fresh connection (the kernel picks a process per connection): the pid
    of the process that served it."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as oai:
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt=f"hello {i}", max_tokens=3)
    assert raw.parse().choices[0].text
    return int(raw.headers["x-turbine-frontend-pid"])


def _metric_sum(url: str, name: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and s.labels.get("model") == MODEL
    )


def _all_ready(url: str, instances: int) -> bool:
    """Every process sees the workers: a few fresh connections in a row say so."""
    for _ in range(6):
        status, _, body = http("GET", url + "/health", timeout=2)
        if status != 200 or json.loads(body)["models"].get(MODEL) != instances:
            return False
    return True


def test_two_processes_share_a_port_restart_and_stop(stack: Stack) -> None:
    supervisor, url = stack.frontend("--num-processes", "2")
    stack.worker(*MOCKER, "--speedup-ratio", "1000")
    wait_until(lambda: _all_ready(url, 2), 30, supervisor)
    first = _children(supervisor)
    assert len(first) == 2

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(lambda i: _served_by(url, i), range(40)))
    assert set(pids) == first  # both processes took requests
    # One /metrics for the whole frontend, whichever process answers the scrape.
    for _ in range(4):
        assert _metric_sum(url, "turbine_requests_total") == 40
        assert _metric_sum(url, "turbine_inflight_requests") == 0

    victim = pids[0]
    psutil.Process(victim).kill()
    wait_until(lambda: len(_children(supervisor) - {victim}) == 2, 20, supervisor)
    (replacement,) = _children(supervisor) - first
    # The port keeps serving (every request succeeds) until the replacement takes requests too.
    served: list[int] = []

    def replacement_serves() -> bool:
        served.append(_served_by(url, len(served)))
        return served[-1] == replacement

    wait_until(replacement_serves, 30, supervisor, interval=0.01)
    assert victim not in served
    # The dead process's counts stay in the totals.
    assert _metric_sum(url, "turbine_requests_total") == 40 + len(served)

    children = _children(supervisor)
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    with pytest.raises(OSError):  # nothing serves the port any more
        http("GET", url + "/live", timeout=1)
    assert "supervising 2 frontend processes" in supervisor.log()


def _long_stream(url: str, i: int) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        chunks = oai.completions.create(
            model=MODEL,
            prompt=f"A long tale number {i}",
            max_tokens=150,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)


def test_processes_share_routing_load_and_keep_the_cache_hit_ratio(stack: Stack) -> None:
    supervisor, two = stack.frontend("--num-processes", "2", "--router-mode", "kv")
    single, one = stack.frontend("--router-mode", "kv")
    stack.worker(*MOCKER, "--speedup-ratio", "1")
    wait_until(lambda: _all_ready(two, 2) and _all_ready(one, 2), 30, supervisor)
    time.sleep(0.5)  # replica sync subscribes when the model appears

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_long_stream, two, i) for i in range(6)]
        # Whichever process answers /metrics counts all six, its siblings' too (local replica sync).
        wait_until(lambda: _metric_sum(two, "turbine_router_active_requests") == 6, 15)
        for _ in range(4):
            assert _metric_sum(two, "turbine_router_active_requests") == 6
        assert all(s.result() for s in streams)
    wait_until(lambda: _metric_sum(two, "turbine_router_active_requests") == 0, 15)

    # The shared-prefix workload over fresh connections spread over both processes hits the
    # workers' caches as well as through one process.
    alone = shared_prefix_hit_ratio([one], "one")
    shared = shared_prefix_hit_ratio([two], "two")
    print(f"hit ratio: one process {alone:.3f}, two processes {shared:.3f}")
    assert alone > 0.6
    assert shared >= alone - 0.05, (alone, shared)
    single.stop()


def test_refuses_a_port_held_by_another_process(stack: Stack) -> None:
    _, url = stack.frontend()  # a single-process frontend: no SO_REUSEPORT, nobody may share
    port = url.rsplit(":", 1)[1]
    proc = stack._start(
        "frontend",
        [
            sys.executable,
            "-m",
            "turbine.frontend",
            "--http-port",
            port,
            "--num-processes",
            "2",
            *stack.common(),
        ],
    )
    assert proc.wait(20) == 1
    assert f"port {port} on 127.0.0.1 is not available" in proc.log()
