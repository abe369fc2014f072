"""`turbine bench scale --processes 1,2,...`: the multi-process frontend (`--num-processes N`) under
chat load from several load-generator processes, against mocker workers at speedup 1e6.

One Python load generator tops out at a few thousand requests/s, less than 8 frontend processes
serve, so `--loadgen-procs` processes drive the load together: each is pinned to `--loadgen-cpus`,
opens its share of the `--concurrency` connections (the kernel spreads connections over the
frontend processes) and starts at the same agreed instant; req/s is all of their successes over
the span from that instant to the last one's end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import random
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from turbine.bench.loadgen import percentile, run_closed_loop
from turbine.bench.stack import LocalStack, child_pids
from turbine.bench.workloads import random_words

MODEL = "turbine-tiny"


class Share(NamedTuple):
    """One load generator's part of a run."""

    ok: int
    failed: int
    end: float
    latencies_s: list[float]
    errors: list[str]


def _cpu_list(spec: str) -> set[int]:
    """A taskset-style CPU list: `0-3,8`."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _pin(spec: str | None) -> None:
    if spec:
        os.sched_setaffinity(0, _cpu_list(spec))


def _generate(
    urls: list[str], bodies: list[dict[str, Any]], concurrency: int, stream: bool, start_at: float
) -> Share:
    """In a load-generator process: wait for the agreed instant, then send `bodies`, its
    connections split evenly over `urls` (several with `--independent`)."""
    import uvloop

    async def go() -> Share:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        k = len(urls)
        runs = await asyncio.gather(
            *(
                run_closed_loop(url, bodies[i::k], concurrency=max(1, concurrency // k), stream=stream)
                for i, url in enumerate(urls)
            )
        )
        results = [r for run in runs for r in run.results]
        ok = [r for r in results if r.ok]
        errors = [r.error for r in results if not r.ok][:3]
        return Share(len(ok), len(results) - len(ok), time.time(), [r.latency_s for r in ok], errors)

    return uvloop.run(go())


def _chat_bodies(rng: random.Random, n: int) -> list[dict[str, Any]]:
    # Unique per request (a numbered opening, then random words), so nothing is served from a cache.
    return [
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": f"Request {i} ({rng.random():.6f}): {random_words(rng, 120)}"}
            ],
            "max_tokens": 16,
            "ignore_eos": True,
        }
        for i in range(n)
    ]


def urls_of_generator(i: int, procs: int, urls: list[str]) -> list[str]:
    """The frontends load generator `i` of `procs` sends to: every procs-th URL from the i-th, or one
    URL when there are fewer URLs than generators (so every URL and every generator has a share)."""
    return urls[i::procs] or [urls[i % len(urls)]]


def _drive(
    pool: concurrent.futures.ProcessPoolExecutor,
    args: argparse.Namespace,
    urls: list[str],
    stream: bool,
    n: int,
    seed: int,
) -> tuple[int, int, float, list[float]]:
    """(ok, failed, wall seconds, latencies) of `n` chat requests over every load generator; a
    distinct `seed` per call keeps prompts from repeating across calls (no cache hits)."""
    procs = args.loadgen_procs
    bodies = _chat_bodies(random.Random(seed), n)
    start_at = time.time() + 1.0
    futures = [
        pool.submit(
            _generate,
            [u + "/v1/chat/completions" for u in urls_of_generator(i, procs, urls)],
            bodies[i::procs],
            max(1, args.concurrency // procs),
            stream,
            start_at,
        )
        for i in range(procs)
    ]
    shares = [f.result() for f in futures]
    for error in {e for s in shares for e in s.errors}:
        print(f"failed request: {error}", flush=True)
    wall = max(s.end for s in shares) - start_at
    return (
        sum(s.ok for s in shares),
        sum(s.failed for s in shares),
        wall,
        [x for s in shares for x in s.latencies_s],
    )


def _hit_ratio(url: str) -> float:
    """Prompt-cache hit ratio of 96 completions in 16 shared-prefix groups, each on a fresh
    connection (so the kernel spreads them over the frontend processes), 8 at a time."""
    rng = random.Random(7)
    prefixes = [f"[group {g}] {random_words(rng, 200)}" for g in range(16)]
    bodies = [
        {"model": MODEL, "prompt": f"{prefixes[i % 16]} question {i}", "max_tokens": 2} for i in range(96)
    ]
    import uvloop

    run = uvloop.run(
        run_closed_loop(
            url + "/v1/completions", bodies, concurrency=8, stream=False, new_connection_per_request=True
        )
    )
    prompt = sum(r.prompt_tokens for r in run.ok)
    return sum(r.cached_tokens for r in run.ok) / prompt if prompt else float("nan")


def _wait_processes(stack: LocalStack, count: int, timeout: float = 120.0) -> None:
    """Until `count` distinct frontend processes have answered /health (1: the frontend itself)."""
    if count == 1:
        return
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {count} frontend processes answered")
        try:
            with urllib.request.urlopen(stack.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    seen.add(resp.headers.get("x-turbine-frontend-pid", ""))
        except OSError:
            pass
        time.sleep(0.02)
    assert len(child_pids(stack.frontend.pid)) == count


def _measure(
    args: argparse.Namespace, pool: concurrent.futures.ProcessPoolExecutor, count: int
) -> dict[str, float]:
    def taskset(cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus] if cpus else []

    worker = ["--engine", "mocker", "--speedup-ratio", "1000000", "--num-gpu-blocks-override", "16384"]
    # --independent: `count` separate one-process frontends, sharing nothing but the workers.
    processes = 1 if args.independent else count
    stack = LocalStack(
        ["--num-processes", str(processes), "--router-mode", args.router_mode, *args.frontend_args.split()],
        [*worker, "--num-workers", "1", "--block-size", "16", *args.worker_args.split()],
        expect_instances=args.workers,
        # One process per mocker: a single process hosting them all is one Python thread, and it
        # capped the whole run whatever the frontend's process count (scale_processes.md, runs A-B).
        worker_processes=args.workers,
        frontend_prefix=taskset(args.frontend_cpus),
        worker_prefix=taskset(args.worker_cpus),
        extra_frontends=count - processes,
    )
    row: dict[str, float] = {"processes": count}
    try:
        stack.wait_ready(timeout=300)
        _wait_processes(stack, processes)
        time.sleep(1.0)  # replica sync subscribes when the model appears
        row["hit_ratio"] = _hit_ratio(stack.url)
        _drive(pool, args, stack.urls, False, min(500, args.requests), seed=0)  # warm-up
        for stream in (False, True):
            key = "stream" if stream else "nonstream"
            cpu0 = stack.frontend_cpu_s()
            io0 = stack.frontend_io_counts()
            sys0 = stack.frontend_cpu_split()[1]
            ok, failed, wall, latencies = _drive(
                pool, args, stack.urls, stream, args.requests, seed=1 + stream
            )
            cpu = stack.frontend_cpu_s() - cpu0
            io1 = stack.frontend_io_counts()
            row[f"{key}_sys_ms"] = (stack.frontend_cpu_split()[1] - sys0) / max(1, ok) * 1000
            row[f"{key}_syscalls"] = (io1[0] - io0[0]) / max(1, ok)
            row[f"{key}_switches"] = (io1[1] - io0[1]) / max(1, ok)
            row[f"{key}_req_s"] = ok / wall
            row[f"{key}_cpu_ms"] = cpu / max(1, ok) * 1000
            row[f"{key}_p50_ms"] = percentile(latencies, 0.5) * 1000
            row[f"{key}_failed"] = failed
            print(
                f"{count} process(es), {key}: {ok / wall:,.0f} req/s, {failed} failed; per request: "
                f"{row[f'{key}_cpu_ms']:.2f} ms CPU ({row[f'{key}_sys_ms']:.2f} in the kernel), "
                f"{row[f'{key}_syscalls']:.1f} read/write system calls, "
                f"{row[f'{key}_switches']:.1f} sleeps (voluntary context switches)",
                flush=True,
            )
            if failed:
                print((stack.root / "frontend.log").read_text()[-6000:], flush=True)
    finally:
        stack.close()
    return row


def _median_rows(rounds: list[list[dict[str, float]]]) -> tuple[list[dict[str, float]], list[str]]:
    """Per process count, the median of each figure over the rounds, with `{key}_x` the median of
    the per-round speed-ups against the same round's first count; and those speed-ups, as text."""
    rows, speedups = [], []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds]
        row = {k: statistics.median(run[k] for run in runs) for k in first}
        parts = []
        for key, label in (("nonstream", "chat"), ("stream", "stream")):
            xs = [run[f"{key}_req_s"] / r[0][f"{key}_req_s"] for run, r in zip(runs, rounds, strict=True)]
            row[f"{key}_x"] = statistics.median(xs)
            parts.append(f"{label} " + ", ".join(f"{x:.2f}" for x in xs))
        rows.append(row)
        speedups.append(f"{first['processes']:.0f} processes: " + "; ".join(parts))
    return rows, speedups


