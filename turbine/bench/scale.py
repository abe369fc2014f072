"""How the frontend's cost grows with the number of worker instances and of models.

For 1, 64 and 512 registered mocker instances (`--instances`; one worker process, `--num-workers N`,
speedup 1e6) and for round-robin and kv routing: the frontend's resident memory and CPU per request
under the same non-streaming load (c=16, ~150-token prompts, 16 output tokens). Then 10 models at
once (`--models`, one worker process each), requests spread over all of them. Markdown + PNG.

    turbine bench scale [--requests 1000]

With `--processes 1,2,4,8` it measures the multi-process frontend instead (`--num-processes N`):
chat completions with varied prompts (unique per request), non-streaming and streaming, from
several load-generator processes, against mocker workers at speedup 1e6; req/s, frontend CPU per
request (supervisor and children) and the KV-routing hit ratio of a shared-prefix workload sent over
fresh connections (spread over the processes by the kernel). `--frontend-cpus`, `--worker-cpus`
and `--loadgen-cpus` pin each part to its own cores (`taskset` lists, e.g. 0-7), so that N=auto
and the load generator do not compete with the workers. Writes scale_processes.md + .png.

    turbine bench scale --processes 1,2 --requests 2000
    turbine bench scale --processes 1,2,4,8 --frontend-cpus 0-7 \
        --loadgen-cpus 8-13 --worker-cpus 14-15 --loadgen-procs 6 --concurrency 192
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from turbine.bench.loadgen import run_closed_loop
from turbine.bench.stack import LocalStack
from turbine.bench.workloads import random_words


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bodies(models: list[str], n: int, rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "model": models[i % len(models)],
            "prompt": random_words(rng, 150),
            "max_tokens": 16,
            "ignore_eos": True,
        }
        for i in range(n)
    ]


async def measure(
    stack: LocalStack, models: list[str], n: int, rng: random.Random, desc: str
) -> dict[str, float]:
    await run_closed_loop(
        stack.url + "/v1/completions", bodies(models, 200, rng), concurrency=16, stream=False
    )
    bar = tqdm(total=n, desc=desc, unit="req", leave=False)
    cpu0 = stack.frontend_cpu_s()
    run = await run_closed_loop(
        stack.url + "/v1/completions",
        bodies(models, n, rng),
        concurrency=16,
        stream=False,
        on_done=lambda _r: bar.update(),
    )
    cpu = stack.frontend_cpu_s() - cpu0
    bar.close()
    return {
        "req_s": run.requests_per_s,
        "cpu_ms_req": cpu / max(1, len(run.ok)) * 1000,
        "rss_mib": rss_mib(stack.frontend.pid),
        "p50_ms": run.latency_ms(0.5),
        "failed": run.failures,
    }


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    rows: list[tuple[str, dict[str, float]]] = []
    worker = ["--engine", "mocker", "--speedup-ratio", "1000000", "--num-gpu-blocks-override", "512"]
    for mode in ("round-robin", "kv"):
        for n in args.instances:
            stack = LocalStack(
                ["--router-mode", mode], [*worker, "--num-workers", str(n)], expect_instances=n
            )
            try:
                stack.wait_ready(timeout=300)
                rows.append(
                    (
                        f"{mode}, {n} instance(s)",
                        await measure(stack, ["turbine-tiny"], args.requests, rng, f"{mode} x{n}"),
                    )
                )
            finally:
                stack.close()
    for mode in ("round-robin", "kv"):
        models = [f"model-{i}" for i in range(args.models)]
        stack = LocalStack(
            ["--router-mode", mode],
            worker,
            expect_instances=len(models),
            worker_processes=len(models),
            worker_extra=[["--model-name", m] for m in models],
        )
        try:
            stack.wait_ready(timeout=300)
            rows.append(
                (
                    f"{mode}, {len(models)} models x 1 instance",
                    await measure(stack, models, args.requests, rng, f"{mode} {len(models)} models"),
                )
            )
        finally:
            stack.close()
    lines = [
        "| setup | req/s | frontend CPU ms/req | frontend RSS MiB | p50 ms | failed |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['req_s']:,.0f} | {r['cpu_ms_req']:.2f} | {r['rss_mib']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['failed']:.0f} |"
        )
    text = "# Frontend cost vs workers and models\n\n" + "\n".join(lines) + "\n\n![scale](scale.png)\n"
    out = Path(args.out)
    (out / "scale.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("round-robin", "kv"):
        xs = list(args.instances)
        sel = [r for name, r in rows if name.startswith(mode + ",") and "models" not in name]
        ax1.plot(xs, [r["cpu_ms_req"] for r in sel], marker="o", label=mode)
        ax2.plot(xs, [r["rss_mib"] for r in sel], marker="o", label=mode)
    for ax, label in ((ax1, "frontend CPU ms/request"), (ax2, "frontend RSS MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("registered worker instances")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=100)
    print(text)


def instance_counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--instances", type=instance_counts, default=[1, 64, 512], help="comma-separated instance counts"
    )
    parser.add_argument("--models", type=int, default=10, help="models served at once, one worker each")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--processes", help="comma-separated frontend process counts (e.g. 1,2,4,8)")
    parser.add_argument("--concurrency", type=int, default=64, help="--processes: requests in flight")
    parser.add_argument("--loadgen-procs", type=int, default=2, help="--processes: load generators")
    parser.add_argument("--workers", type=int, default=4, help="--processes: mocker workers")
    parser.add_argument("--frontend-cpus", help="--processes: taskset CPU list of the frontend")
    parser.add_argument("--worker-cpus", help="--processes: taskset CPU list of the workers")
    parser.add_argument("--loadgen-cpus", help="--processes: CPU list of the load generators")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--processes: run every process count this many times in turn; report medians",
    )
    parser.add_argument(
        "--frontend-args", default="", help="--processes: more frontend flags, space-separated"
    )
    parser.add_argument("--worker-args", default="", help="--processes: more worker flags, space-separated")
    parser.add_argument(
        "--router-mode",
        default="kv",
        choices=("kv", "round-robin", "random"),
        help="--processes: the frontend's router (round-robin follows no KV events: the ceiling of "
        "the multi-process frontend without routing state to share)",
    )
    parser.add_argument(
        "--independent",
        action="store_true",
        help="--processes: N separate one-process frontends on their own ports instead of one "
        "--num-processes N frontend (what the host gives N Python frontends that share nothing)",
    )
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.processes:
        from turbine.bench.multiproc import run_processes

        run_processes(args)
        return 0
    import uvloop

    uvloop.run(main_async(args))
    return 0
