"""How long one scheduler step of the mocker takes.

The default coefficients are shaped like an 8B dense model (bf16, GQA with 8 KV heads) served by
vLLM on one H100, from first principles rather than a fit:

- prefill is compute-bound: ~16 GFLOP per token at a few hundred TFLOP/s ≈ 0.06 ms per token, plus
  attention, which grows with (new tokens × context) and so adds a small quadratic term;
- decode is memory-bound: each step streams the 16 GB of weights (≈ 5 ms at 3.35 TB/s, ~7 ms with
  launch and sampling overheads) plus every running sequence's KV cache (~128 KiB per context token).

Only the shape matters for the simulations this serves (prefix-cache hits make prefill cheaper, big
batches make decode slower); absolute numbers are scaled by `speedup_ratio`.
"""

from __future__ import annotations

from dataclasses import dataclass

from turbine.engines.core.scheduler import StepShape, attention_pairs

__all__ = ["StepShape", "TimingModel", "attention_pairs"]


@dataclass(frozen=True)
class TimingModel:
    """Coefficients of the step-time model; all times in milliseconds before `speedup_ratio`."""

    prefill_fixed_ms: float = 5.0
    """Fixed cost of a step that contains any prefill (launches, scheduling, sampling)."""
    prefill_per_token_ms: float = 0.06
    """Linear cost per uncached prompt token (the MLP and projections)."""
    prefill_per_attention_pair_ms: float = 1.3e-6
    """Attention cost per (query token, key token) pair: ~0.5 MFLOP across 32 layers of d=4096."""
    decode_base_ms: float = 7.0
    """Fixed cost of a step that decodes anything: one pass over the weights."""
    decode_per_seq_ms: float = 0.02
    """Per decoding sequence (sampling, bookkeeping, small GEMM growth)."""
    decode_per_context_token_ms: float = 4e-5
    """Per context token of every decoding sequence: reading ~128 KiB of KV at 3.35 TB/s."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"TimingModel.{name} must be >= 0, got {value}")

    def step_ms(self, shape: StepShape) -> float:
        """Unscaled duration of a step; prefill and decode parts add up in a mixed step."""
        ms = 0.0
        if shape.prefill_tokens:
            ms += (
                self.prefill_fixed_ms
                + self.prefill_per_token_ms * shape.prefill_tokens
                + self.prefill_per_attention_pair_ms * shape.prefill_attention_pairs
            )
        if shape.decode_seqs:
            ms += (
                self.decode_base_ms
                + self.decode_per_seq_ms * shape.decode_seqs
                + self.decode_per_context_token_ms * shape.decode_context_tokens
            )
        return ms

    def step_seconds(self, shape: StepShape, speedup_ratio: float = 1.0) -> float:
        """Wall-clock seconds the mocker sleeps for this step."""
        if speedup_ratio <= 0:
            raise ValueError(f"speedup_ratio must be positive, got {speedup_ratio}")
        return self.step_ms(shape) / 1000.0 / speedup_ratio
