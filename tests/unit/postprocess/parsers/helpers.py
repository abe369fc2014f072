"""Drive parsers the way a stream does: the same text in pieces of every size must parse the same."""

from __future__ import annotations

from collections.abc import Callable

from turbine.postprocess.parsers.base import ReasoningParser, ToolCall, ToolCallParser

STEPS = (None, 1, 2, 3, 7)


def _pieces(text: str, step: int | None) -> list[str]:
    if step is None:
        return [text]
    return [text[i : i + step] for i in range(0, len(text), step)]


def tool_run(
    make: Callable[[], ToolCallParser], text: str, step: int | None
) -> tuple[list[str], list[ToolCall]]:
    parser = make()
    content: list[str] = []
    calls: list[ToolCall] = []
    for piece in _pieces(text, step):
        out = parser.feed(piece)
        content.append(out.content)
        calls += out.calls
    out = parser.finish()
    content.append(out.content)
    calls += out.calls
    return content, calls


def parse_tools(
    make: Callable[[], ToolCallParser], text: str, *, never_shown: tuple[str, ...] = ()
) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) of `text`, checked to be the same for every piece size, with no
    streamed content piece showing any string of `never_shown` (a marker, or a prefix of one)."""
    results = set()
    for step in STEPS:
        content, calls = tool_run(make, text, step)
        for piece in content:
            for bad in never_shown:
                assert bad not in piece, (step, piece, bad)
        results.add(("".join(content), tuple((c.name, c.arguments) for c in calls)))
    assert len(results) == 1, results
    joined, calls_t = results.pop()
    return joined, list(calls_t)


def parse_reasoning(make: Callable[[], ReasoningParser], text: str) -> tuple[str, str]:
    """(reasoning, content) of `text`, checked to be the same for every piece size."""
    results = set()
    for step in STEPS:
        parser = make()
        reasoning, content = [], []
        for piece in _pieces(text, step):
            r, c = parser.feed(piece)
            reasoning.append(r)
            content.append(c)
        r, c = parser.finish()
        results.add(("".join(reasoning) + r, "".join(content) + c))
    assert len(results) == 1, results
    return results.pop()
