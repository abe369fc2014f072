"""Penalties, logit bias, bad words and allowed token ids: validated with OpenAI's wording and turned
into the `SamplingOptions` fields engines read.

OpenAI's ranges: presence and frequency penalties within [-2, 2], each logit bias within
[-100, 100] keyed by a token id; vLLM's: repetition penalty > 0, allowed token ids within the
vocabulary, bad words non-empty. A bad word becomes the token sequences of the word alone and of
the word after a space (how it reads at the start of a text and inside one).
"""

from __future__ import annotations

import math
from typing import Any

from turbine.errors import InvalidRequest
from turbine.preprocess.tokenizer import Tokenizer
from turbine.protocol.openai import ChatCompletionRequest, CompletionRequest

PENALTY_MIN, PENALTY_MAX = -2.0, 2.0
BIAS_MIN, BIAS_MAX = -100.0, 100.0
MAX_LOGIT_BIAS = 1024
MAX_BAD_WORDS = 256


def _above(param: str, limit: float, value: float) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': decimal above maximum value. Expected a value <= {limit:g}, but got "
        f"{value:g} instead.",
        param=param,
        code="decimal_above_max_value",
    )


def _below(param: str, limit: float, value: float, *, strict: bool = False) -> InvalidRequest:
    relation = ">" if strict else ">="
    return InvalidRequest(
        f"Invalid '{param}': decimal below minimum value. Expected a value {relation} {limit:g}, but "
        f"got {value:g} instead.",
        param=param,
        code="decimal_below_min_value",
    )


def _finite(param: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(
            f"Invalid '{param}': expected a finite number.", param=param, code="invalid_value"
        )


def _penalty(param: str, value: float | None) -> float:
    if value is None:
        return 0.0
    _finite(param, value)
    if value > PENALTY_MAX:
        raise _above(param, PENALTY_MAX, value)
    if value < PENALTY_MIN:
        raise _below(param, PENALTY_MIN, value)
    return float(value)


def _repetition(value: float | None) -> float:
    if value is None:
        return 1.0
    _finite("repetition_penalty", value)
    if value <= 0.0:
        raise _below("repetition_penalty", 0.0, value, strict=True)
    return float(value)


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"Invalid 'logit_bias': at most {MAX_LOGIT_BIAS} tokens may be biased.", param="logit_bias"
        )
    out: list[tuple[int, float]] = []
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit():
            raise InvalidRequest(
                f"Invalid key in 'logit_bias': {key}. You should only be submitting non-negative integers.",
                param="logit_bias",
            )
        token = int(key)
        if token >= vocab:
            raise InvalidRequest(
                f"Invalid key in 'logit_bias': {key}. Token ids must be below the vocabulary size {vocab}.",
                param="logit_bias",
            )
        if not math.isfinite(value) or not BIAS_MIN <= value <= BIAS_MAX:
            raise InvalidRequest(
                f"Invalid value for 'logit_bias' key {key}: {value:g}. Expected a value within "
                f"[{BIAS_MIN:g}, {BIAS_MAX:g}].",
                param="logit_bias",
                code="invalid_value",
            )
        if value:
            out.append((token, float(value)))
    return tuple(sorted(out))


def _allowed(ids: list[int] | None, vocab: int) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not ids:
        raise InvalidRequest(
            "Invalid 'allowed_token_ids': expected at least one token id.", param="allowed_token_ids"
        )
    if any(not 0 <= t < vocab for t in ids):
        raise InvalidRequest(
            f"Invalid 'allowed_token_ids': token ids must be within [0, {vocab}).",
            param="allowed_token_ids",
            code="invalid_value",
        )
    return tuple(sorted(set(ids)))


def _bad_words(
    words: list[str] | None, tokenizer: Tokenizer
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    if not words:
        return (), ()
    if len(words) > MAX_BAD_WORDS:
        raise InvalidRequest(f"Invalid 'bad_words': at most {MAX_BAD_WORDS} words.", param="bad_words")
    if any(not w.strip() for w in words):
        raise InvalidRequest("Invalid 'bad_words': words must not be empty.", param="bad_words")
    sequences: set[tuple[int, ...]] = set()
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer.hf.encode(text, add_special_tokens=False).ids)
            if ids:
                sequences.add(ids)
    return tuple(words), tuple(sorted(sequences))


def sampling_knobs(req: ChatCompletionRequest | CompletionRequest, tokenizer: Tokenizer) -> dict[str, Any]:
    """The request's penalty/bias knobs, checked, as `SamplingOptions` keyword arguments."""
    vocab = tokenizer.vocab_size
    bad_words, bad_words_ids = _bad_words(req.bad_words, tokenizer)
    return {
        "presence_penalty": _penalty("presence_penalty", req.presence_penalty),
        "frequency_penalty": _penalty("frequency_penalty", req.frequency_penalty),
        "repetition_penalty": _repetition(req.repetition_penalty),
        "logit_bias": _logit_bias(req.logit_bias, vocab),
        "bad_words": bad_words,
        "bad_words_ids": bad_words_ids,
        "allowed_token_ids": _allowed(req.allowed_token_ids, vocab),
    }
