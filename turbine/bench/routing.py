"""Routing quality: the same mocker workers and workload under every router, side by side.

Setup (issue 3): 4 mocker workers with the realistic timing model (speedup 1), block size 64 and a
small cache (160 blocks per worker, then a tighter 96); a shared-prefix workload (16 groups x
~2,000-token system prompt + ~64-token question, 256 requests, concurrency 16, 32 output tokens,
streaming) with a fresh random salt per run so no run hits another's cache; and a multi-turn
conversation workload. Modes: round-robin, random, least-loaded, kv (events), kv (approximate),
kv (events) with overlap weight 1.5 (the default is Dynamo's 1.0), and SGLang's gateway
(`sglang-router==0.3.2`, `--policy cache_aware`) in front of 4 single-worker Turbine
stacks. Also the hit ratio an oracle could reach on each trace (a global LRU over all workers'
capacity that hits every block seen before).

    turbine bench routing [--sglang .bench/sglang/bin/python] [--out benchmarks/results]

With `--engine torch` the same shared-prefix workload runs on real compute instead: 4 torch-engine
workers on the CPU serving a tiny random-weight Llama (the bundled tokenizer, so the same prompts),
round-robin against kv; results go to routing_torch.{md,json,png}.

    turbine bench routing --engine torch

Set up SGLang's gateway once with:
    python3.11 -m venv .bench/sglang && .bench/sglang/bin/pip install sglang-router==0.3.2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from turbine.bench.loadgen import RequestResult, RunResult, run_closed_loop, run_conversations
from turbine.bench.stack import LocalStack, free_port, stop_processes
from turbine.bench.workloads import SizedText
from turbine.kv.hashing import block_hashes
from turbine.models import bundled_model_path
from turbine.preprocess.chat_template import ChatTemplate
from turbine.preprocess.tokenizer import Tokenizer, load_model_files

MODEL = "turbine-tiny"
BLOCK = 64
WORKERS = 4


# ------------------------------------------------------------------------------------ workloads


class Prompts:
    """Builds chat prompts of about a given token length with the bundled tokenizer."""

    def __init__(self) -> None:
        files = load_model_files(bundled_model_path())
        self.tokenizer = Tokenizer(files.tokenizer)
        assert files.chat_template is not None
        self.template = ChatTemplate(files.chat_template, files.bos_token, files.eos_token)
        self._sized = SizedText(self.tokenizer)

    def text(self, rng: random.Random, tokens: int, head: str = "") -> str:
        return self._sized.text(rng, tokens, head)

    def token_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenizer.encode(self.template.render(messages, add_generation_prompt=True))


def shared_prefix_trace(
    prompts: Prompts,
    rng: random.Random,
    *,
    groups: int,
    system_tokens: int,
    question_tokens: int,
    requests: int,
) -> list[dict[str, Any]]:
    salt = f"{rng.getrandbits(64):016x}"
    systems = [prompts.text(rng, system_tokens, f"[{salt}/{g}]") for g in range(groups)]
    bodies = []
    for _ in range(requests):
        system = systems[rng.randrange(groups)]
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": prompts.text(rng, question_tokens)},
        ]
        bodies.append(
            {
                "model": MODEL,
                "messages": messages,
                "max_tokens": 32,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
        )
    return bodies


def conversations(
    prompts: Prompts, rng: random.Random, *, count: int, opening_tokens: int, turns: int, turn_tokens: int
) -> list[tuple[list[dict[str, Any]], list[str]]]:
    salt = f"{rng.getrandbits(64):016x}"
    out = []
    for c in range(count):
        opening = [
            {"role": "system", "content": prompts.text(rng, opening_tokens, f"[{salt}/{c}]")},
            {"role": "user", "content": prompts.text(rng, turn_tokens)},
        ]
        out.append((opening, [prompts.text(rng, turn_tokens) for _ in range(turns - 1)]))
    return out


def oracle_hit_ratio(traces: Sequence[list[int]], capacity_blocks: int) -> float:
    """Hits of a single LRU cache holding every worker's blocks, in arrival order."""
    lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    hit_tokens = prompt_tokens = 0
    for tokens in traces:
        hashes = block_hashes(tokens, BLOCK).sequence
        hits = 0
        for h in hashes:
            if h not in lru:
                break
            hits += 1
        # Engines always compute at least the last prompt token.
        hit_tokens += min(hits * BLOCK, len(tokens) - 1)
        prompt_tokens += len(tokens)
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)
    return hit_tokens / prompt_tokens


# --------------------------------------------------------------------------------------- stacks


@dataclass
class Outcome:
    mode: str
    run: RunResult

    @property
    def hit_ratio(self) -> float:
        ok = self.run.ok
        return sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok))

    def split(self) -> list[float]:
        counts = collections.Counter(r.worker for r in self.run.ok)
        total = sum(counts.values())
        return sorted((c / total for c in counts.values()), reverse=True) if total else []


