"""Would keeping the GGUF's 4-bit weights make a CPU decode step cheaper? Kernels measured alone.

SmolLM2-135M's layer weights are Q4_1: per block of 32 weights an fp16 scale d and min m, w = d·q + m
with q in 0..15. torch's CPU weight-only kernels compute w = (q − 8)·scale + zero per group, so Q4_1
maps onto them with scale = d, zero = m + 8·d (the engine's `q4.py`, used for steps of at most
`--q4-max-rows` rows). This script
- checks that mapping on the real file: one layer's raw Q4_1 blocks, decoded by `q4.py` and packed for
  `_weight_int4pack_mm_for_cpu`, against a matmul with `gguf`'s own dequantization of the same tensor;
- times the 120 layer matmuls of one decode step (weights cold: every layer's own tensors, in the
  forward's order) at 1, 4 and 8 rows: oneDNN-packed bfloat16 (the engine's dense path), the int4
  kernel (group 32, bfloat16 activations), and `_weight_int8pack_mm` (per-channel int8, for scale; it cannot
  hold Q4_1 exactly); best of several rounds, interleaved, as the machine is shared.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_weights.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from turbine.engines.torch import q4
from turbine.models import default_real_model_path

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # qkv, o, gate_up, down of one layer
LAYERS = 30
GROUP = q4.GROUP


def check_mapping() -> float:
    """Largest |difference| of the int4 kernel (bfloat16, as the engine runs it, `q4.py`) from a
    float32 matmul with gguf's dequantized weight, over the largest |output|."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(default_real_model_path()))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    cols, rows = (int(x) for x in tensor.shape.tolist())
    blocks = q4.decode(tensor.data, tensor.tensor_type.name, rows, cols)
    w = torch.from_numpy(np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)).reshape(
        rows, cols
    )
    assert torch.equal(q4.dequantize(blocks), w), "Q4_1 decoding differs from gguf's"
    x = torch.randn(8, cols)
    y = q4.Q4Weight(blocks, torch.bfloat16)(x.to(torch.bfloat16)).float()
    ref = x @ w.T
    return float((y - ref).abs().max() / ref.abs().max())


def random_q4(rows: int, cols: int) -> q4.Q4Weight:
    nibbles = torch.randint(0, 256, (rows, cols // GROUP, 16), dtype=torch.uint8)
    d, m = torch.rand(rows, cols // GROUP) * 0.01, -torch.rand(rows, cols // GROUP) * 0.1
    return q4.Q4Weight((nibbles, d, m + 8 * d), torch.bfloat16)


def run_bf16(ins: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        for a, w in zip(ins, weights, strict=True)
    ]


def run_int4(ins: list[torch.Tensor], weights: list[q4.Q4Weight]) -> list[torch.Tensor]:
    return [w(a) for a, w in zip(ins, weights, strict=True)]


def run_int8(ins: list[torch.Tensor], weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.ops.aten._weight_int8pack_mm(a, w, s) for a, (w, s) in zip(ins, weights, strict=True)]


def best_ms(fn: Callable[[], object], n: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"Q4_1 -> int4 kernel (scale d, zero m + 8d), relative max error: {check_mapping():.1e}")
    torch.manual_seed(0)
    shapes = [s for _ in range(LAYERS) for s in SHAPES]
    bf16: list[torch.Tensor] = []
    int4: list[q4.Q4Weight] = []
    int8: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols) * 0.02
        bf16.append(torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), 8))
        int4.append(random_q4(rows, cols))
        int8.append((torch.randint(-128, 128, (rows, cols), dtype=torch.int8), torch.rand(rows).bfloat16()))
    mb = {
        "bf16 packed": sum(r * c * 2 for r, c in shapes) / 1e6,
        "int4 g32": sum(r * c // 2 + r * c // GROUP * 4 for r, c in shapes) / 1e6,
        "int8": sum(r * c + r * 2 for r, c in shapes) / 1e6,
    }
    print(f"weight MB read per step (layers): {', '.join(f'{k} {v:.0f}' for k, v in mb.items())}")
    for batch in (1, 4, 8):
        x = {c: torch.randn(batch, c).to(torch.bfloat16) for c in (576, 1536)}
        ins = [x[c] for _, c in shapes]
        runs: dict[str, Callable[[], object]] = {
            "bf16 packed": partial(run_bf16, ins, bf16),
            "int4 g32": partial(run_int4, ins, int4),
            "int8": partial(run_int8, ins, int8),
        }
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                best[name] = min(best.get(name, float("inf")), best_ms(fn))
        print(
            f"{batch} rows, 120 matmuls: "
            + ", ".join(f"{k} {v:.1f} ms ({mb[k] / v:.0f} GB/s)" for k, v in best.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
