"""What a worker streams back: token deltas and, at the end, a finish reason and usage."""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class EngineOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    """One delta of a generation stream.

    `token_ids` may hold several tokens (engines and transports may coalesce steps). Exactly the last
    delta of a stream carries `finish_reason`; it also carries `cached_tokens`, the number of prompt
    tokens the engine served from its prefix cache.
    """

    token_ids: list[int] = msgspec.field(default_factory=list)
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None
    error: str | None = None
