"""Frontend overhead: a frontend plus one mocker at a very high speedup ratio, so nearly all the time
measured is Turbine's (HTTP, templating, tokenization, routing, request plane, detokenization).

Workloads (REFERENCE.md / issue 2): non-streaming requests (~150-token prompt, max_tokens 16) at
concurrency 1, 16 and 64; streaming (max_tokens 256) at concurrency 64 with a new connection per
request. Reports req/s, output tokens/s, p50/p99 latency and the frontend process's CPU per request
and per streamed token, as markdown and a PNG.

    .venv/bin/python benchmarks/overhead.py [--requests 2000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from turbine.bench.loadgen import RunResult, run_closed_loop
from turbine.bench.stack import LocalStack
from turbine.bench.workloads import random_words

MODEL = "turbine-tiny"


def prompt_of_about(tokens: int, rng: random.Random) -> str:
    # The tiny tokenizer gives roughly one token per common word plus its space.
    return random_words(rng, tokens)


@dataclass
class Row:
    name: str
    run: RunResult
    cpu_s: float

    def cpu_per_request_ms(self) -> float:
        return self.cpu_s / max(1, len(self.run.ok)) * 1000

    def cpu_per_token_us(self) -> float:
        tokens = sum(r.output_tokens for r in self.run.ok)
        return self.cpu_s / max(1, tokens) * 1e6


async def measure(
    stack: LocalStack,
    name: str,
    bodies: list[dict[str, Any]],
    *,
    concurrency: int,
    stream: bool,
    new_conn: bool,
) -> Row:
    bar = tqdm(total=len(bodies), desc=name, unit="req", leave=False)
    cpu0 = stack.frontend_cpu_s()
    run = await run_closed_loop(
        stack.url + "/v1/completions",
        bodies,
        concurrency=concurrency,
        stream=stream,
        new_connection_per_request=new_conn,
        on_done=lambda _r: bar.update(),
    )
    cpu = stack.frontend_cpu_s() - cpu0
    bar.close()
    return Row(name, run, cpu)


def report(rows: list[Row], out: Path) -> str:
    lines = [
        "| workload | req/s | output tok/s | p50 ms | p99 ms | failed | frontend CPU ms/req | CPU µs/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.run
        lines.append(
            f"| {row.name} | {r.requests_per_s:,.0f} | {r.tokens_per_s:,.0f} | {r.latency_ms(0.5):.2f} | "
            f"{r.latency_ms(0.99):.2f} | {r.failures} | {row.cpu_per_request_ms():.2f} | "
            f"{row.cpu_per_token_us():.1f} |"
        )
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text("# Frontend overhead\n\n" + table + "\n\n![overhead](overhead.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    non_stream = [row for row in rows if not row.name.startswith("stream")]
    ax1.bar([row.name for row in non_stream], [row.run.requests_per_s for row in non_stream], color="#4c72b0")
    ax1.set_ylabel("requests/s")
    ax1.set_title("Non-streaming (max_tokens 16)")
    stream_rows = [row for row in rows if row.name.startswith("stream")]
    ax2.bar([row.name for row in stream_rows], [row.run.tokens_per_s for row in stream_rows], color="#55a868")
    ax2.set_ylabel("output tokens/s")
    ax2.set_title("Streaming (max_tokens 256)")
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=110)
    return table


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    worker_args = ["--engine", "mocker", "--speedup-ratio", str(args.speedup), "--max-num-seqs", "1024"]
    with LocalStack([], worker_args) as stack:

        def bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
            return [
                {
                    "model": MODEL,
                    "prompt": prompt_of_about(150, rng),
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                for _ in range(n)
            ]

        await measure(stack, "warm-up", bodies(200, 16), concurrency=16, stream=False, new_conn=False)
        rows = []
        for conc in (1, 16, 64):
            n = args.requests if conc > 1 else max(200, args.requests // 4)
            rows.append(
                await measure(
                    stack,
                    f"non-stream c={conc}",
                    bodies(n, 16),
                    concurrency=conc,
                    stream=False,
                    new_conn=False,
                )
            )
        n_stream = max(128, args.requests // 8)
        rows.append(
            await measure(
                stack,
                "stream c=64 new-conn",
                bodies(n_stream, 256),
                concurrency=64,
                stream=True,
                new_conn=True,
            )
        )
        rows.append(
            await measure(
                stack,
                "stream c=64 keep-alive",
                bodies(n_stream, 256),
                concurrency=64,
                stream=True,
                new_conn=False,
            )
        )
    print(report(rows, Path(args.out)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per non-streaming run")
    parser.add_argument("--speedup", type=float, default=1_000_000.0, help="mocker speedup ratio")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
