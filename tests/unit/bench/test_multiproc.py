"""The scale benchmark's helpers: /proc counters and the medians over rounds."""

from __future__ import annotations

import os
import threading

import pytest

from turbine.bench.multiproc import _median_rows
from turbine.bench.stack import proc_cpu_split, proc_io_counts


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
