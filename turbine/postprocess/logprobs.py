"""Per-token logprobs carried alongside the text deltas: token strings, and which tokens go out when.

Token strings: each id is decoded on its own. With a byte-level tokenizer (GPT-2 style) a token's
`bytes` are its exact raw bytes, so the bytes of a sequence's tokens concatenate to the UTF-8 of its
text even where one character spans several tokens; such a token's own string is those bytes decoded
with errors="replace" (U+FFFD for the partial character), as `tokenizer.decode([id])` gives. Other
tokenizers: the string is `decode([id])` and `bytes` its UTF-8 (decoders that drop a leading space at
sequence start, as SentencePiece's do, then lose that space for the token).

Alignment (`LogprobAligner`): a token is reported with the delta that emits the last character of its
text, so a token whose text the stop-string matcher holds back waits with it. Tokens whose text is
incomplete on its own (part of a multi-byte character) wait for the token that completes it and go
out together, both with the character's start as their offset. When a stop string cuts the text, the
tokens whose text starts before the cut are reported (their text was at least partly emitted, so the
reported tokens cover every emitted character), and the tokens wholly inside or after the stop string
are not. Without a stop string, every generated token is reported exactly once, in order.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import tokenizers
from tokenizers import decoders

from turbine.postprocess.detokenizer import BYTE_DECODER

__all__ = ["LogprobAligner", "TokenLogprob", "TokenStrings", "TopLogprob"]


class TopLogprob(NamedTuple):
    token: str
    bytes: bytes
    logprob: float


class TokenLogprob(NamedTuple):
    """One generated token's logprob, as the API reports it."""

    token: str
    bytes: bytes
    logprob: float
    # The most likely alternatives, descending (empty when none were asked or the engine gave none).
    top: list[TopLogprob]
    # Character offset of the token's text in the choice's whole text (legacy `text_offset`).
    offset: int


class TokenStrings:
    """Token id → (string, bytes), decoded once per id (see the module docstring)."""

    __slots__ = ("_added", "_byte_level", "_cache", "_tokenizer")

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        # Added tokens (specials) are stored as their literal content, not in the byte alphabet.
        self._added = frozenset(tokenizer.get_added_tokens_decoder()) if self._byte_level else frozenset()
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._resolve(token_id)
        return hit

    def _resolve(self, token_id: int) -> tuple[str, bytes]:
        if self._byte_level and token_id not in self._added:
            piece = self._tokenizer.id_to_token(token_id)
            if piece is not None and all(c in BYTE_DECODER for c in piece):
                raw = bytes(BYTE_DECODER[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), raw
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode("utf-8")


class _Placed(NamedTuple):
    start: int
    end: int
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class LogprobAligner:
    """Tracks one sequence's tokens against its text: where each token's text lies in the
    detokenized stream, and which tokens the emitted text has fully covered. One per sequence."""

    __slots__ = ("_emitted", "_pending", "_produced", "_strings", "_unplaced")

    def __init__(self, strings: TokenStrings) -> None:
        self._strings = strings
        # Characters the detokenizer has produced so far, and how many of them were emitted.
        self._produced = 0
        self._emitted = 0
        # Tokens whose text has not appeared yet (an incomplete character, a skipped special token).
        self._unplaced: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        # Tokens with known text span, not yet reported; ordered by position.
        self._pending: deque[_Placed] = deque()

    def add(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None, text_chars: int
    ) -> None:
        """One token, in order, and the number of characters of text the detokenizer gave for it."""
        self._unplaced.append((token_id, logprob, top))
        if text_chars:
            self.place(text_chars)

    def place(self, text_chars: int) -> None:
        """`text_chars` more characters of text were produced: they belong to the unplaced tokens
        (also called with the detokenizer's final flush, even if it produced nothing)."""
        start = self._produced
        self._produced = end = start + text_chars
        for token_id, logprob, top in self._unplaced:
            self._pending.append(_Placed(start, end, token_id, logprob, top))
        self._unplaced.clear()

    def emit(self, text_chars: int) -> list[TokenLogprob]:
        """`text_chars` more characters went to the client: the tokens whose text now lies wholly
        within the emitted text, not reported before."""
        self._emitted = emitted = self._emitted + text_chars
        pending = self._pending
        out: list[TokenLogprob] = []
        while pending and pending[0].end <= emitted:
            self._report(pending.popleft(), out)
        return out

    def cut(self, text_chars: int) -> list[TokenLogprob]:
        """A stop string ended the text after `text_chars` more characters: the tokens whose text
        starts before the cut, not reported before; the rest are dropped."""
        self._emitted = cut = self._emitted + text_chars
        pending = self._pending
        out: list[TokenLogprob] = []
        while pending and pending[0].start < cut:
            self._report(pending.popleft(), out)
        pending.clear()
        self._unplaced.clear()
        return out

    def _report(self, placed: _Placed, out: list[TokenLogprob]) -> None:
        if placed.logprob is None:
            return  # the engine gave no logprob for it (a migrated stream's other engine, say)
        strings = self._strings.get
        token, raw = strings(placed.token_id)
        top = [TopLogprob(*strings(tid), lp) for tid, lp in placed.top or ()]
        out.append(TokenLogprob(token, raw, placed.logprob, top, placed.start))