def worker_args(blocks: int, torch_model: Path | None = None) -> list[str]:
    common = ["--num-workers", str(WORKERS), "--num-gpu-blocks-override", str(blocks)]
    common += ["--block-size", str(BLOCK)]
    if torch_model is not None:
        engine = ["--engine", "torch", "--model-path", str(torch_model), "--model-name", MODEL]
        return [*engine, "--device", "cpu", "--dtype", "float32", *common]
    return ["--engine", "mocker", *common, "--speedup-ratio", "1"]


def tiny_llama(root: Path) -> Path:
    """A tiny random-weight Llama with the bundled tokenizer (what the torch engine's tests use)."""
    from turbine.engines.torch.random_model import llama_config, write_model_dir

    return write_model_dir(root / "tiny-llama", llama_config("tiny"), std=0.2)


MODES: dict[str, list[str]] = {
    "round-robin": ["--router-mode", "round-robin"],
    "random": ["--router-mode", "random"],
    "least-loaded": ["--router-mode", "least-loaded"],
    "kv (events)": ["--router-mode", "kv"],
    "kv (approx)": ["--router-mode", "kv", "--no-kv-events"],
    # The default weight is Dynamo's 1.0; this row shows what favouring cache hits a bit more buys.
    "kv (events, weight 1.5)": ["--router-mode", "kv", "--kv-overlap-score-weight", "1.5"],
}


