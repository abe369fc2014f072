"""Where a CPU decode step of the torch engine goes, at batch 8 (SmolLM2-135M from the bundled GGUF).

Measures, for one decode step of 8 sequences with ~160-token contexts (100-token prompts plus half of
128 new tokens):
- the step as the engine serves it: output tokens/s of 8 concurrent requests (100-token prompts, 128
  new tokens, greedy) and the mean time between a request's tokens;
- the executor's own work, timed apart: host metadata (`build_meta` and the step's tensors), the
  forward, logits + sampling;
- the forward under torch.profiler, its top-level operations grouped as matmuls (per weight shape),
  attention (KV write, gathers, SDPA), norms/RoPE/element-wise, embedding, plus the Python time
  between operations (the forward's wall time minus the operations' time).
The rest of an engine step (scheduler, delivery, the hop to the runner thread) is the engine's mean
step time minus the executor's, both measured during the engine run. Prints a table; `--json` also writes it.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_step.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from turbine.bench.engine import EngineRunner, request, text_prompts
from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.gguf import convert_gguf
from turbine.engines.torch.runner import _Step
from turbine.engines.torch.sampler import RowParams, sample
from turbine.models import default_real_model_path

PROMPT, NEW = 100, 128

_MATMUL = ("mkldnn::_linear_pointwise", "aten::linear", "aten::_weight_int4pack_mm_for_cpu", "aten::mm")
_ATTENTION = ("aten::index_select", "aten::index_copy_", "aten::scaled_dot_product_attention")


def category(name: str) -> str:
    if name in _MATMUL:
        return "matmul"
    if name in _ATTENTION:
        return "attention"
    if name == "aten::embedding":
        return "embedding"
    return "norms/RoPE/element-wise/views"


def best_ms(fn: Callable[[], object], n: int) -> float:
    """The fastest of `n` calls: on a shared machine the least disturbed one is the best estimate."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def profile_forward(fn: Callable[[], object]) -> tuple[dict[str, float], dict[str, float], float]:
    """Milliseconds per category and per matmul shape (top-level ops), and the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    reps = 5
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        wall = (time.perf_counter() - t0) / reps * 1e3
    cats: dict[str, float] = defaultdict(float)
    shapes: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.cpu_parent is not None:
            continue
        ms = ev.cpu_time_total / 1e3 / reps
        cat = category(ev.name)
        cats[cat] += ms
        if cat == "matmul" and ev.input_shapes:
            shapes[f"{ev.name.split('::')[-1]} {ev.input_shapes[0]}x{ev.input_shapes[1]}"] += ms
    return dict(cats), dict(shapes), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=8, help="concurrent sequences (default 8)")
    ap.add_argument("--no-engine", action="store_true", help="skip the end-to-end engine run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    batch = args.batch
    model_dir = convert_gguf(default_real_model_path(), progress=False)
    cfg = TorchEngineConfig(
        model_dir=model_dir, device="cpu", dtype=args.dtype, max_num_batched_tokens=2048, progress=False
    )
    loaded = load_model(cfg)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ps = [p[:PROMPT] for p in text_prompts(tokenizer, batch, 90, 8)]
    result: dict[str, Any] = {"dtype": args.dtype, "threads": torch.get_num_threads()}
    runner = EngineRunner(cfg, loaded)
    if not args.no_engine:
        runner.run([request(p, 4) for p in ps])  # warm-up
        executor: Any = runner.engine.executor()
        inner = executor._locked_run
        spent: list[float] = []

        def timed(step: _Step) -> object:
            t0 = time.perf_counter()
            try:
                return inner(step)
            finally:
                spent.append(time.perf_counter() - t0)

        executor._locked_run = timed
        wall, _ = runner.run([request(p, NEW) for p in ps])
        executor._locked_run = inner
        result["engine_tok_s"] = batch * NEW / wall
        result["engine_step_ms"] = wall / len(spent) * 1e3
        result["engine_executor_ms"] = sum(spent) / len(spent) * 1e3
        decode = sorted(spent[1:])  # the first step is the prefill
        result["engine_executor_decode_min_median_ms"] = [decode[0] * 1e3, decode[len(decode) // 2] * 1e3]
    executor = runner.engine.executor()
    model = loaded.model
    bs = cfg.block_size
    ctx = PROMPT + NEW // 2
    per_seq = -(-(ctx + 1) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    greedy = RowParams(temperature=0.0)
    # Fill the sequences' KV with a real prefill, then time decode steps at position `ctx`.
    prefill = _Step(
        [t for p in ps for t in (p * 2)[:ctx]],
        [i for _ in ps for i in range(ctx)],
        [(t, 0, ctx) for t in tables],
        [],
        [],
        [],
    )
    executor._run(prefill)
    step = _Step(
        [p[0] for p in ps],
        [ctx] * batch,
        [(t, ctx, 1) for t in tables],
        list(range(batch)),
        list(range(batch)),
        [greedy] * batch,
    )

    def host() -> tuple[Any, torch.Tensor, torch.Tensor]:
        meta = build_meta(step.chunks, bs, model.device, gather_decodes=True, dtype=model.dtype)
        ids = torch.tensor(step.input_ids, dtype=torch.long)
        pos = torch.tensor(step.positions, dtype=torch.long)
        return meta, ids, pos

    meta, ids, pos = host()

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        return model.forward(ids, pos, executor.kv_cache, meta)

    hidden = forward()

    @torch.inference_mode()
    def logits_and_sample() -> object:
        return sample(model.logits(hidden), step.params)

    @torch.inference_mode()
    def whole() -> object:
        return executor._run(step)

    n = 30
    result["host_meta_ms"] = best_ms(host, n)
    result["forward_ms"] = best_ms(forward, n)
    result["logits_sample_ms"] = best_ms(logits_and_sample, n)
    result["executor_step_ms"] = best_ms(whole, n)
    with torch.inference_mode():
        cats, shapes, wall = profile_forward(forward)
    result["profiled_forward_ms"] = wall
    result["forward_ops_ms"] = cats
    result["matmul_shapes_ms"] = shapes
    runner.close()

    print(f"dtype {args.dtype}, {torch.get_num_threads()} threads, batch {batch}, context {ctx}")
    if "engine_tok_s" in result:
        print(
            f"engine: {result['engine_tok_s']:.1f} tok/s; per step {result['engine_step_ms']:.1f} ms, "
            f"of which the executor {result['engine_executor_ms']:.1f} ms (the rest: scheduler, delivery, "
            "the hop to the runner thread)"
        )
        low, mid = result["engine_executor_decode_min_median_ms"]
        print(f"  executor's decode steps in that run: fastest {low:.1f} ms, median {mid:.1f} ms")
    for key in ("executor_step_ms", "host_meta_ms", "forward_ms", "logits_sample_ms", "profiled_forward_ms"):
        print(f"{key:>24}: {result[key]:7.2f}")
    ops = sum(cats.values())
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  forward {k:>30}: {v:7.2f} ms")
    print(f"  forward {'Python between ops':>30}: {wall - ops:7.2f} ms")
    for k, v in sorted(shapes.items(), key=lambda kv: -kv[1]):
        print(f"    {k:>44}: {v:7.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
