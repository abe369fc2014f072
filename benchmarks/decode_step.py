"""Where a batch-1 decode step of the torch engine spends its time, on CUDA (random-weight preset).

Measures, for one decode step:
- the whole step as a request sees it (engine loop, scheduler, runner-thread hop, forward, sampling,
  delivery), without and with the next step queued ahead (run-ahead);
- the CUDA-graph forward alone (host fill + replay + sync; the graph includes logits and argmax);
- the graph's GPU time (replays back to back, one sync);
- forward + sampling, logits alone, logits + sampling, an empty runner-thread round trip;
- the eager forward's kernels by GPU time (torch profiler).
Prints a table and writes it to `--out` as JSON.

    python3 benchmarks/decode_step.py --preset llama-1b --out /tmp/step.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from turbine.bench.engine import EngineRunner, prompts, request
from turbine.engines.torch.arch import read_arch
from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.engine import LoadedModel, TorchEngineConfig, sampling_defaults
from turbine.engines.torch.model import LlamaModel
from turbine.engines.torch.random_model import llama_config
from turbine.engines.torch.sampler import RowParams, sample


def per_call_us(fn: Any, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    config = llama_config(args.preset, torch_dtype="bfloat16")
    tmp = Path(f"/tmp/turbine-step-{args.preset}")
    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    arch = read_arch(tmp)
    from turbine.engines.torch.random_model import random_weights

    weights = random_weights(config, dtype=torch.bfloat16, device="cuda")
    model = LlamaModel(arch, weights, torch.device("cuda"))
    loaded = LoadedModel(model, arch, sampling_defaults(tmp), torch.device("cuda"))
    cfg = TorchEngineConfig(model_dir=tmp, device="cuda", dtype="bfloat16", block_size=64,
                            max_num_seqs=256, gpu_memory_utilization=0.5, progress=False)  # fmt: skip
    runner = EngineRunner(cfg, loaded)
    runner.run([request(p, 8) for p in prompts(1, 64, arch.vocab_size, 1)])
    new = 256
    executor: Any = runner.engine.executor()
    step_e2e = {}
    for ahead in (False, True):
        executor.run_ahead = ahead
        _, (arrivals,) = runner.run([request(p, new) for p in prompts(1, 512, arch.vocab_size, 2)])
        step_e2e[ahead] = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e6
    graphs = executor.graphs
    ids, pos, slots, tables = [5], [600], [600], [list(range(10))]

    def fwd_sync() -> None:
        graphs.run(ids, pos, slots, tables)
        torch.cuda.synchronize()

    fwd = per_call_us(fwd_sync)
    replay = per_call_us(graphs._graphs[1].graph.replay, 500)
    params = [RowParams(temperature=0.0)]

    def fwd_sample() -> None:
        hidden = graphs.run(ids, pos, slots, tables)
        sample(model.logits(hidden), params)

    fwd_and_sample = per_call_us(fwd_sample)
    hidden = graphs.run(ids, pos, slots, tables)
    logits_only = per_call_us(lambda: model.logits(hidden))
    sample_only = per_call_us(lambda: sample(model.logits(hidden), params))

    async def hops() -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(500):
            await loop.run_in_executor(executor._thread, int)
        return (time.perf_counter() - t0) / 500 * 1e6

    hop = runner.loop.run_until_complete(hops())
    # Eager forward kernels by GPU time.
    meta = build_meta([(tables[0], 600, 1)], 64, model.device, decode_kernel=True)
    with torch.inference_mode():
        it = torch.tensor(ids, device="cuda")
        pt = torch.tensor(pos, device="cuda")
        for _ in range(3):
            model.forward(it, pt, executor.kv_cache, meta)
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.forward(it, pt, executor.kv_cache, meta)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    result = {
        "preset": args.preset,
        "weight_bytes": model.weight_bytes(),
        "roofline_step_us": model.weight_bytes() / 4.8e12 * 1e6,
        "step_end_to_end_us": step_e2e[False],
        "step_end_to_end_run_ahead_us": step_e2e[True],
        "graph_forward_with_fill_and_sync_us": fwd,
        "graph_replay_gpu_us": replay,
        "forward_plus_sampling_us": fwd_and_sample,
        "logits_us": logits_only,
        "logits_plus_sample_us": sample_only,
        "runner_thread_round_trip_us": hop,
    }
    for k, v in result.items():
        print(f"{k:40s} {v:,.1f}" if isinstance(v, float) else f"{k:40s} {v}")
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result | {"kernels": table}, indent=1))
    runner.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
