"""One choice's output parsing: reasoning first, then tool calls on the text that is not reasoning.

Calls get their OpenAI identity here: an `index` counting from 0 within the choice and an id in
the style the model's template accepts back (`call_…`; 9 alphanumerics for Mistral). A stream that
produced a call and stopped normally finishes with "tool_calls", as OpenAI's do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import tokenizers

from turbine.errors import ConfigError
from turbine.postprocess.parsers.base import ReasoningParser, ToolCallParser, ToolParse
from turbine.postprocess.parsers.registry import REASONING_FORMATS, TOOL_CALL_FORMATS, Tools, openai_call_id


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A complete call as the API reports it."""

    index: int
    id: str
    name: str
    arguments: str


class ParsedText(NamedTuple):
    content: str
    reasoning: str = ""
    calls: tuple[ToolCallDelta, ...] = ()


@dataclasses.dataclass(frozen=True)
class ParserSettings:
    """Which parsers a model's output goes through (None: none of that kind)."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_FORMATS:
            raise ConfigError(f"unknown tool-call parser {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_FORMATS:
            raise ConfigError(f"unknown reasoning parser {self.reasoning_parser!r}")

    def markers(self, with_tools: bool) -> tuple[str, ...]:
        out: tuple[str, ...] = ()
        if self.reasoning_parser is not None:
            out += REASONING_FORMATS[self.reasoning_parser].markers
        if with_tools and self.tool_call_parser is not None:
            out += TOOL_CALL_FORMATS[self.tool_call_parser].markers
        return out


class OutputParser:
    """Feed each text delta of one choice in order, then `finish` once at the end of the stream."""

    __slots__ = ("_call_id", "_calls", "_reasoning", "_tools")

    def __init__(
        self,
        reasoning: ReasoningParser | None,
        tools: ToolCallParser | None,
        call_id: Callable[[], str] = openai_call_id,
    ) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self._call_id = call_id
        self._calls = 0

    @property
    def called(self) -> bool:
        """Whether any tool call has been reported."""
        return self._calls > 0

    def _number(self, parses: Iterable[ToolParse], reasoning: str) -> ParsedText:
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        for parse in parses:
            content.append(parse.content)
            for call in parse.calls:
                calls.append(ToolCallDelta(self._calls, self._call_id(), call.name, call.arguments))
                self._calls += 1
        return ParsedText("".join(content), reasoning, tuple(calls))

    def feed(self, text: str) -> ParsedText:
        reasoning = ""
        if self._reasoning is not None:
            reasoning, text = self._reasoning.feed(text)
        if self._tools is None:
            return ParsedText(text, reasoning)
        parse = self._tools.feed(text)
        if not parse.calls:
            return ParsedText(parse.content, reasoning)
        return self._number([parse], reasoning)

    def finish(self) -> ParsedText:
        reasoning, text = "", ""
        if self._reasoning is not None:
            reasoning, text = self._reasoning.finish()
        if self._tools is None:
            return ParsedText(text, reasoning)
        return self._number([self._tools.feed(text), self._tools.finish()], reasoning)


def make_output_parser(settings: ParserSettings, tools: Tools | None) -> OutputParser | None:
    """The parser of one choice; `tools` None: the request does not take tool calls (no tools, or
    tool_choice "none"), so only reasoning is split off. None when there is nothing to parse."""
    reasoning = None
    if settings.reasoning_parser is not None:
        reasoning = REASONING_FORMATS[settings.reasoning_parser].make()
    tool_parser = None
    call_id = openai_call_id
    if tools is not None and settings.tool_call_parser is not None:
        tool_format = TOOL_CALL_FORMATS[settings.tool_call_parser]
        tool_parser, call_id = tool_format.make(tools), tool_format.call_id
    if reasoning is None and tool_parser is None:
        return None
    return OutputParser(reasoning, tool_parser, call_id)


def special_token_filter(
    tokenizer: tokenizers.Tokenizer, markers: tuple[str, ...]
) -> Callable[[str], str] | None:
    """When some of `markers` are special tokens of this tokenizer (Mistral's `[TOOL_CALLS]`, Llama's
    `<|python_tag|>`, Harmony's channels), detokenizing must keep special tokens or the parser never
    sees them; this returns the function that then removes every other special token's text (EOS
    and the like) from the deltas. None: the markers are ordinary text, skipping specials is right.

    Each special token decodes whole within one delta, so a per-delta removal cannot miss one split
    across deltas.
    """
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    kept = specials & set(markers)
    if not kept:
        return None
    dropped = sorted(specials - kept, key=len, reverse=True)
    if not dropped:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(s) for s in dropped))
    return lambda text: pattern.sub("", text)
