"""Turbine vs NVIDIA Dynamo 1.6.1 frontend overhead, side by side on this machine.

Both stacks serve the bundled tiny model with their own mocker at speedup 1e6 (near-instant engine,
so the figures are frontend + request-plane overhead), are driven by the same load generator and
run the same workloads alternately (A, B, A, B ... `--pairs` times). Reported: medians per figure,
the ratio Turbine/Dynamo, and each frontend process's CPU per request and per streamed token (from
/proc). Streaming is measured with a new connection per request (Dynamo's HTTP sockets leave Nagle
on, which stalls reused keep-alive streams) and, separately, with keep-alive.

Set up Dynamo once (a separate venv; its `aisimulate` dependency is not needed):
    python3.11 -m venv .bench/dynamo
    .bench/dynamo/bin/pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
    .bench/dynamo/bin/pip install aiohttp msgspec prometheus-client pyzmq "redis>=6.2,<9" tqdm transformers \\
        zstandard "pydantic>=2.10.6,<=2.13.5" uvloop "kubernetes>=32.0.1,<33" certifi typing-extensions

    turbine bench vs-dynamo [--pairs 3] [--requests 1000]   # completions → vs_dynamo.md
    turbine bench vs-dynamo --chat     # chat, varied prompts → vs_dynamo_chat.md

A venv elsewhere: `--dynamo PATH/bin/python` or TURBINE_BENCH_DYNAMO_PYTHON. The machine is shared by
whatever else runs on it; the alternation keeps the two stacks' conditions alike, not quiet.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from tqdm import tqdm

from turbine.bench.dynamo import DynamoStack
from turbine.bench.loadgen import RunResult, run_closed_loop
from turbine.bench.stack import LocalStack
from turbine.bench.workloads import EnglishText, SizedText, random_words
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import Tokenizer, load_model_files


class Stack(Protocol):
    url: str
    model: str

    def frontend_cpu_s(self) -> float: ...

    def close(self) -> None: ...


class TurbineStack:
    def __init__(self, frontend_args: list[str] | None = None) -> None:
        worker = ["--engine", "mocker", "--speedup-ratio", "1000000", "--max-num-seqs", "1024"]
        self._stack = LocalStack(frontend_args or [], worker)
        self._stack.wait_ready()
        self.url = self._stack.url
        self.model = "turbine-tiny"

    def frontend_cpu_s(self) -> float:
        return self._stack.frontend_cpu_s()

    def close(self) -> None:
        self._stack.close()


class Workload(NamedTuple):
    name: str
    concurrency: int
    stream: bool
    new_connection: bool  # a new connection per request
    max_tokens: int
    scale: float  # requests per run, as a share of --requests
    chat: bool = False  # /v1/chat/completions with varied English-like prompts


WORKLOADS = [
    Workload("non-stream c=1", 1, False, False, 16, 0.25),
    Workload("non-stream c=16", 16, False, False, 16, 1.0),
    Workload("non-stream c=64", 64, False, False, 16, 1.0),
    Workload("stream c=64 new-conn", 64, True, True, 256, 0.125),
    Workload("stream c=64 keep-alive", 64, True, False, 256, 0.125),
]

# Chat with a unique English-like user message per request (60-240 words from a 30k-word vocabulary).
# Streams use a new connection per request, the fair setting for Dynamo (see the module docstring).
CHAT_WORKLOADS = [
    Workload("chat non-stream c=1", 1, False, False, 16, 0.25, chat=True),
    Workload("chat non-stream c=16", 16, False, False, 16, 1.0, chat=True),
    Workload("chat non-stream c=64", 64, False, False, 16, 1.0, chat=True),
    Workload("chat stream c=1", 1, True, True, 64, 0.125, chat=True),
    Workload("chat stream c=16", 16, True, True, 64, 0.25, chat=True),
    Workload("chat stream c=64", 64, True, True, 64, 0.25, chat=True),
]

CHAT_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and precisely."


class Bodies:
    """Request bodies for a workload; chat prompts come from one English-like vocabulary."""

    def __init__(self) -> None:
        self._english: EnglishText | None = None

    def __call__(self, model: str, n: int, w: Workload, rng: random.Random) -> list[dict[str, Any]]:
        # stream_options only with stream: Dynamo rejects it on non-streaming requests, as OpenAI does.
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if w.stream else {}
        common = {"model": model, "max_tokens": w.max_tokens, "ignore_eos": True, **extra}
        if not w.chat:
            return [{"prompt": random_words(rng, 150), **common} for _ in range(n)]
        if self._english is None:
            self._english = EnglishText()
        english = self._english
        return [
            {
                "messages": [
                    {"role": "system", "content": CHAT_SYSTEM_PROMPT},
                    {"role": "user", "content": english.text(rng, rng.randint(60, 240))},
                ],
                **common,
            }
            for _ in range(n)
        ]


async def measure(
    stack: Stack, w: Workload, n: int, bodies: Bodies, rng: random.Random, bar: tqdm
) -> dict[str, float]:
    payload = bodies(stack.model, n, w, rng)  # built before the CPU reading: the client's work
    cpu0 = stack.frontend_cpu_s()
    run: RunResult = await run_closed_loop(
        stack.url + ("/v1/chat/completions" if w.chat else "/v1/completions"),
        payload,
        concurrency=w.concurrency,
        stream=w.stream,
        new_connection_per_request=w.new_connection,
        on_done=lambda _r: bar.update(),
    )
    cpu = stack.frontend_cpu_s() - cpu0
    tokens = sum(r.output_tokens for r in run.ok)
    return {
        "req_s": run.requests_per_s,
        "tok_s": run.tokens_per_s,
        "p50_ms": run.latency_ms(0.5),
        "p99_ms": run.latency_ms(0.99),
        "ttft_p50_ms": run.ttft_ms(0.5),
        "cpu_ms_req": cpu / max(1, len(run.ok)) * 1000,
        "cpu_us_tok": cpu / max(1, tokens) * 1e6,
        "failed": float(run.failures),
    }


FIGURES = [
    ("req_s", "req/s", True),
    ("tok_s", "output tok/s", True),
    ("p50_ms", "p50 ms", False),
    ("p99_ms", "p99 ms", False),
    ("cpu_ms_req", "frontend CPU ms/req", False),
    ("cpu_us_tok", "frontend CPU µs/token", False),
]

CHAT_FIGURES = [
    ("req_s", "req/s", True),
    ("p50_ms", "p50 ms", False),
    ("p99_ms", "p99 ms", False),
    ("cpu_ms_req", "frontend CPU ms/req", False),
]


class Suite(NamedTuple):
    stem: str  # file name of the markdown and PNG, without extension
    title: str
    workloads: list[Workload]
    figures: list[tuple[str, str, bool]]
    note: str = ""


COMPLETIONS = Suite("vs_dynamo", "Turbine vs Dynamo 1.6.1 frontend", WORKLOADS, FIGURES)
CHAT = Suite(
    "vs_dynamo_chat",
    "Turbine vs Dynamo 1.6.1 frontend, chat with varied prompts",
    CHAT_WORKLOADS,
    CHAT_FIGURES,
    "Chat completions; each request a system prompt plus a unique English-like user message of 60-240 "
    "words (~200-850 tokens) drawn from a 30k-word vocabulary. Non-streaming: 16 output tokens; "
    'streaming: 64, a new connection per request. Ratios are Turbine/Dynamo; "advantage" in the '
    "figure is the ratio turned so that >1 means Turbine is better.",
)


def report(results: dict[str, dict[str, list[dict[str, float]]]], out: Path, pairs: int, suite: Suite) -> str:
    lines = [
        f"# {suite.title} ({pairs} alternating pairs, medians)",
        "",
        *([suite.note, ""] if suite.note else []),
        "| workload | figure | Turbine | Dynamo | Turbine/Dynamo | better |",
        "|---|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for w in suite.workloads:
        name = w.name
        for key, label, higher_better in suite.figures:
            t = statistics.median(r[key] for r in results["turbine"][name])
            d = statistics.median(r[key] for r in results["dynamo"][name])
            ratio = t / d if d else float("nan")
            better = (ratio >= 1.0) if higher_better else (ratio <= 1.0)
            ratios.setdefault(name, []).append(
                ratio if higher_better else (1 / ratio if ratio else float("nan"))
            )
            winner = "Turbine" if better else "Dynamo"
            lines.append(f"| {name} | {label} | {t:,.2f} | {d:,.2f} | {ratio:.2f} | {winner} |")
    failed = {k: sum(r["failed"] for rs in v.values() for r in rs) for k, v in results.items()}
    lines += [
        "",
        f"Failed requests: Turbine {failed['turbine']:.0f}, Dynamo {failed['dynamo']:.0f}.",
        "",
        f"![{suite.stem.replace('_', ' ')}]({suite.stem}.png)",
        "",
    ]
    text = "\n".join(lines)
    (out / f"{suite.stem}.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    names = [w.name for w in suite.workloads]
    width = 0.8 / len(suite.figures)
    for i, (_, label, _) in enumerate(suite.figures):
        ax.bar([x + i * width for x in range(len(names))], [ratios[n][i] for n in names], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=10)
    ax.set_ylabel("Turbine advantage (>1: Turbine better)")
    ax.set_title(f"{suite.title}; same machine, mocker speed and load generator", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out / f"{suite.stem}.png", dpi=100)
    return text


async def main_async(args: argparse.Namespace, suite: Suite) -> None:
    rng = random.Random(args.seed)
    bodies = Bodies()
    out = Path(args.out)
    makers: dict[str, Callable[[], Stack]] = {
        "turbine": TurbineStack,
        "dynamo": lambda: DynamoStack(args.dynamo),
    }
    workloads = [w for w in suite.workloads if not args.only or args.only in w.name]
    suite = suite._replace(workloads=workloads)
    stacks = {name: make() for name, make in makers.items()}
    results: dict[str, dict[str, list[dict[str, float]]]] = {k: {} for k in stacks}
    total = 2 * args.pairs * sum(max(64, int(args.requests * w.scale)) for w in workloads)
    try:
        with tqdm(total=total, unit="req", desc=suite.stem) as bar:
            for stack in stacks.values():  # warm-up
                warm = suite.workloads[0]._replace(concurrency=16, stream=False)
                await measure(stack, warm, 200, bodies, rng, tqdm(disable=True))
            for _ in range(args.pairs):
                for workload in workloads:
                    n = max(64, int(args.requests * workload.scale))
                    for name, stack in stacks.items():
                        bar.set_postfix_str(f"{name}: {workload.name}")
                        results[name].setdefault(workload.name, []).append(
                            await measure(stack, workload, n, bodies, rng, bar)
                        )
    finally:
        for stack in stacks.values():
            stack.close()
    print(report(results, out, args.pairs, suite))


def long_prompt_bodies(model: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """~7.8k-token chat prompts: one shared ~6k-token system prompt plus a unique ~1.8k-token question."""
    files = load_model_files(bundled_model_path())
    sized = SizedText(Tokenizer(files.tokenizer))

    def text(tokens: int) -> str:
        return sized.text(rng, tokens)

    system = text(6000)
    return [
        {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text(1800)}],
            "max_tokens": 16,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(n)
    ]


async def long_prompts(args: argparse.Namespace) -> str:
    """Long prompts with a shared system prompt, concurrency 32: Turbine with and without its
    tokenization cache, and Dynamo, each on a fresh stack (so no cache carries over)."""
    rng = random.Random(args.seed)
    configs: list[tuple[str, Callable[[], Stack]]] = [
        ("Turbine (prefix tokenization cache)", TurbineStack),
        ("Turbine (cache off)", lambda: TurbineStack(["--tokenizer-cache-entries", "0"])),
        ("Dynamo", lambda: DynamoStack(args.dynamo)),
    ]
    rows = ["| stack | req/s | TTFT p50 ms | TTFT p99 ms | failed |", "|---|---|---|---|---|"]
    for name, make in configs:
        stack = make()
        try:
            payload = long_prompt_bodies(stack.model, args.long_requests, rng)
            with tqdm(total=len(payload), unit="req", desc=name) as bar:
                run = await run_closed_loop(
                    stack.url + "/v1/chat/completions",
                    payload,
                    concurrency=32,
                    stream=True,
                    on_done=lambda _r: bar.update(),
                )
        finally:
            stack.close()
        rows.append(
            f"| {name} | {run.requests_per_s:,.1f} | {run.ttft_ms(0.5):.1f} | {run.ttft_ms(0.99):.1f} | "
            f"{run.failures} |"
        )
    text = (
        "# Long prompts: ~7.8k tokens, shared ~6k-token system prompt, concurrency 32\n\n"
        + "\n".join(rows)
        + "\n"
    )
    (Path(args.out) / "vs_dynamo_long.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench vs-dynamo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dynamo",
        default=os.environ.get("TURBINE_BENCH_DYNAMO_PYTHON", ".bench/dynamo/bin/python"),
        help="python of the Dynamo venv (env TURBINE_BENCH_DYNAMO_PYTHON)",
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000, help="requests per non-streaming run at c>=16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long", action="store_true", help="run only the long-prompt comparison")
    parser.add_argument(
        "--chat", action="store_true", help="run the chat workloads with varied prompts (vs_dynamo_chat.md)"
    )
    parser.add_argument("--only", default="", help="run only the workloads whose name contains this")
    parser.add_argument("--long-requests", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.dynamo):
        print(
            f"turbine bench vs-dynamo: no Dynamo python at {args.dynamo!r}: set up its venv as this "
            "benchmark's --help says, then pass --dynamo or set TURBINE_BENCH_DYNAMO_PYTHON",
            file=sys.stderr,
        )
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import uvloop

    if args.long:
        print(uvloop.run(long_prompts(args)))
    else:
        uvloop.run(main_async(args, CHAT if args.chat else COMPLETIONS))
    return 0
