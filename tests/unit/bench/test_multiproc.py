"""The scale benchmark's helpers: /proc counters and the medians over rounds."""

from __future__ import annotations

import os
import threading

import pytest

from turbine.bench.multiproc import _median_rows, urls_of_generator
from turbine.bench.stack import LocalStack, proc_cpu_split, proc_io_counts


def _row(processes: int, nonstream: float, stream: float, cpu: float) -> dict[str, float]:
    return {
        "processes": processes,
        "nonstream_req_s": nonstream,
        "stream_req_s": stream,
        "nonstream_cpu_ms": cpu,
    }


def test_medians_and_per_round_speedups() -> None:
    rounds = [
        [_row(1, 100, 50, 1.0), _row(8, 400, 200, 2.0)],
        [_row(1, 200, 50, 3.0), _row(8, 1000, 150, 4.0)],
        [_row(1, 100, 100, 2.0), _row(8, 600, 300, 3.0)],
    ]
    rows, speedups = _median_rows(rounds)
    assert rows[0]["nonstream_req_s"] == 100 and rows[0]["nonstream_cpu_ms"] == 2.0
    assert rows[1]["nonstream_req_s"] == 600
    # Speed-ups are taken within each round (4, 5, 6 and 4, 3, 3), then their median: not the
    # ratio of the medians (600 / 100 = 6).
    assert rows[1]["nonstream_x"] == 5.0
    assert rows[1]["stream_x"] == 3.0
    assert rows[0]["nonstream_x"] == 1.0
    assert speedups[1] == "8 processes: chat 4.00, 5.00, 6.00; stream 4.00, 3.00, 3.00"


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="Linux /proc only")
def test_proc_counters_move_with_work() -> None:
    calls0, switches0 = proc_io_counts(os.getpid())
    user0, _ = proc_cpu_split(os.getpid())
    r, w = os.pipe()
    try:
        for _ in range(50):
            os.write(w, b"x")
            os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)
    done = threading.Event()
    waiter = threading.Thread(target=done.wait, args=(0.05,))
    waiter.start()
    waiter.join()  # this thread slept: a voluntary context switch
    work = sum(i * i for i in range(300_000))  # some user CPU
    calls1, switches1 = proc_io_counts(os.getpid())
    user1, _ = proc_cpu_split(os.getpid())
    assert calls1 - calls0 >= 100
    assert switches1 > switches0
    assert work > 0 and user1 >= user0


def test_every_url_and_every_load_generator_gets_a_share() -> None:
    urls = [f"u{i}" for i in range(8)]
    shares = [urls_of_generator(i, 4, urls) for i in range(4)]
    assert shares == [["u0", "u4"], ["u1", "u5"], ["u2", "u6"], ["u3", "u7"]]
    assert [urls_of_generator(i, 4, ["only"]) for i in range(4)] == [["only"]] * 4
    assert [urls_of_generator(i, 3, ["a", "b"]) for i in range(3)] == [["a"], ["b"], ["a"]]


@pytest.mark.integration  # real frontend and worker processes
def test_independent_frontends_each_serve_the_same_workers() -> None:
    """`extra_frontends`: separate frontend processes on their own ports, over one worker."""
    import json
    import urllib.request

    worker = ["--engine", "mocker", "--speedup-ratio", "1000000", "--num-workers", "1"]
    with LocalStack([], worker, extra_frontends=1) as stack:
        assert len(stack.urls) == 2 and stack.urls[0] == stack.url
        for url in stack.urls:
            body = json.dumps({"model": "turbine-tiny", "prompt": "hi", "max_tokens": 2}).encode()
            request = urllib.request.Request(
                url + "/v1/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as resp:
                assert json.loads(resp.read())["usage"]["completion_tokens"] == 2
        frontends = [stack.frontend, *stack.extra_frontends]
        assert len({p.pid for p in frontends}) == 2
        assert all(p.poll() is None for p in frontends)
        assert stack.frontend_cpu_s() > 0
    assert all(p.poll() is not None for p in frontends)  # both stopped
