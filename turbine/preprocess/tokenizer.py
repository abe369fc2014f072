"""Load a model directory's tokenizer files, and tokenize prompts with HF `tokenizers`.

`load_model_files` reads the Hugging Face layout (tokenizer.json, tokenizer_config.json, config.json,
generation_config.json, chat_template.jinja) once at start-up and turns every irregularity it knows of
into either a value or a `ConfigError` that names the file, so nothing is guessed per request.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import tokenizers
from tokenizers.pre_tokenizers import ByteLevel

from turbine.errors import ConfigError
from turbine.preprocess.ascii_bpe import AsciiBpe

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


# Pre-tokenizers that split text without dropping or rewriting any of it.
_LOSSLESS_SPLITS = ("ByteLevel", "Digits", "Split", "Punctuation")


def _max_bytes_per_token(tokenizer: tokenizers.Tokenizer) -> int | None:
    """The most UTF-8 bytes of input text one token can stand for, where this tokenizer has such a
    bound; None where it has none (or we cannot prove it).

    Proved for byte-level BPE (GPT-2, Llama 3, ...): with no normalizer and only splitting
    pre-tokenizers, every byte of the text becomes one alphabet character that ends up in exactly
    one token (all 256 are in the vocabulary, so none is dropped or merged into an unknown token),
    and a token's string is as long as the bytes it covers. Added tokens match their own content
    only, unless they strip neighbouring whitespace (then a token can swallow any run of it: no
    bound). WordPiece and Unigram can map a word of any length to one [UNK], normalizers can shrink
    text: none of those gets a bound.
    """
    # Read through the binding's objects, not `to_str()`: that serializes every merge (megabytes).
    if tokenizer.normalizer is not None or not isinstance(tokenizer.model, tokenizers.models.BPE):
        return None
    pre = json.loads(tokenizer.pre_tokenizer.__getstate__()) if tokenizer.pre_tokenizer else {}
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    if not any(step.get("type") == "ByteLevel" for step in steps):
        return None
    if any(step.get("type") not in _LOSSLESS_SPLITS or step.get("behavior") == "Removed" for step in steps):
        return None
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    if any(ch not in vocab for ch in ByteLevel.alphabet()):
        return None
    added = list(tokenizer.get_added_tokens_decoder().values())
    if any(token.lstrip or token.rstrip for token in added):
        return None
    return max([max(map(len, vocab)), *(len(token.content.encode()) for token in added)])


def utf8_length(text: str) -> int:
    # isascii() is O(1) on CPython's compact strings: most prompts are measured without a copy.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on other C libraries (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc is among them
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand memory that is free inside the C allocator back to the OS.

    `tokenizers` needs ~140 bytes per character of input at its peak (ids, offsets and token strings
    of every token) and frees them afterwards, but glibc keeps freed pages in its per-thread arenas:
    without this, one very long prompt leaves the process larger for good by many times its size.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Tokenizer:
    """Text → token ids for prompts. Thread-safe: the HF tokenizer is immutable once loaded.

    Special tokens are never added: the chat template has already written them into the text, and
    added-token strings in the text (e.g. `<|im_start|>`) are matched to their ids by `tokenizers`.
    """

    # Below this many characters encoding runs inline on the event loop: for a short prompt the hop to
    # a thread costs more than the encoding, and the longest inline one stalls the loop only briefly.
    INLINE_MAX_CHARS = 2000
    # ASCII text on the fast path (`ascii_bpe.py`) stays inline up to this many times as long: it costs
    # about that much less per character, and it holds the GIL, so a thread would not run it beside the loop
    # anyway; only the hop would be paid.
    INLINE_ASCII_FACTOR = 4

    # Prompt pieces at least this long are remembered (see `encode`).
    CACHE_MIN_CHARS = 1000
    # The cache's bound in (estimated) bytes; a piece costing over an eighth of it is not cached.
    CACHE_MAX_BYTES = 64 << 20
    # After encoding at least this many characters, free memory goes back to the OS.
    TRIM_MIN_CHARS = 256 << 10

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        inline_max_chars: int = INLINE_MAX_CHARS,
        cache_entries: int = 0,
        cache_max_bytes: int = CACHE_MAX_BYTES,
        fast_ascii: bool = True,
    ) -> None:
        """`fast_ascii`: encode ASCII text through `AsciiBpe` where it applies (same ids, less CPU)."""
        self._tokenizer = tokenizer
        self._inline_max_chars = inline_max_chars
        self._cache_entries = cache_entries
        self._cache_max_bytes = cache_max_bytes
        self._cache_bytes = 0
        self._cache: OrderedDict[str, tuple[list[int], int]] = OrderedDict()
        self._lock = threading.Lock()
        # ASCII pieces take the faster exact path where it exists for this tokenizer (`ascii_bpe.py`).
        self._fast = AsciiBpe.build(tokenizer) if fast_ascii else None
        # Both the cache and the fast path work piece by piece between added tokens; where encoding
        # by pieces would not be exact there is no splitter, so neither is used.
        self._split = _added_token_splitter(tokenizer) if cache_entries > 0 or self._fast else None
        if self._split is None and tokenizer.get_added_tokens_decoder():
            self._fast = None
        self._added_ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.cache_hits = 0
        # None: no lower bound on a text's token count (see `min_tokens`).
        self.max_bytes_per_token = _max_bytes_per_token(tokenizer)

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

    def min_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))`, without encoding: 0 where the tokenizer gives none.

        Lets a prompt that cannot fit the context be refused before paying for tokenizing it.
        """
        most = self.max_bytes_per_token
        return -(-utf8_length(text) // most) if most else 0

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes the cache holds now."""
        return self._cache_bytes

    def encode(self, text: str) -> list[int]:
        ids = self._encode(text)
        if len(text) >= self.TRIM_MIN_CHARS:
            release_free_memory()
        return ids

    def _encode(self, text: str) -> list[int]:
        """Token ids of `text`, reusing remembered long pieces (a shared system prompt, say).

        `tokenizers` cuts the input at added tokens (`<|im_start|>` ...) before anything else and
        encodes the pieces between them independently, so encoding piece by piece gives the same ids
        as encoding the whole, and a long piece seen before costs a dictionary lookup.
        """
        split = self._split
        if split is None:
            if self._fast is not None and text.isascii():
                return self._fast.encode(text)  # no added tokens in this vocabulary: one piece
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
            return ids
        if self._fast is None and len(text) < self.CACHE_MIN_CHARS:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
            return ids
        caching = self._cache_entries > 0
        out: list[int] = []
        for piece in split.split(text):
            if not piece:
                continue
            added = self._added_ids.get(piece)
            if added is not None:
                out.append(added)
                continue
            if not caching or len(piece) < self.CACHE_MIN_CHARS:
                out += self._encode_piece(piece)
                continue
            with self._lock:
                hit = self._cache.get(piece)
                if hit is not None:
                    self._cache.move_to_end(piece)
                    self.cache_hits += 1
            if hit is not None:
                out += hit[0]
                continue
            ids = self._encode_piece(piece)
            out += ids
            self._remember(piece, ids)
        return out

    def _encode_piece(self, piece: str) -> list[int]:
        """Ids of text with no added token in it."""
        if self._fast is not None and piece.isascii():
            return self._fast.encode(piece)
        ids: list[int] = self._tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def _remember(self, piece: str, ids: list[int]) -> None:
        # The key's own size plus, per id, a list slot and an int object (ids above 256 are not
        # shared): the cache is bounded by what it really holds, not only by its entry count.
        cost = sys.getsizeof(piece) + 40 * len(ids)
        if cost > self._cache_max_bytes // 8:
            return  # one huge prompt must not flush everything else (nor be kept itself)
        with self._lock:
            if piece in self._cache:
                return
            self._cache[piece] = (ids, cost)
            self._cache_bytes += cost
            while len(self._cache) > self._cache_entries or self._cache_bytes > self._cache_max_bytes:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cache_bytes -= dropped

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        # encode_batch parallelises across texts inside Rust.
        batch = list(texts)
        encodings = self._tokenizer.encode_batch(batch, add_special_tokens=False)
        out = [encoding.ids for encoding in encodings]
        del encodings
        if sum(map(len, batch)) >= self.TRIM_MIN_CHARS:
            release_free_memory()
        return out

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def encode_async(self, text: str, executor: Executor | None = None) -> list[int]:
        """`encode`, without blocking the event loop on long texts.

        Long texts run in `executor` (None: the loop's default executor); `tokenizers` releases the
        GIL while encoding, so other requests keep being served meanwhile.
        """
        size = len(text)
        if size < self._inline_max_chars or (
            self._fast is not None
            and size < self._inline_max_chars * self.INLINE_ASCII_FACTOR
            and text.isascii()
        ):
            return self.encode(text)
        return await asyncio.get_running_loop().run_in_executor(executor, self.encode, text)
