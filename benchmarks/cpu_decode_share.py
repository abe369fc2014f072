"""What the attention of a CPU decode step at batch 8 costs inside the real forward, and the bytes a
step moves (SmolLM2-135M from the bundled GGUF, bfloat16, its 4-bit weights on, as `turbine up` runs).

One decode step of 8 sequences at context 164 is timed in three variants, interleaved call by call so
that the machine's slow and fast phases hit all three alike:
- `real`: the forward as served (gather each layer's K/V blocks, one padded SDPA call per layer);
- `no gather`: K/V gathered once before timing and reused, as if the cache needed no gather;
- `no attention`: attention replaced by a copy of q (what the rest of the step costs).

Their differences are the gathers' and SDPA's shares of the step. The byte count next to them is what
one step reads and writes at the least: the 4-bit layer weights, lm_head, and the KV (each gathered
slot read from the cache, written to the gathered copy, and read by SDPA).

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/cpu_decode_share.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import turbine.engines.torch.attention as attention
from turbine.engines.torch.attention import GatheredDecode, build_meta
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.gguf import convert_gguf
from turbine.models import default_real_model_path

BATCH, CONTEXT = 8, 164

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, GatheredDecode, float], torch.Tensor]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="calls of each variant per round")
    args = ap.parse_args()
    model_dir = convert_gguf(default_real_model_path(), progress=False)
    cfg = TorchEngineConfig(model_dir=model_dir, device="cpu", dtype="bfloat16", progress=False)
    model = load_model(cfg).model
    bs = cfg.block_size
    per_seq = -(-(CONTEXT + 1) // bs)
    kv = model.new_kv_cache(BATCH * per_seq + 1, bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(BATCH)]
    meta = build_meta(
        [(t, CONTEXT, 1) for t in tables], bs, model.device, gather_decodes=True, dtype=model.dtype
    )
    ids = torch.arange(100, 100 + BATCH)
    pos = torch.full((BATCH,), CONTEXT)

    real: Attend = attention._attend_gathered
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def no_gather(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: GatheredDecode, scale: float
    ) -> torch.Tensor:
        if id(k_cache) not in gathered:
            n, width = g.blocks.shape
            heads, dim = k_cache.shape[-2:]
            flat, length = g.blocks.view(-1), width * k_cache.shape[1]
            gathered[id(k_cache)] = (
                k_cache.index_select(0, flat).view(n, length, heads, dim).transpose(1, 2),
                v_cache.index_select(0, flat).view(n, length, heads, dim).transpose(1, 2),
            )
        k, v = gathered[id(k_cache)]
        return attention._grouped_sdpa(q, k, v, g.mask, scale)

    def no_attention(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: GatheredDecode, scale: float
    ) -> torch.Tensor:
        return q.clone()

    @torch.inference_mode()
    def step() -> object:
        return model.logits(model.forward(ids, pos, kv, meta))

    variants: dict[str, Attend] = {"real": real, "no gather": no_gather, "no attention": no_attention}
    medians: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for fn in variants.values():  # warm-up, and the one-time gather of `no gather`
            setattr(attention, "_attend_gathered", fn)  # noqa: B010 (a module function, swapped)
            step()
        for _ in range(args.rounds):
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.steps):
                for name, fn in variants.items():
                    setattr(attention, "_attend_gathered", fn)  # noqa: B010 (a module function, swapped)
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                medians[name].append(statistics.median(ts) * 1e3)
    finally:
        setattr(attention, "_attend_gathered", real)  # noqa: B010

    width = -(-CONTEXT // bs) * bs  # slots gathered per sequence: whole blocks
    kv_bytes = BATCH * width * model.arch.num_kv_heads * model.arch.head_dim * 2 * 2 * model.arch.num_layers
    weight_mb = model.q4_bytes() / 1e6
    lm_head_mb = model.embed.numel() * model.embed.element_size() / 1e6
    threads = torch.get_num_threads()
    print(f"decode step, batch {BATCH}, context {CONTEXT}, {threads} threads; ms, median per round")
    for name, ms in medians.items():
        print(f"  {name:13s} " + "  ".join(f"{m:6.1f}" for m in ms))
    gather = [a - b for a, b in zip(medians["real"], medians["no gather"], strict=True)]
    sdpa = [a - b for a, b in zip(medians["no gather"], medians["no attention"], strict=True)]
    print("  gathers      " + "  ".join(f"{g:6.1f}" for g in gather))
    print("  SDPA         " + "  ".join(f"{s:6.1f}" for s in sdpa))
    total_mb = weight_mb + lm_head_mb + 3 * kv_bytes / 1e6
    print(
        f"bytes per step: 4-bit layer weights {weight_mb:.0f} MB, lm_head {lm_head_mb:.0f} MB, "
        f"KV {kv_bytes / 1e6:.0f} MB x 3 (read, gathered copy, read by SDPA): {total_mb:.0f} MB; "
        f"at the fastest real median that is {total_mb / min(medians['real']):.1f} GB/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
