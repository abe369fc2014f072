"""StopStringMatcher: hold back possible stop prefixes, cut at the first stop, never emit a stop."""

from __future__ import annotations

import random

import pytest

from turbine.postprocess.stop import StopResult, StopStringMatcher

pytestmark = pytest.mark.unit


def _run(stops: list[str], pieces: list[str]) -> tuple[list[StopResult], str]:
    """Feed `pieces` until a stop; return every result and the flushed tail."""
    matcher = StopStringMatcher(stops)
    results: list[StopResult] = []
    for piece in pieces:
        results.append(matcher.feed(piece))
        if results[-1].stopped:
            break
    return results, matcher.flush()


def _output(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    results, tail = _run(stops, pieces)
    stopped = any(r.stopped for r in results)
    return "".join(r.emit for r in results) + ("" if stopped else tail), stopped


def test_no_stops_is_pass_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == StopResult("abc", False)
    assert matcher.feed("") == StopResult("", False)
    assert matcher.flush() == ""
    assert matcher.matched is None


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopStringMatcher(["", ""])
    assert matcher.feed("abc") == StopResult("abc", False)


def test_text_without_stop_prefix_is_emitted_at_once() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello ") == StopResult("hello ", False)
    assert matcher.feed("") == StopResult("", False)


def test_possible_prefix_is_held_back_then_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello ST") == StopResult("hello ", False)
    assert matcher.feed("O") == StopResult("", False)
    # "STOX" can no longer become "STOP": all of it goes out.
    assert matcher.feed("X!") == StopResult("STOX!", False)
    assert matcher.flush() == ""


def test_held_back_text_is_flushed_at_end_of_stream() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("bye S") == StopResult("bye ", False)
    assert matcher.flush() == "S"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_stop_spanning_several_feeds() -> None:
    results, tail = _run(["<END>"], ["abc<", "E", "N", "D>", "never shown"])
    assert results == [
        StopResult("abc", False),
        StopResult("", False),
        StopResult("", False),
        StopResult("", True),
    ]
    assert tail == ""


def test_text_before_stop_in_the_same_piece_is_emitted_and_after_is_dropped() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("one\n") == StopResult("one", False)
    assert matcher.feed("\ntwo") == StopResult("", True)
    assert matcher.matched == "\n\n"
    assert matcher.stopped


def test_stop_at_the_very_start() -> None:
    matcher = StopStringMatcher(["Hi"])
    assert matcher.feed("Hi there") == StopResult("", True)


def test_feeds_after_a_stop_emit_nothing() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == StopResult("a", True)
    assert matcher.feed("more") == StopResult("", True)
    assert matcher.flush() == ""


def test_multiple_stops_earliest_match_wins() -> None:
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world") == StopResult("hel", True)
    assert matcher.matched == "lo"


def test_overlapping_stops() -> None:
    # "ab" and "bc" overlap in "abc": "ab" completes first.
    assert _output(["bc", "ab"], ["abc"]) == ("", True)
    # Stops sharing an ending: the longer one (starting earlier) is cut at.
    assert _output(["c", "abc"], ["xabc"]) == ("x", True)
    # A stop that contains another: the inner one completes first, whatever the chunking.
    assert _output(["xyz", "y"], ["xyzy"]) == ("x", True)
    assert _output(["xyz", "y"], list("xyzy")) == ("x", True)


def test_self_overlapping_stop() -> None:
    # "aab" inside "aaab": holding "aa" must not drop or duplicate the leading "a".
    results, _ = _run(["aab"], ["a", "a", "a", "b"])
    assert [r.emit for r in results] == ["", "", "a", ""]
    assert results[-1].stopped


def test_held_tail_matches_any_of_several_stops() -> None:
    matcher = StopStringMatcher(["</s>", "<|eot|>"])
    assert matcher.feed("x <|e") == StopResult("x ", False)
    assert matcher.feed("o") == StopResult("", False)
    assert matcher.feed("t|>") == StopResult("", True)
    assert matcher.matched == "<|eot|>"


def test_duplicate_stops() -> None:
    assert _output(["ab", "ab"], ["xab"]) == ("x", True)


@pytest.mark.parametrize("seed", range(30))
def test_result_does_not_depend_on_chunking(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "abc"
    stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet + "xy") for _ in range(rng.randint(0, 30)))
    # Reference: shortest prefix of the text that ends with a stop, minus that stop.
    expected: tuple[str, bool] = (text, False)
    for end in range(1, len(text) + 1):
        ends_here = [s for s in stops if text[:end].endswith(s)]
        if ends_here:
            expected = (text[: end - max(map(len, ends_here))], True)
            break
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert _output(stops, pieces) == expected
    assert _output(stops, list(text)) == expected
    assert _output(stops, [text]) == expected
