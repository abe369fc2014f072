"""Load a model directory's tokenizer files, and tokenize prompts with HF `tokenizers`.

`load_model_files` reads the Hugging Face layout (tokenizer.json, tokenizer_config.json, config.json,
generation_config.json, chat_template.jinja) once at start-up and turns every irregularity it knows of
into either a value or a `ConfigError` that names the file, so nothing is guessed per request.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from turbine.errors import ConfigError

__all__ = ["DEFAULT_CONTEXT_LENGTH", "ModelFiles", "Tokenizer", "load_model_files"]

DEFAULT_CONTEXT_LENGTH = 4096

# transformers writes int(1e30) as model_max_length when the tokenizer has no limit of its own.
_NO_LIMIT_ABOVE = 1 << 40

# config.json keys that hold the context length, in the order transformers model classes use them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """What the frontend needs from a model directory to preprocess and postprocess requests."""

    model_dir: Path
    tokenizer: tokenizers.Tokenizer
    # None when the model has no chat template (it can still serve /v1/completions).
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    # Every id that ends generation: the eos_token's id, then generation_config's, then config's.
    eos_token_ids: tuple[int, ...]
    # Maximum prompt + completion tokens.
    context_length: int


def _read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _token_string(value: Any, key: str, path: Path) -> str | None:
    # Special tokens are written either as the bare string or as a serialized AddedToken object.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        content: str = value["content"]
        return content
    raise ConfigError(f"{path}: {key} must be a string or an object with 'content'")


def _token_ids(value: Any, key: str, path: Path) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ConfigError(f"{path}: {key} must be an integer or a list of integers")


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # A standalone template file wins over the config entry, as in transformers: newer checkpoints
    # ship both and update only the file.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{jinja_file} is not readable text: {exc}") from exc
    legacy_file = model_dir / "chat_template.json"
    source: Any = _read_json(legacy_file).get("chat_template")
    where = legacy_file
    if source is None:
        source = tokenizer_config.get("chat_template")
        where = model_dir / "tokenizer_config.json"
    if source is None or isinstance(source, str):
        return source
    if isinstance(source, list):
        # Several named templates (e.g. "default", "tool_use", "rag"): the plain chat one is "default".
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
        raise ConfigError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default'")
    raise ConfigError(f"{where}: chat_template must be a string or a list of {{name, template}}")


def _context_length(config: dict[str, Any], tokenizer_config: dict[str, Any]) -> int:
    # Multimodal configs keep the language model's settings under text_config.
    text_config = config.get("text_config")
    for section in (config, text_config if isinstance(text_config, dict) else {}):
        for key in _CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    value = tokenizer_config.get("model_max_length")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < _NO_LIMIT_ABOVE:
        return int(value)
    return DEFAULT_CONTEXT_LENGTH


def load_model_files(model_dir: Path) -> ModelFiles:
    """Read the tokenizer, chat template, special tokens and limits from a HF-style model directory.

    Raises `ConfigError` naming the file when tokenizer.json is missing or a file is malformed.
    """
    if not model_dir.is_dir():
        raise ConfigError(f"model path {model_dir} is not a directory")
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConfigError(
            f"{tokenizer_file} is missing: turbine needs a 'fast' (tokenizers) tokenizer.json "
            "next to the model's config"
        )
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the binding raises plain Exception for every parse failure
        raise ConfigError(f"{tokenizer_file} could not be loaded: {exc}") from exc

    tokenizer_config_file = model_dir / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_file)
    config_file = model_dir / "config.json"
    config = _read_json(config_file)
    generation_file = model_dir / "generation_config.json"
    generation_config = _read_json(generation_file)

    bos_token = _token_string(tokenizer_config.get("bos_token"), "bos_token", tokenizer_config_file)
    eos_token = _token_string(tokenizer_config.get("eos_token"), "eos_token", tokenizer_config_file)

    eos_ids: list[int] = []
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ConfigError(f"{tokenizer_config_file}: eos_token {eos_token!r} is not in the vocabulary")
        eos_ids.append(eos_id)
    eos_ids += _token_ids(generation_config.get("eos_token_id"), "eos_token_id", generation_file)
    eos_ids += _token_ids(config.get("eos_token_id"), "eos_token_id", config_file)

    return ModelFiles(
        model_dir=model_dir,
        tokenizer=tokenizer,
        chat_template=_chat_template(model_dir, tokenizer_config),
        bos_token=bos_token,
        eos_token=eos_token,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),  # de-duplicated, first occurrence kept
        context_length=_context_length(config, tokenizer_config),
    )


def _added_token_splitter(tokenizer: tokenizers.Tokenizer) -> re.Pattern[str] | None:
    """A regex splitting text around added tokens, if piecewise encoding is exact for this tokenizer.

    Added tokens that strip neighbouring whitespace, or are matched after normalization, make a
    piece's ids depend on its neighbours; then there is no splitter and no cache.
    """
    added = list(tokenizer.get_added_tokens_decoder().values())
    if not added or any(t.lstrip or t.rstrip or t.normalized or t.single_word for t in added):
        return None
    contents = sorted({t.content for t in added}, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(c) for c in contents) + ")")


class Tokenizer:
    """Text → token ids for prompts. Thread-safe: the HF tokenizer is immutable once loaded.

    Special tokens are never added: the chat template has already written them into the text, and
    added-token strings in the text (e.g. `<|im_start|>`) are matched to their ids by `tokenizers`.
    """

    # Below this many characters encoding runs inline on the event loop. Measured with the bundled
    # tokenizer: a thread round trip costs ~55 us, encoding ~150 us per 1,000 chars, so short prompts
    # gain nothing from the hop and the longest inline one stalls the loop for only ~0.3 ms.
    INLINE_MAX_CHARS = 2000

    # Prompt pieces at least this long are remembered (see `encode`).
    CACHE_MIN_CHARS = 1000

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        inline_max_chars: int = INLINE_MAX_CHARS,
        cache_entries: int = 0,
    ) -> None:
        self._tokenizer = tokenizer
        self._inline_max_chars = inline_max_chars
        self._cache_entries = cache_entries
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._split = _added_token_splitter(tokenizer) if cache_entries > 0 else None
        self.cache_hits = 0

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for detokenizers, which need the decoder)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, reusing remembered long pieces (a shared system prompt, say).

        `tokenizers` cuts the input at added tokens (`<|im_start|>` ...) before anything else and
        encodes the pieces between them independently, so encoding piece by piece gives the same ids
        as encoding the whole, and a long piece seen before costs a dictionary lookup.
        """
        split = self._split
        if split is None or len(text) < self.CACHE_MIN_CHARS:
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
            return ids
        out: list[int] = []
        for piece in split.split(text):
            if not piece:
                continue
            if len(piece) < self.CACHE_MIN_CHARS:
                out += self._tokenizer.encode(piece, add_special_tokens=False).ids
                continue
            with self._lock:
                cached = self._cache.get(piece)
                if cached is not None:
                    self._cache.move_to_end(piece)
                    self.cache_hits += 1
            if cached is None:
                cached = self._tokenizer.encode(piece, add_special_tokens=False).ids
                with self._lock:
                    self._cache[piece] = cached
                    if len(self._cache) > self._cache_entries:
                        self._cache.popitem(last=False)
            out += cached
        return out

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # encode_batch parallelises across texts inside Rust.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def encode_async(self, text: str, executor: Executor | None = None) -> list[int]:
        """`encode`, without blocking the event loop on long texts.

        Long texts run in `executor` (None: the loop's default executor); `tokenizers` releases the
        GIL while encoding, so other requests keep being served meanwhile.
        """
        if len(text) < self._inline_max_chars:
            return self.encode(text)
        return await asyncio.get_running_loop().run_in_executor(executor, self.encode, text)
