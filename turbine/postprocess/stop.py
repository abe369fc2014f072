"""Stop strings over streamed text: hold back what might be the start of one, cut at the first match.

Text arrives in arbitrary pieces (detokenizer deltas), and a stop string may span pieces, so text that
could still grow into a stop string is not emitted until it either completes one (and is dropped) or
can no longer match (and is released). The stop string itself is never emitted.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["StopResult", "StopStringMatcher"]


class StopResult(NamedTuple):
    """What `feed` decided for one piece of text."""

    # Text safe to send to the client now (may be "").
    emit: str
    # A stop string matched: `emit` is the last text of the stream; stop generating.
    stopped: bool


_NOT_STOPPED_EMPTY = StopResult("", False)
_STOPPED_EMPTY = StopResult("", True)


class StopStringMatcher:
    """Applies one request's stop strings to its text stream. One instance per sequence; not thread-safe.

    Empty stop strings are ignored (one would end every response before its first character).
    With no stop strings, `feed` returns its input at once.
    """

    __slots__ = ("_held", "_matched", "_max_hold", "_stops")

    def __init__(self, stops: list[str]) -> None:
        # Deduplicated (order kept) so each stop is searched once per feed.
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        # A held tail is a proper prefix of some stop, so never longer than the longest stop minus 1.
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None (no stop yet, or none matched)."""
        return self._matched

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    def feed(self, text: str) -> StopResult:
        """Take the next piece of text; return what can be emitted and whether a stop matched.

        After a stop has matched, every later `feed` returns `("", True)`: the text after a stop is
        never shown, even if the engine sends a few more tokens before it notices.
        """
        if not self._stops:
            return StopResult(text, False)
        if self._matched is not None:
            return _STOPPED_EMPTY
        if not text:
            return _NOT_STOPPED_EMPTY
        buffer = self._held + text

        # The match that *ends* first wins (ties: the one starting first), because that is the stop
        # generation would have hit first had the text come one character at a time; so the result does
        # not depend on how the text was cut into pieces. (Earliest start would: with stops "xyz" and
        # "y", "xyz…" fed whole would give "" but fed per character would give "x".)
        # The held tail contains no complete stop, so only matches involving the new text are found.
        best_at = best_end = -1
        best: str | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at == -1:
                continue
            end = at + len(stop)
            if best is None or end < best_end or (end == best_end and at < best_at):
                best, best_at, best_end = stop, at, end
        if best is not None:
            self._matched = best
            self._held = ""
            return StopResult(buffer[:best_at], True)

        hold = self._held_tail_length(buffer)
        if hold == 0:
            self._held = ""
            return StopResult(buffer, False)
        self._held = buffer[-hold:]
        return StopResult(buffer[:-hold], False)

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text (which turned out not to be a stop)."""
        held, self._held = self._held, ""
        return held

    def _held_tail_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        for length in range(min(self._max_hold, len(buffer)), 0, -1):
            tail = buffer[-length:]
            for stop in self._stops:
                if stop.startswith(tail):
                    return length
        return 0
