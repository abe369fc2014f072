"""What the torch engine does alone, measured in-process on the model a served benchmark runs: the
rates its "ideal" is computed from (`turbine bench serve`).

Both rates depend on the context, so each is measured at the lengths the workloads use: a prefill
of long prompts runs slower per token (attention grows with the context), and a decode step reads
every running sequence's KV cache, so at the same batch a step over 1,500-token contexts is slower
than one over 300-token contexts (on a 1B model on one H100 the KV read of 32 such sequences is
comparable to the weights).
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from turbine.bench.engine import EngineRunner


@dataclass
class EngineRates:
    prefill: dict[int, float]
    """Prefill tokens/s of prompts of each measured length."""
    decode: dict[tuple[int, int], float]
    """Decode tokens/s at (concurrency, prompt length): one step = batch / rate."""

    def prefill_tok_s(self, prompt_tokens: float) -> float:
        """Prefill tokens/s at this prompt length, interpolated between the measured lengths."""
        return _interpolate(self.prefill, prompt_tokens)

    def decode_tok_s(self, batch: int, prompt_tokens: float) -> float:
        """Decode tokens/s at this batch over prompts of this length (then `out` tokens each),
        interpolated between the measured lengths (a step's KV read is linear in the context)."""
        at = {length: rate for (c, length), rate in self.decode.items() if c == batch}
        return _interpolate(at, prompt_tokens)

    def step_s(self, batch: int, prompt_tokens: float) -> float:
        return batch / self.decode_tok_s(batch, prompt_tokens)

    def ideal_tok_s(self, concurrency: int, prompt_tokens: Sequence[int], out: int) -> float:
        """Closed loop: c prompts prefilled at the engine's rate for their lengths, then `out` decode
        steps at batch c over contexts of the prompts' mean length."""
        c = concurrency
        prefill_s = c * statistics.fmean(n / self.prefill_tok_s(n) for n in prompt_tokens)
        return c * out / (prefill_s + out * self.step_s(c, statistics.fmean(prompt_tokens)))

    def describe(self) -> str:
        prefill = ", ".join(f"{v:,.0f} tok/s at {n} tokens" for n, v in sorted(self.prefill.items()))
        decode = ", ".join(
            f"{v:,.0f} tok/s at c={c} over {n}-token prompts" for (c, n), v in sorted(self.decode.items())
        )
        return f"prefill {prefill}; decode {decode}"


def _interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear through `points`; flat beyond the first and last."""
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for lo, hi in itertools.pairwise(xs):
        if x <= hi:
            w = (x - lo) / (hi - lo)
            return points[lo] * (1 - w) + points[hi] * w
    return points[xs[-1]]


def spread(lengths: Iterable[float], within: float = 0.1) -> list[int]:
    """The distinct lengths worth measuring: sorted, one of each group closer than `within` of the
    one kept before it (a rate changes little over 10% of the context)."""
    kept: list[int] = []
    for n in sorted(round(x) for x in lengths):
        if not kept or n > kept[-1] * (1 + within):
            kept.append(n)
    return kept


def engine_rates(
    model_dir: Path,
    device: str,
    concurrencies: list[int],
    prefill_lengths: list[int],
    decode_lengths: list[int],
    out: int,
) -> EngineRates:
    """The engine alone on the same model: prefill tok/s of prompts of each of `prefill_lengths`
    tokens (lengths seen before: no first-use cost) and decode tok/s at each concurrency over prompts
    of each of `decode_lengths` tokens."""
    import torch

    from turbine.bench.engine import EngineRunner
    from turbine.engines.torch.engine import TorchEngineConfig, load_model

    cfg = TorchEngineConfig(
        model_dir=model_dir,
        device=device,
        load_format="dummy" if device == "cuda" else "auto",
        max_num_seqs=max(concurrencies),
        max_num_batched_tokens=8192 if device == "cuda" else 2048,
        gpu_memory_utilization=0.5,
        progress=False,
    )
    loaded = load_model(cfg)
    runner = EngineRunner(cfg, loaded)
    try:
        prefill = _prefill_rates(runner, loaded.arch.vocab_size, device, prefill_lengths)
        decode = _decode_rates(runner, loaded.arch.vocab_size, concurrencies, decode_lengths, out)
    finally:
        runner.close()
        del runner, loaded
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return EngineRates(prefill, decode)


def _prefill_rates(runner: EngineRunner, vocab: int, device: str, lengths: list[int]) -> dict[int, float]:
    from turbine.bench.engine import prompts, request

    batch = 16 if device == "cuda" else 2
    rates: dict[int, float] = {}
    for length in sorted(set(lengths)):
        runner.run([request(p, 1) for p in prompts(batch, length, vocab, 1)])  # warm-up
        # Best of three on a GPU, where one batch of prefills takes a fraction of a second.
        seeds = (2, 3, 4) if device == "cuda" else (2,)
        walls = [runner.run([request(p, 1) for p in prompts(batch, length, vocab, s)])[0] for s in seeds]
        rates[length] = batch * length / min(walls)
        print(f"engine alone: prefill {rates[length]:.0f} tok/s at {length} tokens", file=sys.stderr)
    return rates


def _decode_rates(
    runner: EngineRunner, vocab: int, concurrencies: list[int], lengths: list[int], out: int
) -> dict[tuple[int, int], float]:
    """Tokens/s from the moment every sequence has its first token to the last token."""
    from turbine.bench.engine import prompts, request

    rates: dict[tuple[int, int], float] = {}
    for c in concurrencies:
        runner.run([request(p, 4) for p in prompts(c, 32, vocab, 3 + c)])  # capture this batch
        for length in lengths:
            _, arrivals = runner.run([request(p, out) for p in prompts(c, length, vocab, 100 + c + length)])
            start = max(a[0] for a in arrivals)
            end = max(a[-1] for a in arrivals)
            decoded = sum(sum(1 for t in a[1:] if t > start) for a in arrivals)
            rates[c, length] = decoded / (end - start)
            rate = rates[c, length]
            print(f"engine alone: c={c} decode {rate:.0f} tok/s over {length}-token prompts", file=sys.stderr)
    return rates
