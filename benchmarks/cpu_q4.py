"""The CPU engine with and without a GGUF's 4-bit weights (`--q4-max-rows 8` against 0), paired.

SmolLM2-135M-Instruct (Q4_1 GGUF), bfloat16. Two measurements, each alternating the two
configurations in one process, round by round, so that the shared machine's slow and fast phases
hit both alike:
- the engine end to end (`EngineRunner`: 128 new tokens per request, greedy) at concurrency 1, 8 and
  32, each round's order flipped from the last (rounds after the first find the prompts cached, in
  both configurations alike);
- the forward of one decode step (no sampling) at 1, 4 and 8 rows, context 164, on the two models.
Prints medians and per-round ratios; `--json` writes them.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_q4.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

from cpu_kernels import engine_pairs
from engine import EngineRunner, request, text_prompts

from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.gguf import convert_gguf
from turbine.engines.torch.runner import _Step
from turbine.models import default_real_model_path

CONFIGS = {"dequantized": 0, "4-bit": 8}  # name -> q4_max_rows; the first is the ratios' baseline
CONTEXT = 164


def forward_pairs(runners: dict[str, EngineRunner], prompts: list[list[int]], rounds: int) -> dict[str, Any]:
    """Per batch size: each configuration's forward times (ms), 20 steps a round."""
    out: dict[str, Any] = {}
    for batch in (1, 4, 8):
        times: dict[str, list[float]] = {name: [] for name in runners}
        steps = {}
        for name, runner in runners.items():
            executor: Any = runner.engine.executor()
            bs = executor.blocks.block_size
            per_seq = -(-(CONTEXT + 1) // bs)
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
            ps = prompts[:batch]
            executor._run(
                _Step(
                    [t for p in ps for t in (p * 4)[:CONTEXT]],
                    [i for _ in ps for i in range(CONTEXT)],
                    [(t, 0, CONTEXT) for t in tables],
                    [],
                    [],
                    [],
                )
            )
            model = executor.model
            meta = build_meta(
                [(t, CONTEXT, 1) for t in tables], bs, model.device, gather_decodes=True, dtype=model.dtype
            )
            steps[name] = (model, executor.kv_cache, meta, torch.tensor([p[0] for p in ps]))
        with torch.inference_mode():
            for _ in tqdm(range(rounds), desc=f"forward, {batch} rows", leave=False):
                for name, (model, cache, meta, ids) in steps.items():
                    pos = torch.full((batch,), CONTEXT)
                    model.forward(ids, pos, cache, meta)
                    for _ in range(20):
                        t0 = time.perf_counter()
                        model.forward(ids, pos, cache, meta)
                        times[name].append((time.perf_counter() - t0) * 1e3)
        out[f"forward_ms_{batch}_rows"] = {name: statistics.median(ts) for name, ts in times.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model_dir = convert_gguf(default_real_model_path(), progress=False)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = text_prompts(tokenizer, 32, 60, 32)
    runners: dict[str, EngineRunner] = {}
    for name, rows in CONFIGS.items():
        cfg = TorchEngineConfig(
            model_dir=model_dir,
            device="cpu",
            dtype="bfloat16",
            max_num_batched_tokens=2048,
            progress=False,
            q4_max_rows=rows,
        )
        runners[name] = EngineRunner(cfg, load_model(cfg))
        runners[name].run([request(p, 4) for p in text_prompts(tokenizer, 2, 40, 99)])  # warm up
    try:
        result = {"threads": torch.get_num_threads(), "rounds": args.rounds}
        result |= engine_pairs(runners, prompts, args.rounds)
        # Last: it writes KV straight into cache blocks, behind the engines' block managers.
        result |= forward_pairs(runners, prompts, args.rounds)
    finally:
        for runner in runners.values():
            runner.close()
    for key, value in result.items():
        if key.startswith("forward_ms"):
            print(f"{key}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in value.items()))
        elif key.startswith("engine_tok_s"):
            print(f"{key}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
        elif key.startswith("engine_ratio"):
            rounds = ", ".join(f"{x:.2f}" for x in value["per_round"])
            print(f"{key}: median {value['median']:.2f}x (rounds {rounds})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
