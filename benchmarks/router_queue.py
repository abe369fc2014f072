"""The router queue's policies under overload: how long short prompts wait behind long ones.

One slow mocker worker (step budget 2,048 tokens) behind a frontend whose router queues at
threshold 0.5, so one long prompt in flight makes the worker busy while dozens of short ones do not.
A burst of 16 long (1,500-token) and 48 short (24-token) unique prompts arrives interleaved
(L S S S L ...); every request must finish. Under `fcfs` a short prompt waits behind every long
one that arrived before it; under `wspt` (weighted shortest processing time) only behind the long
one in flight when it arrives, so its time to first token falls. The functional side (requests
wait instead of a 503, the queue drains) is tested in tests/e2e/test_router_queue.py.

    .venv/bin/python benchmarks/router_queue.py [--runs 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import openai

from turbine.bench.stack import LocalStack

MODEL = "turbine-tiny"
WORKER = ["--engine", "mocker", "--speedup-ratio", "0.5", "--max-num-batched-tokens", "2048"]
WORKER += ["--block-size", "16"]
QUEUE = ["--router-mode", "least-loaded", "--router-queue-threshold", "0.5"]
LONG, SHORT = 1500, 24
POLICIES = ("fcfs", "wspt")


async def _one(oai: openai.AsyncOpenAI, prompt: list[int]) -> tuple[int, float]:
    """(prompt length, time to first token) of one streamed completion that must finish."""
    started = time.perf_counter()
    ttft = -1.0
    finish = None
    stream = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, stream=True, extra_body={"ignore_eos": True}
    )
    async for chunk in stream:
        if ttft < 0:
            ttft = time.perf_counter() - started
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    if finish != "length":
        raise RuntimeError(f"a request ended with {finish!r}")
    return len(prompt), ttft


async def _burst(url: str, seed: int) -> tuple[list[float], list[float]]:
    """The TTFTs of the short and of the long prompts of one burst."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(16):
        prompts.append([rng.randrange(10, 4000) for _ in range(LONG)])
        prompts += [[rng.randrange(10, 4000) for _ in range(SHORT)] for _ in range(3)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as oai:
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(oai, prompt)))
            await asyncio.sleep(0.002)  # spaced arrivals: the queue sees them in list order
        results = await asyncio.gather(*tasks)
    return [t for n, t in results if n == SHORT], [t for n, t in results if n == LONG]


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="bursts per policy (fresh prompts each)")
    parser.add_argument("--out", type=Path, help="write router_queue.{md,json} here")
    args = parser.parse_args()

    rows: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        short: list[float] = []
        long: list[float] = []
        with LocalStack([*QUEUE, "--router-queue-policy", policy], WORKER) as stack:
            for run in range(args.runs):
                s, lg = asyncio.run(_burst(stack.url, seed=run))
                short += s
                long += lg
        rows[policy] = {
            "short_p99_s": _p99(short),
            "short_mean_s": statistics.mean(short),
            "long_p99_s": _p99(long),
        }
    ratio_p99 = rows["wspt"]["short_p99_s"] / rows["fcfs"]["short_p99_s"]
    ratio_mean = rows["wspt"]["short_mean_s"] / rows["fcfs"]["short_mean_s"]
    lines = [
        "# Router queue: fcfs vs wspt under overload",
        "",
        f"{args.runs} bursts of 16 long ({LONG} tokens) + 48 short ({SHORT} tokens) prompts per policy,"
        " one mocker worker (speedup 0.5, 2,048-token steps), queue threshold 0.5.",
        "",
        "| policy | short p99 TTFT (s) | short mean TTFT (s) | long p99 TTFT (s) |",
        "|---|---|---|---|",
        *(
            f"| {p} | {r['short_p99_s']:.3f} | {r['short_mean_s']:.3f} | {r['long_p99_s']:.3f} |"
            for p, r in rows.items()
        ),
        "",
        f"wspt / fcfs, short prompts: p99 {ratio_p99:.2f}, mean {ratio_mean:.2f}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "router_queue.md").write_text(report)
        (args.out / "router_queue.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