def _report(rows: list[dict[str, float]], speedups: list[str], args: argparse.Namespace) -> str:
    lines = [
        "| processes | chat req/s | x | CPU ms/req | p50 ms | stream req/s | x | CPU ms/req | p50 ms | "
        "KV hit ratio | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']:.0f} | {r['nonstream_req_s']:,.0f} | {r['nonstream_x']:.2f} | "
            f"{r['nonstream_cpu_ms']:.2f} | {r['nonstream_p50_ms']:.1f} | {r['stream_req_s']:,.0f} | "
            f"{r['stream_x']:.2f} | {r['stream_cpu_ms']:.2f} | {r['stream_p50_ms']:.1f} | "
            f"{r['hit_ratio']:.3f} | {r['nonstream_failed'] + r['stream_failed']:.0f} |"
        )
    setup = (
        f"{args.requests} chat requests per figure (unique ~120-word prompts, 16 output tokens), "
        f"concurrency {args.concurrency} from {args.loadgen_procs} load-generator processes; "
        f"{args.workers} mocker worker processes at speedup 1e6"
        + (f" ({args.worker_args})" if args.worker_args else "")
        + (f"; frontend flags {args.frontend_args}" if args.frontend_args else "")
        + f"; router {args.router_mode}. CPUs: "
        f"frontend {args.frontend_cpus or 'any'}, workers {args.worker_cpus or 'any'}, load "
        f"generators {args.loadgen_cpus or 'any'} (of {os.cpu_count()} on this machine). KV hit "
        "ratio: 96 completions in 16 shared-prefix groups on fresh connections. CPU: supervisor + "
        "children."
    )
    if args.rounds > 1:
        per_round = " / ".join(speedups[1:])
        setup += (
            f" {args.rounds} rounds, each running every process count in turn; the table shows "
            f"medians over the rounds, x the median of each round's speed-up against that round's "
            f"first count. Per-round speed-ups: {per_round}."
        )
    if args.independent:
        setup += (
            " `--independent`: N separate one-process frontends on their own ports (the load "
            "generators split their connections over them), sharing nothing but the workers; the "
            "KV hit ratio is the first frontend's alone."
        )
    return (
        "# Multi-process frontend (`--num-processes N`)\n\n"
        + setup
        + "\n\n"
        + "\n".join(lines)
        + "\n\n![scale](scale_processes.png)\n"
    )


