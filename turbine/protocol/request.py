"""What the frontend sends a worker: a tokenized, validated request."""

from __future__ import annotations

import msgspec


class SamplingOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Sampling knobs passed through to the engine; `None` means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    # vLLM's extra: drop tokens below min_p × the most likely token's probability.
    min_p: float | None = None
    seed: int | None = None
    # Per-token log probabilities wanted back: None = none; k >= 0 = the sampled token's logprob
    # plus the k most likely alternatives (0..20, validated by the frontend).
    logprobs: int | None = None
    # Sample among the k most likely tokens only; None = no limit.
    top_k: int | None = None


class StopConditions(msgspec.Struct, frozen=True, omit_defaults=True):
    """When the engine must stop generating.

    `max_tokens` is always resolved by the frontend (never None on the wire). Stop *strings* are not
    here: they are applied by the frontend's postprocessor on detokenized text.
    """

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    # Extra token ids that end generation (user-supplied), on top of the model's EOS ids.
    stop_token_ids: tuple[int, ...] = ()


class PreprocessedRequest(msgspec.Struct, frozen=True):
    """A request after templating and tokenization, ready for any worker of `model`."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    # The model's end-of-sequence ids; ending on one yields finish_reason "stop" unless ignore_eos.
    eos_token_ids: tuple[int, ...] = ()
