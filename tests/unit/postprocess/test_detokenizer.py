"""IncrementalDetokenizer: deltas concatenate to the full decode; split characters wait until whole."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models

from turbine.models import bundled_model_path
from turbine.postprocess.detokenizer import ByteLevelTable, IncrementalDetokenizer

pytestmark = pytest.mark.unit

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "🎉 party 🎉🎉",
    "日本語のテキストと中文文本",
    "mixed: naïve café — 😀👍🏽 Ελληνικά עברית",
    "\ufffd a literal replacement character",
]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))


Make = Callable[..., IncrementalDetokenizer]


@pytest.fixture(scope="module", params=["decode-stream", "byte-table"])
def make(request: pytest.FixtureRequest) -> Make:
    """Both paths of the detokenizer: tokenizers' DecodeStream, and the byte-level table."""
    if request.param == "decode-stream":
        return IncrementalDetokenizer

    def with_table(tok: Tokenizer, **kwargs: bool) -> IncrementalDetokenizer:
        table = ByteLevelTable.build(tok)
        assert table is not None
        return IncrementalDetokenizer(tok, table=table, **kwargs)

    return with_table


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> list[str]:
    return [detok.add(chunk) for chunk in chunks] + [detok.flush()]


def _ids(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = tok.encode(text, add_special_tokens=False).ids
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_equals_full_decode(tiny: Tokenizer, make: Make, text: str) -> None:
    ids = _ids(tiny, text)
    deltas = _stream(make(tiny), [[i] for i in ids])
    assert "".join(deltas) == tiny.decode(ids) == text
    # No delta ever shows half a character.
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text


def test_emoji_split_over_byte_tokens_waits_until_complete(tiny: Tokenizer, make: Make) -> None:
    ids = _ids(tiny, "🎉")
    assert len(ids) == 4  # one token per UTF-8 byte: the tiny vocabulary has no merge for it
    detok = make(tiny)
    assert [detok.add([i]) for i in ids] == ["", "", "", "🎉"]
    assert detok.flush() == ""


def test_cjk_split_over_byte_tokens(tiny: Tokenizer, make: Make) -> None:
    ids = _ids(tiny, "a語b")
    detok = make(tiny)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) == "a語b"
    assert "語" in deltas
    assert deltas.count("") == 2  # the first two of the character's three bytes


@pytest.mark.parametrize("seed", range(5))
def test_random_chunking_equals_full_decode(tiny: Tokenizer, make: Make, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(TEXTS) for _ in range(6))
    ids = _ids(tiny, text)
    chunks: list[list[int]] = []
    at = 0
    while at < len(ids):
        size = rng.randint(0, 5)
        chunks.append(ids[at : at + size])
        at += size
    assert "".join(_stream(make(tiny), chunks)) == text


def test_special_tokens_skipped_or_kept(tiny: Tokenizer, make: Make) -> None:
    ids = _ids(tiny, "<|im_start|>hi 🎉<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    skipped = make(tiny)
    assert "".join(_stream(skipped, [[i] for i in ids])) == "hi 🎉"
    kept = make(tiny, skip_special_tokens=False)
    assert "".join(_stream(kept, [[i] for i in ids])) == "<|im_start|>hi 🎉<|im_end|>"


def test_flush_writes_out_an_incomplete_character(tiny: Tokenizer, make: Make) -> None:
    ids = _ids(tiny, "ok 🎉")[:-2]  # cut the emoji after two of its four bytes
    detok = make(tiny)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) == "ok "
    tail = detok.flush()
    assert "".join(deltas) + tail == tiny.decode(ids)
    assert tail.endswith("\ufffd")
    assert detok.flush() == ""


def test_empty_add_and_empty_flush(tiny: Tokenizer, make: Make) -> None:
    detok = make(tiny)
    assert detok.add([]) == ""
    assert detok.flush() == ""


def _sentencepiece_like() -> Tokenizer:
    """A Llama-style tokenizer: `▁` for spaces, byte fallback, and a decoder that strips the first space."""
    vocab = {"<unk>": 0, "▁hello": 1, "▁world": 2, "!": 3}
    vocab |= {f"<0x{b:02X}>": 4 + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _bytes(text: str) -> list[int]:
    return [4 + b for b in text.encode("utf-8")]


def test_neighbour_dependent_decoder_keeps_inner_spaces() -> None:
    tok = _sentencepiece_like()
    ids = [1, 2, *_bytes("🎉"), 3, 1]
    expected = tok.decode(ids)
    assert expected == "hello world🎉! hello"
    deltas = _stream(IncrementalDetokenizer(tok), [[i] for i in ids])
    assert "".join(deltas) == expected
    assert deltas[:2] == ["hello", " world"]


def test_flush_in_context_keeps_the_leading_space_of_held_tokens() -> None:
    tok = _sentencepiece_like()
    # "▁world" arrives in one chunk with half an emoji, so it is held back with it; decoded alone at
    # flush, the decoder would strip its space as if it started the sequence.
    detok = IncrementalDetokenizer(tok)
    assert detok.add([1]) == "hello"
    assert detok.add([2, *_bytes("🎉")[:2]]) == ""
    assert detok.flush() == " world\ufffd\ufffd"
    assert tok.decode([1, 2, *_bytes("🎉")[:2]]) == "hello world\ufffd\ufffd"


def test_byte_table_is_only_built_for_byte_level_decoders() -> None:
    assert ByteLevelTable.build(_sentencepiece_like()) is None


@pytest.mark.parametrize("seed", range(20))
def test_byte_table_stream_of_random_ids_equals_full_decode(tiny: Tokenizer, seed: int) -> None:
    """Random ids make invalid UTF-8 (lone continuation bytes, cut sequences): the stream's U+FFFD
    replacements must be the ones `tokenizers` makes decoding the whole sequence."""
    rng = random.Random(seed)
    table = ByteLevelTable.build(tiny)
    assert table is not None
    ids = [rng.randrange(tiny.get_vocab_size()) for _ in range(40)]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tiny, skip_special_tokens=skip, table=table)
        cuts = sorted({0, len(ids), *rng.sample(range(1, len(ids)), 15)})
        chunks = [ids[a:b] for a, b in itertools.pairwise(cuts)]
        assert "".join(_stream(detok, chunks)) == tiny.decode(ids, skip_special_tokens=skip)
