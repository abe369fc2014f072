"""Engine deltas → text deltas: incremental detokenization, stop strings, finish reason."""

from __future__ import annotations

import time
from typing import NamedTuple

import tokenizers

from turbine.postprocess.detokenizer import ByteLevelTable, IncrementalDetokenizer
from turbine.postprocess.logprobs import LogprobAligner, TokenLogprob, TokenStrings
from turbine.postprocess.parsers.output import ToolCallDelta
from turbine.postprocess.stop import StopStringMatcher
from turbine.protocol.response import EngineOutput, FinishReason


class TextDelta(NamedTuple):
    text: str
    # Set on the last delta only.
    finish_reason: FinishReason | None
    # The logprobs of the tokens this delta completes (see `postprocess.logprobs` for which): None
    # when the engine sends none (not asked for, or not supported), else a list, possibly empty.
    logprobs: list[TokenLogprob] | None = None
    # Chat output through the model's parsers: the reasoning split off `text`, and tool calls
    # completed in this delta (`text` is then only the answer's content).
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class Postprocessor:
    """One per request. Feed it every EngineOutput in order; stop when a delta has a finish reason.

    A stop string ends the request on the frontend's side (finish_reason "stop"); the caller then
    closes the engine stream, which cancels the rest of the generation at the worker.
    """

    __slots__ = (
        "_detok",
        "_logprobs",
        "_stop",
        "_strings",
        "_tokenizer",
        "cached_tokens",
        "completion_tokens",
        "first_token_at",
        "last_token_at",
    )

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        stop_strings: list[str],
        token_strings: TokenStrings | None = None,
        skip_special_tokens: bool = True,
        byte_table: ByteLevelTable | None = None,
    ) -> None:
        """`token_strings`: the model's shared id → token string cache for logprobs (one per
        tokenizer, so every request reuses its decodings); built on demand when not given.
        `skip_special_tokens` False: special tokens stay in the text (for output parsers whose
        markers are special tokens). `byte_table`: the model's shared `ByteLevelTable`, for
        byte-level tokenizers (faster detokenization)."""
        self._tokenizer = tokenizer
        self._strings = token_strings
        self._detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip_special_tokens, table=byte_table
        )
        # Created by the first output that carries logprobs; the text-only path never touches it.
        self._logprobs: LogprobAligner | None = None
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
        if out.logprobs is not None or self._logprobs is not None:
            return self._process_with_logprobs(out)
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

    def _process_with_logprobs(self, out: EngineOutput) -> TextDelta:
        """`process` for a stream with logprobs: the same text, plus the tokens it completes."""
        aligner = self._logprobs
        if aligner is None:
            strings = self._strings if self._strings is not None else TokenStrings(self._tokenizer)
            aligner = self._logprobs = LogprobAligner(strings)
        logprobs, top = out.logprobs, out.top_logprobs
        pieces = []
        # One token at a time, so each token's text span is known (the detokenizer's output does not
        # depend on how ids are grouped).
        for i, token_id in enumerate(out.token_ids):
            piece = self._detok.add([token_id])
            pieces.append(piece)
            aligner.add(
                token_id,
                logprobs[i] if logprobs is not None and i < len(logprobs) else None,
                top[i] if top is not None and i < len(top) else None,
                len(piece),
            )
        text = "".join(pieces)
        finish = out.finish_reason
        if finish is not None:
            tail = self._detok.flush()
            aligner.place(len(tail))
            text += tail
        if self._stop is not None:
            result = self._stop.feed(text)
            if result.stopped:
                return TextDelta(result.emit, FinishReason.STOP, aligner.cut(len(result.emit)))
            text = result.emit
            if finish is not None:
                text += self._stop.flush()
        return TextDelta(text, finish, aligner.emit(len(text)))

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, or None (none given, or the text ended otherwise)."""
        return self._stop.matched if self._stop is not None else None

    @property
    def inter_token_latency_s(self) -> float | None:
        """Mean time between tokens after the first; None with fewer than two tokens."""
        if self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)