def run_processes(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.processes.split(",")]
    context = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(
            args.loadgen_procs, mp_context=context, initializer=_pin, initargs=(args.loadgen_cpus,)
        ) as pool,
        tqdm(total=args.rounds * len(counts), desc="process counts", unit="run") as bar,
    ):

        def measured(count: int) -> dict[str, float]:
            row = _measure(args, pool, count)
            bar.update()
            return row

        rounds = [[measured(count) for count in counts] for _ in range(args.rounds)]
    rows, speedups = _median_rows(rounds)
    text = _report(rows, speedups, args)
    out = Path(args.out)
    (out / "scale_processes.md").write_text(text)
    plot_rows(rows, out / "scale_processes.png")
    print(text)


def plot_rows(
    rows: list[dict[str, float]],
    path: Path,
    ceiling: list[dict[str, float]] | None = None,
    title: str | None = None,
) -> None:
    """Chat and streaming req/s against the process count, with linear scaling from 1 process;
    `ceiling`: rows of another run (e.g. `--independent --router-mode round-robin`), dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["processes"] for r in rows]
    for key, label in (("nonstream", "chat"), ("stream", "chat, streaming")):
        ax.plot(xs, [r[f"{key}_req_s"] for r in rows], marker="o", label=label)
        if ceiling:
            ys = [r[f"{key}_req_s"] for r in ceiling]
            cx = [r["processes"] for r in ceiling]
            ax.plot(cx, ys, marker="s", linestyle="--", label=f"{label}: ceiling")
    ax.plot(
        xs, [rows[0]["nonstream_req_s"] * x for x in xs], linestyle=":", color="gray", label="linear (chat)"
    )
    ax.set_xlabel("frontend processes")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
