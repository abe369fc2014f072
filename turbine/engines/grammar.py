"""Guided decoding's grammars, over llguidance: a request's `GuidedDecoding` → grammar → matchers.

llguidance was picked by measurement (`benchmarks/grammar_mask.py`): xgrammar's per-token masks are
cheaper once its grammar is compiled, but both are small next to a decode step and computed beside
it, while the compile of each new schema (each distinct tool list is one) sits before the first
token, and llguidance's costs a fraction of xgrammar's. Its Lark dialect also embeds JSON schemas
(`%json {...}`), which is how enforced tool calls are written
(`turbine.postprocess.parsers.tool_grammar`).

JSON is generated compactly (`, ` and `: ` separators, no other whitespace): a flexible whitespace
rule lets a small model emit newlines until max_tokens instead of the next key.

This module does not import torch: the frontend uses it to check a request's grammar before any
worker sees it; the torch engine applies the masks (`engines/torch/grammar.py`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from turbine.protocol.request import GuidedDecoding

_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_ENTRIES = 256


class GrammarError(ValueError):
    """The constraint does not compile; the message says why (shown to the client)."""


def grammar_text(guided: GuidedDecoding) -> str:
    """The llguidance grammar for `guided`; `GrammarError` for specs that do not even parse."""
    kind, spec = guided.kind, guided.spec
    if kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"not a JSON schema: {exc}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        choices: list[str] = json.loads(spec)
        # Lark string literals take JSON's escapes.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    if kind == "grammar":
        try:
            lark = any_to_lark(spec)
        except Exception as exc:  # the GBNF converter raises its own error types
            raise GrammarError(f"not a Lark or GBNF grammar: {exc}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise GrammarError(f"unknown constraint kind {kind!r}")


def check(guided: GuidedDecoding, tokenizer: llguidance.LLTokenizer | None = None) -> str | None:
    """Why `guided` cannot be enforced (the library's own words), or None."""
    try:
        text = grammar_text(guided)
    except GrammarError as exc:
        return str(exc)
    error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
    return None if not error or error.startswith("WARNING") else error


def load_tokenizer(tokenizer_json: Path, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """The grammar library's view of the model's vocabulary (`vocab_size`: the logits' width, which
    may exceed the tokenizer's; the extra ids are never allowed)."""
    return llguidance.LLTokenizer(str(tokenizer_json), n_vocab=vocab_size, eos_token=eos_ids or None)


class Grammars:
    """Matchers for one vocabulary, each spec parsed once (LRU) and copied per sequence.

    Not thread-safe: one owner (the engine's runner thread, or the loop at admission).
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[GuidedDecoding, llguidance.LLMatcher | str] = OrderedDict()

    def _initial(self, guided: GuidedDecoding) -> llguidance.LLMatcher | str:
        cached = self._cache.get(guided)
        if cached is not None:
            self._cache.move_to_end(guided)
            return cached
        try:
            text = grammar_text(guided)
        except GrammarError as exc:
            made: llguidance.LLMatcher | str = str(exc)
        else:
            matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
            made = matcher.get_error() if matcher.is_error() else matcher
        self._cache[guided] = made
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return made

    def error(self, guided: GuidedDecoding) -> str | None:
        """Why `guided` does not compile for this vocabulary, or None."""
        made = self._initial(guided)
        return made if isinstance(made, str) else None

    def matcher(self, guided: GuidedDecoding) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start; `GrammarError` if it does not compile."""
        made = self._initial(guided)
        if isinstance(made, str):
            raise GrammarError(made)
        return made.deep_copy()