@contextlib.contextmanager
def sglang_stack(python: str, blocks: int) -> Iterator[str]:
    """4 single-worker Turbine stacks behind SGLang's cache-aware gateway."""
    stacks = [
        LocalStack([], [*worker_args(blocks)[:3], "1", *worker_args(blocks)[4:]]) for _ in range(WORKERS)
    ]
    router: subprocess.Popen[bytes] | None = None
    try:
        for stack in stacks:
            stack.wait_ready()
        port = free_port()
        log = open(stacks[0].root / "sglang.log", "wb")  # noqa: SIM115
        router = subprocess.Popen(
            [
                python,
                "-m",
                "sglang_router.launch_router",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--prometheus-host",
                "127.0.0.1",
                "--prometheus-port",
                str(free_port()),
                "--policy",
                "cache_aware",
                "--worker-urls",
                *(s.url for s in stacks),
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if router.poll() is not None:
                raise RuntimeError(f"sglang router exited: see {stacks[0].root / 'sglang.log'}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/v1/models", timeout=1) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("sglang router did not come up")
            time.sleep(0.2)
        yield url
    finally:
        if router is not None:
            stop_processes([router], timeout_s=10)
        for stack in stacks:
            stack.close()


async def drive(url: str, workload: str, payload: Any, desc: str) -> RunResult:
    total = len(payload) if workload == "shared" else sum(1 + len(t) for _, t in payload)
    bar = tqdm(total=total, desc=desc, unit="req", leave=False)

    def done(_r: RequestResult) -> None:
        bar.update()

    if workload == "shared":
        run = await run_closed_loop(
            url + "/v1/chat/completions", payload, concurrency=16, stream=True, on_done=done
        )
    else:
        run = await run_conversations(
            url + "/v1/chat/completions", payload, model=MODEL, concurrency=16, max_tokens=32, on_done=done
        )
    bar.close()
    return run


# -------------------------------------------------------------------------------------- report


def table(title: str, oracle: float, outcomes: list[Outcome]) -> str:
    rr = next((o for o in outcomes if o.mode == "round-robin"), None)
    lines = [
        f"### {title}",
        "",
        f"Oracle hit ratio on this trace: **{oracle:.2f}**"
        if not math.isnan(oracle)
        else "Oracle: not computed for this workload (turns depend on earlier answers).",
        "",
        "| router | hit ratio | % of oracle | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | req/s | "
        "TTFT p50 vs RR | busiest worker | split | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        r = o.run
        speedup = rr.run.ttft_ms(0.5) / r.ttft_ms(0.5) if rr else float("nan")
        split = o.split()
        of_oracle = "n/a" if math.isnan(oracle) else f"{o.hit_ratio / oracle:.0%}"
        lines.append(
            f"| {o.mode} | {o.hit_ratio:.2f} | {of_oracle} | "
            f"{r.ttft_ms(0.5):.0f} | "
            f"{r.ttft_ms(0.99):.0f} | {r.latency_ms(0.5):.0f} | {r.latency_ms(0.99):.0f} | "
            f"{r.requests_per_s:.1f} | {speedup:.2f}x | {split[0] if split else float('nan'):.0%} | "
            f"{'/'.join(f'{s:.0%}' for s in split) or 'n/a'} | {r.failures} |"
        )
    return "\n".join(lines) + "\n"


def plot(sections: list[tuple[str, float, list[Outcome]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 2, figsize=(13, 3.6 * len(sections)), squeeze=False)
    for row, (title, oracle, outcomes) in enumerate(sections):
        names = [o.mode for o in outcomes]
        ax = axes[row][0]
        ax.bar(names, [o.hit_ratio for o in outcomes], color="#4c72b0")
        if not math.isnan(oracle):
            ax.axhline(oracle, color="#c44e52", linestyle="--", label=f"oracle {oracle:.2f}")
            ax.legend(loc="lower right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: prompt-cache hit ratio")
        ax.tick_params(axis="x", rotation=20)
        ax = axes[row][1]
        x = range(len(outcomes))
        ax.bar([i - 0.2 for i in x], [o.run.ttft_ms(0.5) for o in outcomes], width=0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [o.run.ttft_ms(0.99) for o in outcomes], width=0.4, label="p99")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_ylabel("ms")
        ax.set_title(f"{title}: TTFT")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


# ---------------------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    prompts = Prompts()
    out = Path(args.out)
    modes = {k: v for k, v in MODES.items() if not args.modes or k in args.modes}
    sections: list[tuple[str, float, list[Outcome]]] = []
    configs = [
        ("shared prefix, 160 blocks/worker", "shared", 160),
        ("shared prefix, 96 blocks/worker", "shared", 96),
        ("multi-turn, 160 blocks/worker", "multi", 160),
    ]
    torch_model: Path | None = None
    name = "routing"
    if args.engine == "torch":
        import tempfile

        torch_model = tiny_llama(Path(tempfile.mkdtemp(prefix="turbine-routing-")))
        configs = [("torch engine (tiny Llama, CPU), shared prefix, 160 blocks/worker", "shared", 160)]
        modes = {k: v for k, v in modes.items() if k in ("round-robin", "kv (events)")}
        name = "routing_torch"
        args.sglang = ""
    if args.configs:
        configs = [configs[i] for i in args.configs]
    for title, workload, blocks in configs:
        outcomes: list[Outcome] = []
        oracles: list[float] = []
        runs: list[tuple[str, list[str] | None]] = [(m, a) for m, a in modes.items()]
        if args.sglang:
            runs.append(("sglang cache_aware", None))
        for mode, frontend_args in runs:
            # A fresh salt per run: no run can hit a cache warmed by another.
            if workload == "shared":
                payload: Any = shared_prefix_trace(
                    prompts,
                    rng,
                    groups=args.groups,
                    system_tokens=2000,
                    question_tokens=64,
                    requests=args.requests,
                )
                traces = [prompts.token_ids(b["messages"]) for b in payload]
            else:
                payload = conversations(
                    prompts, rng, count=args.conversations, opening_tokens=1000, turns=6, turn_tokens=100
                )
            if frontend_args is None:
                with sglang_stack(args.sglang, blocks) as url:
                    run = await drive(url, workload, payload, f"{title}: {mode}")
            else:
                with LocalStack(
                    frontend_args, worker_args(blocks, torch_model), expect_instances=WORKERS
                ) as stack:
                    run = await drive(stack.url, workload, payload, f"{title}: {mode}")
            if workload == "shared":
                oracles.append(oracle_hit_ratio(traces, WORKERS * blocks))
            outcomes.append(Outcome(mode, run))
            print(
                f"  {title} / {mode}: hit {outcomes[-1].hit_ratio:.2f}, TTFT p50 {run.ttft_ms(0.5):.0f} ms, "
                f"p99 {run.ttft_ms(0.99):.0f} ms, failed {run.failures}",
                flush=True,
            )
        oracle = sum(oracles) / len(oracles) if oracles else float("nan")
        sections.append((title, oracle, outcomes))
    report = (
        "# Routing benchmark\n\n" + "\n".join(table(*s) for s in sections) + f"\n![routing]({name}.png)\n"
    )
    (out / f"{name}.md").write_text(report)
    (out / f"{name}.json").write_text(
        json.dumps(
            [
                {
                    "title": t,
                    "oracle": o,
                    "modes": {
                        x.mode: {
                            "hit": x.hit_ratio,
                            "ttft_p50": x.run.ttft_ms(0.5),
                            "ttft_p99": x.run.ttft_ms(0.99),
                            "split": x.split(),
                        }
                        for x in outs
                    },
                }
                for t, o, outs in sections
            ],
            indent=1,
        )
    )
    plot(sections, out / f"{name}.png")
    print(report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_sglang = ".bench/sglang/bin/python"
    parser.add_argument(
        "--sglang",
        default=default_sglang if os.path.exists(default_sglang) else "",
        help="python of a venv with sglang-router==0.3.2 ('' to skip)",
    )
    parser.add_argument("--modes", nargs="*", default=[], help="subset of modes to run")
    parser.add_argument("--configs", nargs="*", type=int, default=[], help="indexes of configurations to run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", choices=("mocker", "torch"), default="mocker")
    parser.add_argument("--requests", type=int, default=256, help="shared prefix: requests per run")
    parser.add_argument("--groups", type=int, default=16, help="shared prefix: system prompts")
    parser.add_argument("--conversations", type=int, default=32, help="multi-turn: conversations per run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    import uvloop

    Path(args.out).mkdir(parents=True, exist_ok=True)
    uvloop.run(main_async(args))
    return 0
