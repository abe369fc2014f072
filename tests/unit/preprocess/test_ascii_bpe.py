"""The fast ASCII path of the tokenizer gives exactly `tokenizers`' ids, and stays off where it can't."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import tokenizers

from turbine.bench.workloads import EnglishText
from turbine.models import bundled_model_path
from turbine.preprocess import ascii_bpe
from turbine.preprocess.ascii_bpe import AsciiBpe, ascii_pattern
from turbine.preprocess.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((bundled_model_path() / "tokenizer.json").read_text())
    return spec


def _split_spec(pattern: str, normalizer: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = _spec()
    spec["normalizer"] = normalizer
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    return spec


def _hf(spec: dict[str, Any]) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


def _texts(seed: int) -> list[str]:
    """ASCII texts built to hit every branch of the split patterns, plus English-like prose and a
    few non-ASCII ones (which must take `tokenizers`' own path)."""
    rng = random.Random(seed)
    parts = [
        *(chr(c) for c in range(128)), "'s", "'S", "'ll", "'LL", "'re", "'d", " '", "  ", "\n\n", "\r\n",
        " \t ", "word", " Word", "WORD", "123", "12345678", " 42", "...", "!!", " --", "x_y", "a1b2",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "|>",
    ]  # fmt: skip
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    english = EnglishText(seed, vocabulary=2000)
    texts += [english.text(rng, rng.randint(1, 200)) for _ in range(50)]
    texts += ["naïve café", "日本語 text", "emoji 🚀 ok", "tab\tthen ünïcödé"]
    return texts


@pytest.mark.parametrize(
    "spec",
    [
        _spec(),
        _split_spec(LLAMA3_SPLIT),
        _split_spec(QWEN2_SPLIT, {"type": "NFC"}),
    ],
    ids=["gpt2 byte-level", "llama3 split", "qwen2 split with NFC"],
)
@pytest.mark.parametrize("cache_entries", [0, 4])
def test_same_ids_as_tokenizers(spec: dict[str, Any], cache_entries: int) -> None:
    hf = _hf(spec)
    assert AsciiBpe.build(hf) is not None
    tok = Tokenizer(hf, cache_entries=cache_entries)
    for text in _texts(7):
        expected = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expected, repr(text[:120])
        assert tok.encode(text) == expected  # again, now from the word cache


def test_long_pieces_through_the_prefix_cache_agree_too() -> None:
    hf = _hf(_spec())
    tok = Tokenizer(hf, cache_entries=8)
    rng = random.Random(1)
    system = EnglishText(1).text(rng, 400)  # over CACHE_MIN_CHARS
    for _ in range(5):
        text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{EnglishText(2).text(rng, 30)}"
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert tok.cache_hits >= 4


def test_word_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ascii_bpe, "_MAX_WORDS", 50)
    hf = _hf(_spec())
    fast = AsciiBpe.build(hf)
    assert fast is not None
    text = EnglishText(3, vocabulary=3000).text(random.Random(3), 2000)
    assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert len(fast._words) <= 50


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.__setitem__("normalizer", {"type": "Lowercase"}),
        lambda s: s.__setitem__("pre_tokenizer", {"type": "Whitespace"}),
        lambda s: s["pre_tokenizer"].__setitem__("add_prefix_space", True),
        lambda s: s["model"].__setitem__("dropout", 0.5),
        lambda s: s.update(_split_spec(r"\p{Lu}+|\s+|[^\s]+")),
        lambda s: s.update(_split_spec(r"\w+|\s+")),
        lambda s: s.__setitem__(
            "truncation", {"direction": "Right", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
        ),
    ],
    ids=[
        "lowercasing",
        "whitespace split",
        "prefix space",
        "dropout",
        "other unicode class",
        "\\w",
        "truncation",
    ],
)
def test_off_where_it_cannot_be_shown_exact(change: Any) -> None:
    spec = _spec()
    change(spec)
    hf = _hf(spec)
    assert AsciiBpe.build(hf) is None
    if spec["model"].get("dropout"):
        return  # `tokenizers` itself is random then
    tok = Tokenizer(hf)
    for text in _texts(11)[:50]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_off_when_added_tokens_cannot_be_split_out() -> None:
    spec = _spec()
    spec["added_tokens"][1]["lstrip"] = True  # the token swallows the whitespace before it
    hf = _hf(spec)
    tok = Tokenizer(hf)
    assert tok._fast is None
    text = "hello   <|im_start|>user\nhi"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_pattern_translation() -> None:
    pattern = ascii_pattern(r" ?\p{L}+|\p{N}{1,3}|[^\s\p{L}\p{N}]+|\s+(?!\S)")
    assert pattern is not None
    # A lone space before a digit, or a tab before \x1c (not White_Space, unlike Python's \s), is
    # matched by no alternative here.
    assert pattern.findall("ab 12345 x!!\t\x1c  y") == ["ab", "123", "45", " x", "!!", "\x1c", " ", " y"]
    assert ascii_pattern(r"\p{Lu}") is None
    assert ascii_pattern(r"[\S]") is None
    assert ascii_pattern(r"\bword") is None


def test_english_text_is_deterministic_varied_and_large() -> None:
    """The benchmark prompt material: a seed fixes the vocabulary and the texts, texts differ."""
    english = EnglishText(0)
    assert len(english.words) == len(set(english.words)) == 30_000
    texts = [english.text(random.Random(1), 150) for _ in range(2)]
    assert texts[0] == texts[1] and texts[0].isascii()
    rng = random.Random(2)
    many = [english.text(rng, 150) for _ in range(200)]
    assert len(set(many)) == 200
    assert all(len(t.split()) >= 150 for t in many)
