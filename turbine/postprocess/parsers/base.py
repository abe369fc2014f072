"""The seams of output parsing: tool-call parsers and reasoning parsers, and their shared machinery.

Both kinds are incremental: `feed` takes the next piece of model text (pieces split anywhere, even
inside a marker) and returns what is safe to show now; `finish` ends the stream and returns the rest.
Text that might still become a marker is held back until it completes one or can no longer match, so
a stream never leaks partial markup. A tool call is reported only once it is complete and parses:
malformed calls come back as ordinary text (in order), never an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

__all__ = [
    "MarkedCalls",
    "ReasoningParse",
    "ReasoningParser",
    "ToolCall",
    "ToolCallParser",
    "ToolParse",
    "WholeOutputCalls",
    "arguments_text",
    "call_from_object",
    "find_first",
    "held_suffix",
    "json_values",
]


class ToolCall(NamedTuple):
    """One parsed call: the function's name and its arguments as a JSON object's text."""

    name: str
    arguments: str


class ToolParse(NamedTuple):
    """What a tool-call parser releases for one piece: plain content and the calls completed in it."""

    content: str
    calls: tuple[ToolCall, ...] = ()


class ToolCallParser(Protocol):
    """One per choice; not thread-safe. `feed` pieces in order, then `finish` once.

    The concatenation of every `content` is the model's text with the recognised calls cut out; the
    calls come in the order the model wrote them.
    """

    def feed(self, text: str) -> ToolParse: ...

    def finish(self) -> ToolParse: ...


class ReasoningParse(NamedTuple):
    """What a reasoning parser releases for one piece: reasoning text and answer (content) text."""

    reasoning: str
    content: str


class ReasoningParser(Protocol):
    """One per choice; not thread-safe. `feed` pieces in order, then `finish` once."""

    def feed(self, text: str) -> ReasoningParse: ...

    def finish(self) -> ReasoningParse: ...


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers`: the part that
    must be held back because the next piece may complete a marker."""
    best = 0
    for marker in markers:
        longest = min(len(marker) - 1, len(text))
        # Fast path (nearly every piece of ordinary text): the marker's first character does not
        # occur in the tail at all, so no end of the text can start the marker.
        start = text.find(marker[0], len(text) - longest)
        if start < 0:
            continue
        for size in range(len(text) - start, best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """(position, marker) of the earliest marker in `text`, or (-1, "")."""
    best, found = -1, ""
    for marker in markers:
        at = text.find(marker)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, marker
    return best, found


# A body between markers → its calls, or None when it does not parse (it is then kept as text).
BodyParser = Callable[[str], list[ToolCall] | None]


class MarkedCalls:
    """Calls written between a start marker and an end marker, anywhere in the text (Hermes, Qwen3
    Coder, DeepSeek) — or from a start marker to the end of the output when `end` is None (Mistral).

    Outside a call, text is released except a tail that may begin a start marker. Inside, the body is
    held until the end marker (or the end of the output), then parsed as a whole; a call cut off by
    the end of the output is parsed as well, since models often stop right after the last brace.
    """

    __slots__ = (
        "_after_call",
        "_body",
        "_buf",
        "_end",
        "_firsts",
        "_inside",
        "_opener",
        "_parse",
        "_scan",
        "_starts",
    )

    def __init__(self, starts: Sequence[str], end: str | None, parse: BodyParser) -> None:
        self._starts = tuple(starts)
        # Matches any character a start marker begins with: one C-level search per plain piece.
        self._firsts = re.compile("[" + re.escape("".join({m[0] for m in self._starts})) + "]")
        self._end = end
        self._parse = parse
        self._buf = ""
        self._inside = False
        self._opener = ""
        self._body = ""
        # Where in the body the end marker may start: earlier text was searched already, so a long
        # call streamed token by token costs linear time, not quadratic.
        self._scan = 0
        # Right after a call: whitespace is held, and dropped if another call or the end follows
        # (the newline between two calls is layout, not content).
        self._after_call = False

    def feed(self, text: str) -> ToolParse:
        if not self._inside and not self._buf and not self._after_call and self._firsts.search(text) is None:
            return ToolParse(text)  # the common case: plain text, nothing held
        content: list[str] = []
        calls: list[ToolCall] = []
        buf = self._buf + text
        while True:
            if not self._inside:
                if self._after_call:
                    rest = buf.lstrip()
                    if not rest or held_suffix(rest, self._starts) == len(rest):
                        break  # only whitespace (and maybe the start of a marker) so far
                    self._after_call = False
                    if find_first(rest, self._starts)[0] == 0:
                        buf = rest
                at, marker = find_first(buf, self._starts)
                if at < 0:
                    keep = held_suffix(buf, self._starts)
                    content.append(buf[: len(buf) - keep])
                    buf = buf[len(buf) - keep :]
                    break
                content.append(buf[:at])
                self._inside, self._opener, self._body, self._scan = True, marker, "", 0
                buf = buf[at + len(marker) :]
                continue
            self._body += buf
            buf = ""
            if self._end is None:
                break
            at = self._body.find(self._end, self._scan)
            if at < 0:
                self._scan = max(0, len(self._body) - len(self._end) + 1)
                break
            region, buf = self._body[:at], self._body[at + len(self._end) :]
            parsed = self._parse(region)
            if parsed is None:
                content.append(self._opener + region + self._end)
            else:
                calls += parsed
                self._after_call = True
            self._inside = False
        self._buf = buf
        return ToolParse("".join(content), tuple(calls))

    def finish(self) -> ToolParse:
        if not self._inside:
            rest, self._buf = self._buf, ""
            return ToolParse("" if self._after_call and rest.isspace() else rest)
        self._inside = False
        parsed = self._parse(self._body)
        if parsed is None:
            return ToolParse(self._opener + self._body)
        return ToolParse("", tuple(parsed))


class WholeOutputCalls:
    """Calls that make up the whole output, recognised by how it begins (Llama 3 JSON, pythonic).

    Leading whitespace is held until the first other character decides: an output that starts with
    one of `openers` is held to the end and parsed as a whole (kept as text if it does not parse);
    any other output streams through untouched.
    """

    __slots__ = ("_buf", "_held", "_mode", "_openers", "_parse")

    def __init__(self, openers: Sequence[str], parse: BodyParser) -> None:
        self._openers = tuple(openers)
        self._parse = parse
        self._buf = ""
        # The held output once it is known to be calls, in pieces (joined once, at the end).
        self._held: list[str] = []
        self._mode = "undecided"  # → "calls" (hold everything) or "text" (pass through)

    def feed(self, text: str) -> ToolParse:
        if self._mode == "text":
            return ToolParse(text)
        if self._mode == "calls":
            self._held.append(text)
            return ToolParse("")
        self._buf += text
        head = self._buf.lstrip()
        if not head:
            return ToolParse("")
        if any(head.startswith(o) for o in self._openers):
            self._mode = "calls"
            self._held.append(self._buf)
            self._buf = ""
            return ToolParse("")
        if any(o.startswith(head) for o in self._openers):
            return ToolParse("")  # still a possible opener: wait for more
        self._mode = "text"
        out, self._buf = self._buf, ""
        return ToolParse(out)

    def finish(self) -> ToolParse:
        out = self._buf + "".join(self._held)
        self._buf, self._held = "", []
        if self._mode != "calls":
            return ToolParse(out)
        parsed = self._parse(out)
        if parsed is None:
            return ToolParse(out)
        return ToolParse("", tuple(parsed))


def arguments_text(value: object) -> str | None:
    """A call's arguments as JSON object text: a dict is encoded; a string must already be a JSON
    object's text (some models quote it); None means no arguments. Anything else: None (malformed)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return None
        return json.dumps(decoded, ensure_ascii=False) if isinstance(decoded, dict) else None
    return None


def call_from_object(obj: object, argument_keys: Sequence[str] = ("arguments",)) -> ToolCall | None:
    """`{"name": ..., "<argument key>": {...}}` → a call; None if the object is not of that shape."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    if key is None:
        return ToolCall(name, "{}")
    args = arguments_text(obj[key])
    return None if args is None else ToolCall(name, args)


def json_values(text: str, separators: str = "") -> list[object] | None:
    """Every JSON value in `text`, one after another, separated by whitespace or any of
    `separators` (Llama 3 separates calls with ';'); None if anything else is in between."""
    decoder = json.JSONDecoder()
    values: list[object] = []
    at = 0
    skip = " \t\r\n" + separators
    while True:
        while at < len(text) and text[at] in skip:
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
