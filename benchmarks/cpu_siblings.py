"""Which CPUs of this machine share a physical core? Measured, not read from the topology files.

A virtual machine shows its vCPUs as it likes: `lscpu` may say one thread per core while two vCPUs
are the two hyperthreads of one host core. Two busy hyperthreads of one core each run at roughly
half to two-thirds of their solo speed, so a multi-process benchmark that fills every vCPU sees its
per-request CPU grow for that reason alone.

The test: one process pinned to a target CPU times a fixed unit of pure-Python work (what the
frontend runs), alone and then while a second process pinned to CPU j spins in the same kind of loop,
for every other CPU j in turn. A j that slows the target well beyond the others is its sibling.

    python3 benchmarks/cpu_siblings.py [--targets 0,5] [--seconds 1.0] [--fill 1,3,7,15] [--json F]

Prints, per target, each CPU's slowdown (median unit time with the spinner / alone), and the
topology files' view for comparison. Linux only (`os.sched_setaffinity`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

_LOOP = 20_000


def work_unit() -> None:
    """Integer arithmetic and attribute-free bytecode: the interpreter's own dispatch loop."""
    acc = 0
    for i in range(_LOOP):
        acc = (acc + i * i) & 0xFFFF


def time_units(cpu: int, seconds: float) -> float:
    """Median seconds of one unit, pinned to `cpu`, over `seconds` of back-to-back units."""
    os.sched_setaffinity(0, {cpu})
    work_unit()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        work_unit()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _spin(cpu: int, stop: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        work_unit()


def slowdowns(target: int, cpus: list[int], seconds: float) -> dict[int, float]:
    """Per other CPU j: the target's unit time with a spinner on j over its time alone."""
    alone_before = time_units(target, seconds)
    out: dict[int, float] = {}
    for j in tqdm([c for c in cpus if c != target], desc=f"CPU {target}", leave=False):
        stop = mp.Event()
        spinner = mp.Process(target=_spin, args=(j, stop), daemon=True)
        spinner.start()
        time.sleep(0.1)
        try:
            out[j] = time_units(target, seconds)
        finally:
            stop.set()
            spinner.join(5)
            if spinner.is_alive():
                spinner.kill()
    alone_after = time_units(target, seconds)
    alone = min(alone_before, alone_after)
    return {j: t / alone for j, t in out.items()}


def fill_curve(
    target: int, cpus: list[int], counts: list[int], seconds: float, rounds: int
) -> dict[int, list[float]]:
    """Per k in `counts`: the target's unit time with spinners on the first k other CPUs, over its
    time alone measured right before, once per round (order reversed every other round)."""
    others = [c for c in cpus if c != target]
    out: dict[int, list[float]] = {k: [] for k in counts}
    for r in tqdm(range(rounds), desc=f"fill CPU {target}", leave=False):
        for k in counts if r % 2 == 0 else counts[::-1]:
            alone = time_units(target, seconds)
            stop = mp.Event()
            spinners = [mp.Process(target=_spin, args=(c, stop), daemon=True) for c in others[:k]]
            for p in spinners:
                p.start()
            time.sleep(0.1)
            try:
                out[k].append(time_units(target, seconds) / alone)
            finally:
                stop.set()
                for p in spinners:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
    return out


def topology_siblings(cpu: int) -> str:
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    return path.read_text().strip() if path.is_file() else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="0", help="comma-separated CPUs to test (default 0)")
    ap.add_argument("--seconds", type=float, default=1.0, help="timing window per measurement")
    ap.add_argument("--fill", default="", help="also: spinners on the first k other CPUs, e.g. 1,3,7,15")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --fill")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    result: dict[str, Any] = {"cpus": cpus, "targets": {}}
    for target in (int(t) for t in args.targets.split(",")):
        slow = slowdowns(target, cpus, args.seconds)
        ranked = sorted(slow.items(), key=lambda kv: -kv[1])
        print(f"CPU {target} (topology files say siblings: {topology_siblings(target)})")
        print("  slowdown with a spinner on CPU j: " + ", ".join(f"{j}: {s:.2f}" for j, s in ranked))
        others = [s for _, s in ranked[1:]]
        rest = f"; the rest median {statistics.median(others):.2f}x" if others else ""
        print(f"  most: CPU {ranked[0][0]} at {ranked[0][1]:.2f}x{rest}")
        result["targets"][str(target)] = {
            "slowdown": {str(j): s for j, s in slow.items()},
            "topology_siblings": topology_siblings(target),
        }
    if args.fill:
        counts = [int(k) for k in args.fill.split(",")]
        target = cpus[0]
        curve = fill_curve(target, cpus, counts, args.seconds, args.rounds)
        print(f"CPU {target} with the first k other CPUs spinning (unit time over alone, per round):")
        for k, ratios in curve.items():
            per = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"  k={k:2d}: median {statistics.median(ratios):.2f}x ({per})")
        result["fill"] = {str(k): v for k, v in curve.items()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
