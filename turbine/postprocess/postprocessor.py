"""Engine deltas → text deltas: incremental detokenization, stop strings, finish reason."""

from __future__ import annotations

import time
from typing import NamedTuple

import tokenizers

from turbine.postprocess.detokenizer import IncrementalDetokenizer
from turbine.postprocess.stop import StopStringMatcher
from turbine.protocol.response import EngineOutput, FinishReason


class TextDelta(NamedTuple):
    text: str
    # Set on the last delta only.
    finish_reason: FinishReason | None


class Postprocessor:
    """One per request. Feed it every EngineOutput in order; stop when a delta has a finish reason.

    A stop string ends the request on the frontend's side (finish_reason "stop"); the caller then
    closes the engine stream, which cancels the rest of the generation at the worker.
    """

    __slots__ = ("_detok", "_stop", "cached_tokens", "completion_tokens", "first_token_at", "last_token_at")

    def __init__(self, tokenizer: tokenizers.Tokenizer, stop_strings: list[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._stop = StopStringMatcher(stop_strings) if stop_strings else None
        self.completion_tokens = 0
        self.cached_tokens = 0
        # perf_counter() when the first and the latest tokens arrived (for inter-token latency).
        self.first_token_at = 0.0
        self.last_token_at = 0.0

    def process(self, out: EngineOutput) -> TextDelta:
        if out.token_ids:
            now = time.perf_counter()
            if not self.completion_tokens:
                self.first_token_at = now
            self.last_token_at = now
        self.completion_tokens += len(out.token_ids)
        if out.cached_tokens is not None:
            self.cached_tokens = out.cached_tokens
        text = self._detok.add(out.token_ids) if out.token_ids else ""
        finish = out.finish_reason
        if finish is not None:
            text += self._detok.flush()
        if self._stop is not None:
            result = self._stop.feed(text)
            if result.stopped:
                return TextDelta(result.emit, FinishReason.STOP)
            text = result.emit
            if finish is not None:
                text += self._stop.flush()
        return TextDelta(text, finish)

    @property
    def inter_token_latency_s(self) -> float | None:
        """Mean time between tokens after the first; None with fewer than two tokens."""
        if self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)
