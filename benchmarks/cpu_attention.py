"""CPU decode attention: one query row per head with `enable_gqa` against the query heads grouped
under their KV head (`attention._attend_gathered`), for SmolLM2-135M's shape (9 query heads, 3 KV
heads, head_dim 64), over batch sizes and context lengths, in one process, alternating.

Both are one `scaled_dot_product_attention` call over the same gathered K/V and additive mask; only
the query layout differs. Prints a markdown table (best of `--reps` per call, µs) and the largest
difference between the two outputs.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_attention.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

from cpu_step import best_ms

HEADS, KV_HEADS, DIM = 9, 3, 64


def best_us(fn: Callable[[], object], reps: int) -> float:
    return best_ms(fn, reps) * 1e3


def case(batch: int, ctx: int, dtype: torch.dtype, reps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    group = HEADS // KV_HEADS
    q = torch.randn(batch, HEADS, DIM, dtype=dtype)
    k = torch.randn(batch, KV_HEADS, ctx, DIM, dtype=dtype)
    v = torch.randn_like(k)
    # Ragged contexts, as a real batch has: every sequence but the first ends short of the padding.
    lens = torch.tensor([ctx - (i * 7) % max(ctx // 2, 1) for i in range(batch)])
    masked = torch.arange(ctx)[None, :] >= lens[:, None]
    mask = torch.zeros(masked.shape, dtype=dtype).masked_fill_(masked, float("-inf"))[:, None, None, :]
    scale = DIM**-0.5

    def per_head() -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return out.squeeze(2)

    def grouped() -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.view(batch, KV_HEADS, group, DIM), k, v, attn_mask=mask, scale=scale
        )
        return out.view(batch, HEADS, DIM)

    diff = (per_head().float() - grouped().float()).abs().max().item()
    a, b = [], []
    for _ in range(3):  # alternate, so a slow spell of the machine hits both
        a.append(best_us(per_head, reps))
        b.append(best_us(grouped, reps))
    return min(a), min(b), diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="64,164,512,1024")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cases = [
        (dtype, b, c)
        for dtype in (torch.bfloat16, torch.float32)
        for b in map(int, args.batches.split(","))
        for c in map(int, args.contexts.split(","))
    ]
    rows = []
    for dtype, b, c in tqdm(cases, desc="cases"):
        per_head, grouped, diff = case(b, c, dtype, args.reps)
        rows.append((str(dtype).removeprefix("torch."), b, c, per_head, grouped, diff))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; µs per layer call, best of runs\n")
    print("| dtype | batch | context | per head (enable_gqa) | grouped | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for dt, b, c, ph, gr, diff in rows:
        print(f"| {dt} | {b} | {c} | {ph:.0f} | {gr:.0f} | {ph / gr:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
