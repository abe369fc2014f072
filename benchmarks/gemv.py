"""Batch-1 matmuls of a decode step on CUDA: cuBLAS (`F.linear`) against our Triton GEMV, per shape.

Each weight shape of a Llama-architecture model is timed as a decode step meets it: weights cold
in L2 (the step cycles through copies whose total is well past the L2 size) and calls back to back
inside a CUDA graph (so launch gaps count as they do in the engine's graphs). For each shape it
sweeps the GEMV's block sizes, warps and pipeline stages and reports the best against cuBLAS, in
GB/s of weights read. Each shape runs the GEMV variant the batch-1 forward uses, against cuBLAS plus
the separate kernels the batched forward runs around it: q/k/v and gate/up with the RMSNorm before
(gate/up also with SiLU·up after), o_proj and down with the residual add (an add kernel in the
baseline, which is a little generous to it: the batched forward folds that add into its next norm),
lm_head with float32 out.

    python3 benchmarks/gemv.py --preset llama-1b --out /tmp/gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))

from turbine.engines.torch.random_model import llama_config
from turbine.engines.torch.triton_gemv import GemvConfig, gemv
from turbine.engines.torch.triton_ops import rms_norm, silu_mul

COLD_BYTES = 1 << 30  # cycle through this many bytes of weight copies: 20x an H200's L2


def shapes(preset: str) -> list[tuple[str, int, int]]:
    c = llama_config(preset, torch_dtype="bfloat16")
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    dim = c.get("head_dim", hidden // heads)
    return [
        ("qkv", (heads + 2 * kv) * dim, hidden),
        ("o_proj", hidden, heads * dim),
        ("gate_up", 2 * inter, hidden),
        ("down", hidden, inter),
        ("lm_head", c["vocab_size"], hidden),
    ]


def time_graph(fn: Callable[[torch.Tensor], Any], weights: list[torch.Tensor], reps: int = 5) -> float:
    """Microseconds per call, calls over all `weights` back to back in one CUDA graph."""
    stream: Any = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    torch.cuda.synchronize()
    start: Any = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end: Any = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us: float = start.elapsed_time(end) * 1000 / (reps * len(weights))
    return us


def bench_shape(name: str, n: int, k: int, grid: Iterable[tuple[int, int, int, int]]) -> dict[str, Any]:
    dev = torch.device("cuda")
    nbytes = n * k * 2
    copies = max(2, math.ceil(COLD_BYTES / nbytes))
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    norm = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5
    fused = name == "gate_up"
    normed = name in ("qkv", "gate_up")
    adds = name in ("o_proj", "down")
    out_dtype = torch.float32 if name == "lm_head" else torch.bfloat16
    rows = n // 2 if fused else n
    stream = torch.zeros(1, rows, device=dev, dtype=torch.bfloat16)

    def base(w: torch.Tensor) -> torch.Tensor:
        """What the batched forward runs around this matmul (cuBLAS plus the separate kernels)."""
        h = rms_norm(x, norm, 1e-5) if normed else x
        y = F.linear(h, w)
        if fused:
            return silu_mul(y)
        if adds:
            return stream.add_(y)  # the batched forward folds this add into the next norm's kernel
        return y.float() if name == "lm_head" else y

    ref = base(weights[0]).float()
    cublas_us = time_graph(base, weights)
    results: list[dict[str, Any]] = []
    for bn, bk, nw, ns in grid:
        if rows % bn or k % bk:
            continue
        cfg = GemvConfig(bn, bk, nw, ns)

        def ours(w: torch.Tensor, cfg: GemvConfig = cfg) -> torch.Tensor:
            return gemv(
                x,
                w,
                norm=norm if normed else None,
                eps=1e-5,
                silu_mul=fused,
                residual=stream if adds else None,
                out_dtype=out_dtype,
                config=cfg,
            )

        err = 0.0 if adds else (ours(weights[0]).float() - ref).abs().max().item()
        results.append({"config": vars(cfg), "us": time_graph(ours, weights), "max_abs_err": err})
    results.sort(key=lambda r: r["us"])
    best = results[0]
    return {
        "n": n,
        "k": k,
        "weight_mb": nbytes / 1e6,
        "cublas_us": cublas_us,
        "cublas_gb_s": nbytes / cublas_us / 1e3,
        "best": best,
        "best_gb_s": nbytes / best["us"] / 1e3,
        "speedup": cublas_us / best["us"],
        "top5": results[:5],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="a small sweep")
    args = ap.parse_args()
    block_ns = [1, 2, 4] if not args.quick else [1, 2]
    block_ks = [512, 1024, 2048]
    warps = [2, 4, 8]
    stages = [1, 3]
    report: dict[str, Any] = {"preset": args.preset, "gpu": torch.cuda.get_device_name(), "shapes": {}}
    for name, n, k in shapes(args.preset):
        entry = bench_shape(name, n, k, itertools.product(block_ns, block_ks, warps, stages))
        report["shapes"][name] = entry
        best = entry["best"]
        print(
            f"{name:8s} [{n}x{k}] cuBLAS {entry['cublas_us']:7.1f} us ({entry['cublas_gb_s']:6.0f} GB/s)  "
            f"GEMV {best['us']:7.1f} us ({entry['best_gb_s']:6.0f} GB/s) {best['config']} "
            f"err {best['max_abs_err']:.2e}",
            flush=True,
        )
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
