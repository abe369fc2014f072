"""A faster, exact path for byte-level BPE on ASCII text: pre-tokenize with Python's `re`, then look each
word's ids up in a cache, asking `tokenizers` only for words it has not seen.

Why: `tokenizers` spends most of an encode in its pre-tokenizer regex (oniguruma with Unicode
classes), and a Python frontend pays that on every chat prompt. On ASCII
text the Unicode classes (`\\p{L}`, `\\p{N}`, `\\s`) reduce to small ASCII sets, which `re` matches
several times faster; the BPE of a word does not depend on its neighbours, so a word seen before costs a
dictionary lookup.

Exactness: only tokenizers whose pipeline is understood are accepted (BPE without dropout, no
normalizer or a Unicode one — the identity on ASCII —, a byte-level pre-tokenizer with the GPT-2 regex or
a `Split` regex followed by a regex-less byte-level step), and every accepted one must reproduce
`tokenizers`' ids on a probe corpus at construction. Non-ASCII text is left to `tokenizers`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import tokenizers

__all__ = ["AsciiBpe"]

# The GPT-2 split `tokenizers` applies for ByteLevel(use_regex=true).
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# What oniguruma's Unicode classes match among ASCII characters. `\s` is Unicode White_Space: it has
# \t \n \v \f \r and space, but not \x1c-\x1f (Python's own `\s` includes those).
_SPACE = r"\t\n\x0b\x0c\r "
_CLASSES = {"p{L}": "A-Za-z", "p{N}": "0-9", "d": "0-9", "s": _SPACE}
_NEGATED_OUTSIDE = {"S": f"[^{_SPACE}]", "D": "[^0-9]"}

# Words kept per tokenizer before the cache starts over: ~150 bytes each, so at most ~15 MB. English
# prose from a 30k-word vocabulary reaches ~60k keys (case and a leading space make variants).
_MAX_WORDS = 100_000

# Texts that exercise every branch of the split patterns; the fast path must agree with `tokenizers` on
# all of them (and on their concatenation) or it is not used.
_PROBES = (
    "Hello, world! It's 2024; we've 12345 items. I'LL see 'em... don't STOP.",
    "  leading and trailing spaces   \n\n\tTabs\tand\r\nCRLF\x0b\x0c vertical\x1c\x1d\x1e\x1f separators ",
    "a\n\n\nb  \n  c\t \t d", " ' '' 's 'S 'Re x'd", "!!!??? ... ---- ==== ~~~ `code` {json: [1, 2]}",
    "snake_case camelCase CONSTANT_9 v1.2.3 3.14159 1000000000 0x1F $100 #tag @user 50%",
    "".join(chr(c) for c in range(128)), "    ", "\n", "x", "",
)  # fmt: skip


def _byte_to_char() -> dict[int, str]:
    """The byte-level alphabet: printable bytes map to themselves, the rest to chars from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_ASCII_TO_ALPHABET = {b: c for b, c in _byte_to_char().items() if b < 128}


def ascii_pattern(pattern: str) -> re.Pattern[str] | None:
    """`pattern` (oniguruma syntax, as `tokenizers` uses) rewritten for ASCII input with `re`; None if
    it uses a construct this does not translate."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            rest = pattern[i + 1 :]
            name = next((n for n in _CLASSES if rest.startswith(n)), None)
            if name is not None:
                out.append(_CLASSES[name] if in_class else f"[{_CLASSES[name]}]")
                i += 1 + len(name)
                continue
            if rest[:1] in _NEGATED_OUTSIDE and not in_class:
                out.append(_NEGATED_OUTSIDE[rest[0]])
                i += 2
                continue
            if rest[:1] in ("r", "n", "t", "'", '"', "-", ".", "[", "]", "(", ")", "?", "+", "*", "|", "\\"):
                out.append(pattern[i : i + 2])
                i += 2
                continue
            return None  # \p{..} other than L/N, \w, \b, \x.., ...: not worth the risk
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    try:
        return re.compile("".join(out), re.ASCII)
    except re.error:
        return None


def _split_pattern(tokenizer: tokenizers.Tokenizer) -> str | None:
    """The regex `tokenizers` splits words with, for the pre-tokenizers this path understands."""
    if tokenizer.pre_tokenizer is None:
        return None
    pre: dict[str, Any] = json.loads(tokenizer.pre_tokenizer.__getstate__())
    steps: list[dict[str, Any]] = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1:
        step = steps[0]
        ok = step.get("type") == "ByteLevel" and step.get("use_regex", True)
        return _GPT2_PATTERN if ok and not step.get("add_prefix_space") else None
    if len(steps) == 2:
        split, byte_level = steps
        if (
            split.get("type") == "Split"
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and isinstance(split.get("pattern"), dict)
            and isinstance(split["pattern"].get("Regex"), str)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            pattern: str = split["pattern"]["Regex"]
            return pattern
    return None


class AsciiBpe:
    """Encodes ASCII pieces of text (no added tokens inside) as `tokenizers` would. Build with `build`.

    Not thread-safe for writers: the word cache is a plain dict, which is safe under the GIL for the
    single-item reads and writes done here (a lost insert only costs a later miss)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, split: re.Pattern[str]) -> None:
        self._tokenize: Callable[[str], list[Any]] = tokenizer.model.tokenize
        self._findall = split.findall
        self._alphabet = str.maketrans(_ASCII_TO_ALPHABET)
        self._words: dict[str, tuple[int, ...]] = {}
        # One int object per id, shared by every cached word (ids above 256 are not shared by Python).
        self._ids = tuple(range(tokenizer.get_vocab_size(with_added_tokens=True)))

    @classmethod
    def build(cls, tokenizer: tokenizers.Tokenizer) -> AsciiBpe | None:
        """The fast path for `tokenizer`, or None where it cannot be shown to give the same ids."""
        model = tokenizer.model
        if not isinstance(model, tokenizers.models.BPE) or model.dropout:
            return None
        # A tokenizer.json may configure truncation or padding, which `encode` then applies.
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            return None
        normalizer = tokenizer.normalizer
        # Unicode normal forms leave ASCII text as it is; any other normalizer may not.
        if normalizer is not None and type(normalizer).__name__ not in ("NFC", "NFD", "NFKC", "NFKD"):
            return None
        source = _split_pattern(tokenizer)
        split = ascii_pattern(source) if source is not None else None
        if split is None:
            return None
        fast = cls(tokenizer, split)
        for probe in (*_PROBES, "".join(_PROBES)):
            if fast.encode(probe) != tokenizer.encode(probe, add_special_tokens=False).ids:
                return None
        fast._words.clear()  # probe words would only take space
        return fast

    def encode(self, text: str) -> list[int]:
        """Token ids of ASCII `text`, which must hold no added token."""
        found = self._findall(text)
        # Lookups through map() run in C; only misses (rare once warm) take the slow branch.
        hits: list[tuple[int, ...] | None] = list(map(self._words.get, found))
        if None in hits:
            hits = [self._word(w) if h is None else h for w, h in zip(found, hits, strict=True)]
        ids: list[int] = []
        for hit in hits:
            ids += hit  # type: ignore[arg-type]  # no None is left here
        return ids

    def _word(self, word: str) -> tuple[int, ...]:
        shared = self._ids
        ids = tuple([shared[t.id] for t in self._tokenize(word.translate(self._alphabet))])
        words = self._words
        if len(words) >= _MAX_WORDS:
            words.clear()  # start over: cheaper than LRU bookkeeping on every hit
        words[word] = ids
        return ids
