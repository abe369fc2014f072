"""What a `PreprocessedRequest` becomes on an upstream's `/v1/completions`, and what its stream
chunks mean (pure: no I/O).

Two modes per upstream:

- token mode: the prompt is the request's token ids (vLLM, SGLang and llama.cpp's `llama-server`
  accept a list of ints), so the engine caches exactly the blocks Turbine hashes. Generated token
  ids come back in `choices[0].token_ids` (vLLM `return_token_ids`) or `tokens` (llama-server
  `return_tokens`); servers that send neither have their text re-tokenized as in text mode.
- text mode: the prompt is the token ids decoded back to text, special tokens kept (the templated
  prompt); for servers that take strings only (llama-cpp-python's server answers a list of ints
  with 422). Generated text is re-tokenized (`Retokenizer`) so usage, stop handling and routing
  history see token ids as for any other worker.

Sampling and stop options, and which servers honour them (others ignore unknown fields):

- temperature, top_p, seed, max_tokens: the OpenAI fields; every server.
- logprobs (k alternatives): `logprobs: k` plus vLLM's `return_tokens_as_token_ids`; vLLM, SGLang,
  llama.cpp. Passed on in token mode only, where the ids are the server's own.
- min_tokens: `min_tokens`; vLLM, SGLang, llama-cpp-python.
- ignore_eos: `ignore_eos` in token mode (vLLM, SGLang, llama-server); in text mode a `logit_bias`
  of -100 on the EOS ids (llama-cpp-python).
- stop_token_ids: `stop_token_ids` in token mode (vLLM, SGLang); in text mode `stop` with each id's
  text (llama.cpp).

- presence_penalty, frequency_penalty, logit_bias ({"id": bias}): the OpenAI fields; vLLM, SGLang,
  llama.cpp (whose server takes OpenAI's logit_bias object too).
- repetition_penalty: `repetition_penalty` (vLLM, SGLang) and `repeat_penalty` with
  `repeat_last_n: -1` (llama.cpp: over the whole context, as vLLM's covers prompt and output).
- bad_words, allowed_token_ids: vLLM's fields; vLLM only (the default `--upstream-sampling-knobs`
  leaves them out, so frontends refuse them unless the flag says the server takes them).

- guided (structured outputs): in the fields of the server's `--upstream-guided-decoding` dialect
  (`guided.py`).

Stop *strings* are never sent: the frontend applies them to the text, for every worker alike.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tokenizers

from turbine.engines.upstream.guided import guided_fields
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import FinishReason


class Mode(enum.StrEnum):
    TOKEN = "token"
    TEXT = "text"


# The token-id form of vLLM's logprob tokens (`return_tokens_as_token_ids`).
_TOKEN_ID_PREFIX = "token_id:"


def completion_body(
    request: PreprocessedRequest,
    *,
    mode: Mode,
    model: str,
    tokenizer: tokenizers.Tokenizer,
    guided_dialect: str = "none",
) -> dict[str, Any]:
    s, stop = request.sampling, request.stop
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": stop.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.temperature is not None:
        body["temperature"] = s.temperature
    if s.top_p is not None:
        body["top_p"] = s.top_p
    if s.seed is not None:
        body["seed"] = s.seed
    if s.logprobs is not None:
        body["logprobs"] = s.logprobs
        body["return_tokens_as_token_ids"] = True
    if stop.min_tokens:
        body["min_tokens"] = stop.min_tokens
    body.update(_knobs(request))
    if s.guided is not None:
        body.update(guided_fields(s.guided, guided_dialect))
    if mode is Mode.TOKEN:
        body["prompt"] = request.token_ids
        body["return_token_ids"] = True  # vLLM
        body["return_tokens"] = True  # llama-server
        if stop.ignore_eos:
            body["ignore_eos"] = True
        if stop.stop_token_ids:
            body["stop_token_ids"] = list(stop.stop_token_ids)
    else:
        body["prompt"] = tokenizer.decode(request.token_ids, skip_special_tokens=False)
        if stop.ignore_eos and request.eos_token_ids:
            body["logit_bias"] = {
                **body.get("logit_bias", {}),
                **{str(t): -100 for t in request.eos_token_ids},
            }
        if stop.stop_token_ids:
            body["stop"] = [tokenizer.decode([t], skip_special_tokens=False) for t in stop.stop_token_ids]
    return body


# The knobs every supported server honours (the default of --upstream-sampling-knobs).
UPSTREAM_KNOBS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")


def _knobs(request: PreprocessedRequest) -> dict[str, Any]:
    """Penalties, logit bias, bad words and allowed token ids in each server's own names."""
    s = request.sampling
    out: dict[str, Any] = {}
    if s.presence_penalty:
        out["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        out["frequency_penalty"] = s.frequency_penalty
    if s.repetition_penalty != 1.0:
        out["repetition_penalty"] = s.repetition_penalty
        out["repeat_penalty"] = s.repetition_penalty
        out["repeat_last_n"] = -1
    if s.logit_bias:
        out["logit_bias"] = {str(t): b for t, b in s.logit_bias}
    if s.bad_words:
        out["bad_words"] = list(s.bad_words)
    if s.allowed_token_ids:
        out["allowed_token_ids"] = list(s.allowed_token_ids)
    return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed completion chunk, normalised."""

    text: str = ""
    token_ids: list[int] | None = None  # None: the server did not send ids
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    cached_tokens: int | None = None
    error: str | None = None


_FINISH = {"stop": FinishReason.STOP, "eos": FinishReason.STOP, "length": FinishReason.LENGTH}


def parse_chunk(data: Mapping[str, Any], tokenizer: tokenizers.Tokenizer) -> Chunk:
    """One SSE `data:` object of a streamed `/v1/completions` response."""
    error = data.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, Mapping) else error
        return Chunk(error=str(message))
    cached = _cached_tokens(data.get("usage"))
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return Chunk(cached_tokens=cached)  # the usage-only chunk
    choice = choices[0]
    text = choice.get("text") or ""
    ids = choice.get("token_ids")
    if ids is None:
        ids = data.get("tokens")
    token_ids = list(ids) if isinstance(ids, list) and all(isinstance(i, int) for i in ids) else None
    reason = choice.get("finish_reason")
    finish = None if reason is None else _FINISH.get(str(reason), FinishReason.STOP)
    logprobs, top = _logprobs(choice.get("logprobs"), tokenizer)
    return Chunk(str(text), token_ids, finish, logprobs, top, cached)


def _cached_tokens(usage: Any) -> int | None:
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("prompt_tokens_details")
    if isinstance(details, Mapping) and isinstance(details.get("cached_tokens"), int):
        cached: int = details["cached_tokens"]
        return cached
    return None


def _token_id(token: str, tokenizer: tokenizers.Tokenizer) -> int | None:
    if token.startswith(_TOKEN_ID_PREFIX):
        try:
            return int(token[len(_TOKEN_ID_PREFIX) :])
        except ValueError:
            return None
    return tokenizer.token_to_id(token)


def _logprobs(
    raw: Any, tokenizer: tokenizers.Tokenizer
) -> tuple[list[float] | None, list[list[tuple[int, float]]] | None]:
    """OpenAI completions logprobs (`token_logprobs`, `top_logprobs` as {token: logprob} maps)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("token_logprobs"), list):
        return None, None
    values = [float(v) if isinstance(v, int | float) else 0.0 for v in raw["token_logprobs"]]
    tops: list[list[tuple[int, float]]] = []
    for entry in raw.get("top_logprobs") or []:
        alts: list[tuple[int, float]] = []
        if isinstance(entry, Mapping):
            for token, lp in entry.items():
                tid = _token_id(str(token), tokenizer)
                if tid is not None and isinstance(lp, int | float):
                    alts.append((tid, float(lp)))
        tops.append(sorted(alts, key=lambda a: -a[1]))
    return values, tops if tops else None


class Retokenizer:
    """Token ids for streamed text, as the model's tokenizer would split the whole text.

    Byte-level BPE pre-tokenizers split before whitespace, so text up to the last whitespace
    boundary tokenizes the same alone as within the whole; the word after it is held until the
    next boundary or `flush()`. Concatenated, the ids decode to exactly the streamed text.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._held = ""

    def feed(self, text: str) -> list[int]:
        held = self._held + text
        cut = max(held.rfind(" "), held.rfind("\n"))
        if cut <= 0:
            self._held = held
            return []
        self._held = held[cut:]
        return self._encode(held[:cut])

    def flush(self) -> list[int]:
        held, self._held = self._held, ""
        return self._encode(held) if held else []

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
