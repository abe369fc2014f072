"""Is this machine's CPU itself stalling? A fixed unit of work, timed every few milliseconds.

Runs no stack and opens no socket: one process times the same small piece of work (a pure-Python
loop, then a SHA-256 of a fixed buffer, i.e. interpreter and C code) and sleeps between units, as an
idle benchmark client would between requests. On a machine that gives its CPUs evenly, every unit
takes about the median. Windows where units take several times the median, with nothing else of
ours running, are stalls of the machine (another tenant of the host, the hypervisor), not of the
program under test; any benchmark running through such a window shows them as a latency tail.

    .venv/bin/python benchmarks/host_stalls.py [--seconds 15] [--factor 3]

Prints each slow window (start, length, worst unit as a multiple of the median), the gaps between
window starts, and the share of the run spent inside windows.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import time
from typing import NamedTuple

_BLOB = bytes(200_000)
_LOOP = 3000


class Sample(NamedTuple):
    at_s: float  # start of the unit, seconds since the run began
    took_s: float


class Window(NamedTuple):
    start_s: float
    length_s: float
    worst: float  # slowest unit in the window, as a multiple of the median unit


def work_unit() -> None:
    x = 0
    for i in range(_LOOP):
        x += i * i
    hashlib.sha256(_BLOB).digest()


def sample(seconds: float, gap_s: float) -> list[Sample]:
    samples: list[Sample] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    while (start := time.perf_counter()) < end:
        work_unit()
        samples.append(Sample(start - t0, time.perf_counter() - start))
        time.sleep(gap_s)
    return samples


def slow_windows(samples: list[Sample], factor: float, join_s: float = 0.2) -> list[Window]:
    """Runs of units slower than `factor` x the median; slow units less than `join_s` apart are one
    window (a stall slows several consecutive units as it fades)."""
    if not samples:
        return []
    median = statistics.median(s.took_s for s in samples)
    windows: list[Window] = []
    for s in samples:
        if s.took_s <= factor * median:
            continue
        end = s.at_s + s.took_s
        if windows and s.at_s - (windows[-1].start_s + windows[-1].length_s) < join_s:
            last = windows[-1]
            windows[-1] = Window(last.start_s, end - last.start_s, max(last.worst, s.took_s / median))
        else:
            windows.append(Window(s.at_s, s.took_s, s.took_s / median))
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--gap-ms", type=float, default=4.0, help="sleep between units")
    parser.add_argument("--factor", type=float, default=3.0, help="a unit this many x the median is slow")
    args = parser.parse_args()
    samples = sample(args.seconds, args.gap_ms / 1000)
    median_us = statistics.median(s.took_s for s in samples) * 1e6
    windows = slow_windows(samples, args.factor)
    print(f"{len(samples)} units, median {median_us:.0f} µs; {len(windows)} slow window(s):")
    for w in windows:
        print(f"  at {w.start_s:7.3f} s  for {w.length_s * 1000:6.1f} ms  worst {w.worst:5.1f}x")
    starts = [w.start_s for w in windows]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    if gaps:
        print("gaps between windows (s): " + ", ".join(f"{g:.2f}" for g in gaps))
    inside = sum(w.length_s for w in windows)
    print(f"time inside slow windows: {inside * 1000:.0f} ms of {args.seconds:.0f} s")


if __name__ == "__main__":
    main()
