"""The tokenizer's cheap lower bound on token counts (`min_tokens`), when it exists, and its cache's
bound in bytes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import tokenizers

from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import Tokenizer, load_model_files, utf8_length

pytestmark = pytest.mark.unit


def _bundled_spec() -> dict[str, object]:
    spec: dict[str, object] = json.loads((bundled_model_path() / "tokenizer.json").read_text())
    return spec


def _tokenizer(spec: dict[str, object], **kwargs: Any) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), **kwargs)


def test_bundled_byte_level_bpe_has_a_bound_that_holds() -> None:
    tok = Tokenizer(load_model_files(bundled_model_path()).tokenizer)
    assert tok.max_bytes_per_token == 32  # its longest vocabulary entry: 32 dashes
    rng = random.Random(3)
    alphabet = ["-", " ", "\n", "a", "é", "日", "🚀", "<|im_start|>", "<|im_end|>", "0", "word", "\t", "ĠĠ"]
    samples = ["", "-" * 10_000, " " * 5000, "🚀" * 300, "<|im_start|>" * 50]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000))) for _ in range(200)]
    for text in samples:
        ids = tok.encode(text)
        assert tok.min_tokens(text) <= len(ids), text[:80]
    # Long runs of one character are the tightest case: the bound is reached.
    assert tok.min_tokens("-" * 3200) == len(tok.encode("-" * 3200)) == 100
    assert utf8_length("aé🚀") == 1 + 2 + 4


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.__setitem__("normalizer", {"type": "NFC"}),
        lambda s: s.__setitem__("pre_tokenizer", {"type": "Whitespace"}),
        lambda s: s["added_tokens"][1].__setitem__("lstrip", True),
        lambda s: s.__setitem__(
            "model", {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}
        ),
    ],
    ids=["normalizer", "lossy pre-tokenizer", "added token strips whitespace", "byte missing from vocab"],
)
def test_no_bound_where_it_cannot_be_proved(change: object) -> None:
    spec = _bundled_spec()
    change(spec)  # type: ignore[operator]
    tok = _tokenizer(spec)
    assert tok.max_bytes_per_token is None
    assert tok.min_tokens("x" * 100_000) == 0


def test_cache_is_bounded_in_bytes_and_skips_huge_pieces() -> None:
    tok = Tokenizer(
        load_model_files(bundled_model_path()).tokenizer, cache_entries=1000, cache_max_bytes=1 << 20
    )
    pieces = [f"<|im_start|>{i} " + "lorem ipsum dolor " * 200 for i in range(200)]
    for text in pieces:
        tok.encode(text)
    assert 0 < tok.cache_bytes <= 1 << 20
    assert tok.encode(pieces[-1]) == tok.encode(pieces[-1]) and tok.cache_hits >= 1
    before = tok.cache_bytes
    huge = "<|im_start|>" + "sit amet " * 40_000  # costs more than an eighth of the bound
    assert tok.encode(huge) == tok.hf.encode(huge, add_special_tokens=False).ids
    assert tok.cache_bytes == before
