"""What a worker streams back: token deltas and, at the end, a finish reason and usage."""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    # Set by the frontend (never by engines) when the output parsed into tool calls.
    TOOL_CALLS = "tool_calls"


class EngineOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    """One delta of a generation stream.

    `token_ids` may hold several tokens (engines and transports may coalesce steps). Exactly the last
    delta of a stream carries `finish_reason`; it also carries `cached_tokens`, the number of prompt
    tokens the engine served from its prefix cache.

    `logprobs` (when the request asked for them and the engine produces them) is aligned with
    `token_ids`: the log probability of each sampled token. `top_logprobs` then holds, per token, the
    `(token_id, logprob)` of the most likely alternatives, sorted by logprob descending (empty lists
    or None when 0 were asked). Engines that do not compute logprobs leave both None, and the API
    answers `logprobs: null`.
    """

    token_ids: list[int] = msgspec.field(default_factory=list)
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None
    error: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
