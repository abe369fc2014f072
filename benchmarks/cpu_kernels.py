"""Turbine's CPU 4-bit kernel (`--cpu-kernels turbine`) against torch's int4 kernel, paired.

SmolLM2-135M-Instruct (Q4_1 GGUF), bfloat16, on this machine's CPU. Three measurements, each
alternating the configurations in one process so that the shared machine's slow and fast phases hit
them alike:
- the 120 layer matmuls of one decode step (SmolLM2's shapes, random 4-bit weights, one copy per
  layer so the weights come from memory as in a forward) at 1, 4, 8 and 16 rows, each kernel;
- the engine end to end (`EngineRunner`: 128 new tokens per request, greedy) at concurrency 1, 8 and
  32, each round's order flipped from the last: torch's kernel for steps of up to 8 rows (the
  default before), Turbine's for up to 8, and Turbine's for up to `--wide-rows` rows;
- greedy agreement: 8 prompts, 64 new tokens, each configuration against the float32 model on the
  dequantized weights (tokens until the first difference);
- logit error: one batch-8 decode step after a 20-token prefill, for 6 sets of random prompts, the
  mean absolute difference of the logits from the float32 model's, for the plain bfloat16 forward
  (dense and torch's int4 weights) and Turbine's (dense and 4-bit). Greedy agreement alone turns
  on near-ties; this says whether a path is less exact (`--accuracy-only` runs just this).
Prints medians and per-round ratios; `--json` writes them.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_kernels.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from turbine.bench.engine import EngineRunner, request, text_prompts
from turbine.engines.torch import cpu_kernels
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.gguf import convert_gguf
from turbine.models import default_real_model_path

NEW = 128
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # SmolLM2: qkv, o, gate_up, down


def matmul_pairs(rounds: int) -> dict[str, Any]:
    """Per row count: each kernel's time (ms) for the 120 matmuls of a step, median of its rounds.
    "turbine" is the AMX kernel itself, at every row count (in the engine, 1-3 rows go to torch's)."""
    gen = torch.Generator().manual_seed(0)
    kernels: dict[str, list[tuple[Callable[[torch.Tensor], torch.Tensor], int]]] = {
        "torch": [],
        "turbine": [],
    }
    for n, k in SHAPES * 30:
        nib = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=gen)
        scale = torch.rand(n, k // 32, generator=gen) * 0.02
        zero = torch.randn(n, k // 32, generator=gen) * 0.01
        blocks = (nib, scale, zero)
        amx = cpu_kernels.AmxQ4Weight(blocks, torch.bfloat16)
        kernels["torch"].append((amx.small, k))
        kernels["turbine"].append(
            (functools.partial(torch.ops.turbine_cpu.q4_linear, packed=amx.packed, n=n), k)
        )
    out: dict[str, Any] = {}
    for rows in (1, 4, 8, 16):
        xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in tqdm(range(rounds * 10), desc=f"matmuls, {rows} rows", leave=False):
            for name, layers in kernels.items():
                t0 = time.perf_counter()
                for fn, k in layers:
                    fn(xs[k])
                times[name].append((time.perf_counter() - t0) * 1e3)
        out[f"matmuls_ms_{rows}_rows"] = {name: statistics.median(ts) for name, ts in times.items()}
    return out


def greedy_agreement(
    runners: dict[str, EngineRunner], reference: EngineRunner, prompts: list[list[int]]
) -> dict[str, Any]:
    def outputs(runner: EngineRunner) -> list[list[int]]:
        async def one(tokens: list[int]) -> list[int]:
            got: list[int] = []
            async for out in runner.engine.generate(request(tokens, 64)):
                got += out.token_ids
            return got

        async def main() -> list[list[int]]:
            return list(await asyncio.gather(*(one(p) for p in prompts)))

        return runner.loop.run_until_complete(main())

    ref = outputs(reference)
    result: dict[str, Any] = {}
    for name, runner in runners.items():
        agree = []
        for a, b in zip(outputs(runner), ref, strict=True):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            agree.append(n)
        result[name] = agree
    return {"greedy_tokens_agreeing_with_float32": result}


def logit_errors(model_dir: Path, seeds: int = 6) -> dict[str, Any]:
    from turbine.engines.torch.attention import build_meta

    def model(dtype: str, rows: int, kernels: str) -> Any:
        cfg = TorchEngineConfig(
            model_dir=model_dir,
            device="cpu",
            dtype=dtype,
            progress=False,
            q4_max_rows=rows,
            cpu_kernels=kernels,
        )
        return load_model(cfg).model

    def logits(m: Any, seed: int, decode_kernel: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        cpu, batch = torch.device("cpu"), 8
        cache = m.new_kv_cache(2 * batch, 16)
        tables = [[2 * i, 2 * i + 1] for i in range(batch)]
        prompts = [torch.randint(0, m.arch.vocab_size, (20,), generator=gen) for _ in range(batch)]
        meta = build_meta([(t, 0, 20) for t in tables], 16, cpu, dtype=torch.bfloat16)
        m.forward(torch.cat(prompts), torch.arange(20).repeat(batch), cache, meta)
        meta = build_meta(
            [(t, 20, 1) for t in tables], 16, cpu, decode_kernel=decode_kernel, dtype=torch.bfloat16
        )
        ids = torch.randint(0, m.arch.vocab_size, (batch,), generator=gen)
        out: torch.Tensor = m.logits(m.forward(ids, torch.full((batch,), 20), cache, meta)).float()
        return out

    reference = model("float32", 0, "torch")
    paths = {
        "plain bf16, dense": (model("bfloat16", 0, "torch"), False),
        "plain bf16, torch int4": (model("bfloat16", 8, "torch"), False),
        "turbine bf16, dense": (model("bfloat16", 0, "turbine"), True),
        "turbine bf16, AMX 4-bit": (model("bfloat16", 8, "turbine"), True),
    }
    errors: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for seed in range(seeds):
            ref = logits(reference, seed, False)
            for name, (m, kernel) in paths.items():
                errors[name].append(float((logits(m, seed, kernel) - ref).abs().mean()))
    return {
        "logit_mean_abs_error_vs_float32": {
            n: {"mean": statistics.mean(e), "per_seed": e} for n, e in errors.items()
        }
    }


def engine_pairs(runners: dict[str, EngineRunner], prompts: list[list[int]], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    names = list(runners)
    for conc in (1, 8, 32):
        batch = prompts[:conc]
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in tqdm(range(rounds), desc=f"engine, concurrency {conc}", leave=False):
            for name in names if r % 2 == 0 else names[::-1]:
                wall, _ = runners[name].run([request(p, NEW) for p in batch])
                rates[name].append(conc * NEW / wall)
        out[f"engine_tok_s_c{conc}"] = {name: statistics.median(v) for name, v in rates.items()}
        for name in names[1:]:
            ratios = [a / b for a, b in zip(rates[name], rates[names[0]], strict=True)]
            out[f"engine_ratio_c{conc}_{name}"] = {"median": statistics.median(ratios), "per_round": ratios}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Matmul times by rows, and engine tok/s by concurrency, each kernel side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [int(k.split("_")[2]) for k in result if k.startswith("matmuls_ms_")]
    for i, name in enumerate(("torch", "turbine")):
        left.bar([r + (i - 0.5) * 0.35 for r in range(len(rows))],
                 [result[f"matmuls_ms_{n}_rows"][name] for n in rows], 0.35, label=name)  # fmt: skip
    left.set_xticks(range(len(rows)), [f"{n} rows" for n in rows])
    left.set_ylabel("ms for SmolLM2's 120 layer matmuls")
    left.set_title("4-bit matmuls (lower is better)")
    left.legend()
    concs = [int(k.removeprefix("engine_tok_s_c")) for k in result if k.startswith("engine_tok_s_c")]
    names = list(result[f"engine_tok_s_c{concs[0]}"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        right.bar([c + (i - (len(names) - 1) / 2) * width for c in range(len(concs))],
                  [result[f"engine_tok_s_c{c}"][name] for c in concs], width, label=name)  # fmt: skip
    right.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
    right.set_ylabel("output tok/s")
    right.set_title("engine, 128 new tokens (higher is better)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wide-rows", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--accuracy-only", action="store_true", help="only the logit error (merged into --json)")
    ap.add_argument("--plot-only", action="store_true", help="only redraw the PNG beside --json from it")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(args.json.read_text()), args.json.with_suffix(".png"))
        return 0
    cpu_kernels.load()
    model_dir = convert_gguf(default_real_model_path(), progress=False)
    if args.accuracy_only:
        errors = logit_errors(model_dir)
        for name, value in errors["logit_mean_abs_error_vs_float32"].items():
            print(f"{name}: mean {value['mean']:.3f} ({', '.join(f'{x:.3f}' for x in value['per_seed'])})")
        if args.json:
            merged = json.loads(args.json.read_text()) if args.json.is_file() else {}
            args.json.write_text(json.dumps(merged | errors, indent=2) + "\n")
        return 0
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = text_prompts(tokenizer, 32, 60, 32)
    configs = {
        "torch-8": ("bfloat16", 8, "torch"),
        "turbine-8": ("bfloat16", 8, "turbine"),
        f"turbine-{args.wide_rows}": ("bfloat16", args.wide_rows, "turbine"),
        "float32": ("float32", 0, "torch"),
    }
    runners: dict[str, EngineRunner] = {}
    for name, (dtype, rows, kernels) in configs.items():
        cfg = TorchEngineConfig(
            model_dir=model_dir,
            device="cpu",
            dtype=dtype,
            max_num_batched_tokens=2048,
            progress=False,
            q4_max_rows=rows,
            cpu_kernels=kernels,
        )
        runners[name] = EngineRunner(cfg, load_model(cfg))
        runners[name].run([request(p, 4) for p in text_prompts(tokenizer, 2, 40, 99)])  # warm up
    reference = runners.pop("float32")
    try:
        result: dict[str, Any] = {"threads": torch.get_num_threads(), "rounds": args.rounds}
        result |= greedy_agreement(runners, reference, prompts[:8])
        reference.close()
        result |= logit_errors(model_dir)
        result |= matmul_pairs(args.rounds)
        result |= engine_pairs(runners, prompts, args.rounds)
    finally:
        for runner in runners.values():
            runner.close()
    for key, value in result.items():
        if key.startswith(("matmuls_ms", "engine_tok_s")):
            print(f"{key}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
        elif key.startswith("engine_ratio"):
            rounds = ", ".join(f"{x:.2f}" for x in value["per_round"])
            print(f"{key}: median {value['median']:.2f}x (rounds {rounds})")
        else:
            print(f"{key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
