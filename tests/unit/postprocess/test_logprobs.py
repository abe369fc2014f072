"""Logprobs through the postprocessor: token strings, and which tokens each text delta reports
(held-back stop-string prefixes, characters split across tokens, cuts by a stop string, batching)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from turbine.models import bundled_model_path
from turbine.postprocess.logprobs import TokenLogprob, TokenStrings
from turbine.postprocess.postprocessor import Postprocessor, TextDelta
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.unit

ASCII = "Hello world, this is a test of the stop strings and logprobs."
EMOJI = "party 🎉 time: naïve café 日本語 😀👍🏽 done"


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))


def _ids(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


def _lp(i: int) -> float:
    """A distinct logprob per position, so each report can be traced to its token."""
    return -0.001 * (i + 1)


def _outputs(ids: list[int], sizes: list[int], k: int = 2) -> list[EngineOutput]:
    """`ids` cut into frames of the given sizes (the last carries the finish reason), with logprobs."""
    outs: list[EngineOutput] = []
    at = 0
    for n in sizes:
        chunk = ids[at : at + n]
        positions = range(at, at + len(chunk))
        outs.append(
            EngineOutput(
                token_ids=chunk,
                logprobs=[_lp(i) for i in positions],
                top_logprobs=[[(ids[i], _lp(i)), (7, _lp(i) - 1.0)][:k] for i in positions],
            )
        )
        at += n
    assert at == len(ids)
    last = outs[-1]
    outs[-1] = EngineOutput(
        token_ids=last.token_ids,
        finish_reason=FinishReason.LENGTH,
        logprobs=last.logprobs,
        top_logprobs=last.top_logprobs,
    )
    return outs


def _random_sizes(n: int, rng: random.Random) -> list[int]:
    sizes: list[int] = []
    while n:
        size = min(n, rng.randint(1, 4))
        sizes.append(size)
        n -= size
    return sizes


def _run(tok: Tokenizer, outs: list[EngineOutput], stops: list[str]) -> list[TextDelta]:
    post = Postprocessor(tok, stops)
    deltas: list[TextDelta] = []
    for out in outs:
        delta = post.process(out)
        deltas.append(delta)
        if delta.finish_reason is not None:
            break
    return deltas


def _reported(deltas: list[TextDelta]) -> list[TokenLogprob]:
    return [e for d in deltas for e in d.logprobs or []]


def test_token_strings_are_the_single_token_decode_and_raw_bytes(tiny: Tokenizer) -> None:
    strings = TokenStrings(tiny)
    for token_id in range(tiny.get_vocab_size()):
        text, raw = strings.get(token_id)
        assert text == tiny.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            assert raw == text.encode()
    # Raw bytes concatenate to the text even where characters span tokens.
    ids = _ids(tiny, EMOJI)
    assert any("\ufffd" in strings.get(i)[0] for i in ids)  # the case is exercised
    assert b"".join(strings.get(i)[1] for i in ids).decode() == EMOJI
    assert strings.get(2) == ("<|im_end|>", b"<|im_end|>")  # a special token: its literal content


@pytest.mark.parametrize("text", [ASCII, EMOJI])
@pytest.mark.parametrize("batching", ["one", "all", "random"])
def test_without_stops_each_delta_reports_exactly_the_tokens_of_its_text(
    tiny: Tokenizer, text: str, batching: str
) -> None:
    ids = _ids(tiny, text)
    sizes = {"one": [1] * len(ids), "all": [len(ids)], "random": _random_sizes(len(ids), random.Random(5))}
    deltas = _run(tiny, _outputs(ids, sizes[batching]), [])
    assert "".join(d.text for d in deltas) == text
    for delta in deltas:
        # A token goes out with the delta that emits its last byte, never before or after.
        assert delta.logprobs is not None
        assert b"".join(e.bytes for e in delta.logprobs) == delta.text.encode()
    reported = _reported(deltas)
    assert [e.logprob for e in reported] == [_lp(i) for i in range(len(ids))]
    for i, e in enumerate(reported):
        assert [t.logprob for t in e.top] == [_lp(i), _lp(i) - 1.0]
        assert e.top[0].token == e.token
        # The offset is where the token's text starts (a split character: where the character starts).
        prefix = b"".join(x.bytes for x in reported[:i]).decode(errors="ignore")
        assert e.offset == len(prefix)


def test_held_back_stop_prefix_delays_its_tokens_until_released(tiny: Tokenizer) -> None:
    text = "abc xyz abc xyw end"
    ids = _ids(tiny, text)
    deltas = _run(tiny, _outputs(ids, [1] * len(ids)), ["xyzz"])
    assert "".join(d.text for d in deltas) == text
    emitted = ""
    reported = ""
    for delta in deltas:
        emitted += delta.text
        reported += "".join(e.token for e in delta.logprobs or [])
        # Only tokens whose text went out are reported: the held "xyz" waits with its tokens.
        assert emitted.startswith(reported)
    assert reported == text
    assert len(_reported(deltas)) == len(ids)


@pytest.mark.parametrize("batching", ["one", "all"])
def test_stop_string_keeps_tokens_that_start_before_the_cut(tiny: Tokenizer, batching: str) -> None:
    ids = _ids(tiny, ASCII)
    sizes = [1] * len(ids) if batching == "one" else [len(ids)]
    deltas = _run(tiny, _outputs(ids, sizes), ["s is a"])
    assert deltas[-1].finish_reason == FinishReason.STOP
    content = "".join(d.text for d in deltas)
    assert content == "Hello world, thi"
    reported = _reported(deltas)
    strings = [e.token for e in reported]
    joined = "".join(strings)
    # Every emitted character is covered by a reported token, and each reported token starts before
    # the cut; tokens wholly inside or after the stop string are not reported.
    assert joined.startswith(content)
    assert len("".join(strings[:-1])) < len(content)
    assert [e.logprob for e in reported] == [_lp(i) for i in range(len(reported))]
    assert len(reported) < len(ids)


def test_stop_cut_on_a_token_boundary_reports_only_emitted_tokens(tiny: Tokenizer) -> None:
    ids = _ids(tiny, ASCII)
    pieces = [tiny.decode([i]) for i in ids]
    # A stop string that starts exactly where token 4 starts: tokens 0..3 are reported, no more.
    stop = "".join(pieces[4:6])
    deltas = _run(tiny, _outputs(ids, [1] * len(ids)), [stop])
    content = "".join(d.text for d in deltas)
    assert content == "".join(pieces[:4])
    assert [e.token for e in _reported(deltas)] == pieces[:4]


def test_outputs_without_logprobs_mid_stream_keep_text_and_skip_those_tokens(tiny: Tokenizer) -> None:
    ids = _ids(tiny, ASCII)
    outs = _outputs(ids, [3, 3, len(ids) - 6])
    outs[1] = EngineOutput(token_ids=outs[1].token_ids)  # e.g. continued on an engine without logprobs
    deltas = _run(tiny, outs, [])
    assert "".join(d.text for d in deltas) == ASCII
    reported = [e.logprob for e in _reported(deltas)]
    assert reported == [_lp(i) for i in range(len(ids)) if not 3 <= i < 6]


def test_no_logprobs_from_the_engine_means_none(tiny: Tokenizer) -> None:
    ids = _ids(tiny, ASCII)
    post = Postprocessor(tiny, ["zzz"])
    first = post.process(EngineOutput(token_ids=ids[:3]))
    last = post.process(EngineOutput(token_ids=ids[3:], finish_reason=FinishReason.LENGTH))
    assert first.logprobs is None and last.logprobs is None
    assert first.text + last.text == ASCII
