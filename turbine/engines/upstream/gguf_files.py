"""A Hugging Face tokenizer directory from a GGUF file's metadata, for fronting a llama.cpp server
with `--model-path FILE.gguf`: Turbine's preprocessing needs tokenizer.json + tokenizer_config.json
(with the chat template) + config.json, and a GGUF carries all of it (`tokenizer.ggml.*`,
`tokenizer.chat_template`, `{arch}.context_length`). Only byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) are handled; digits are split one by one before the byte-level
split, as llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) do.

No weights are read and no torch is needed (the torch engine's conversion, `engines/torch/gguf.py`,
writes the weights too). The metadata is read with the `gguf` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from turbine.engines import derived_dir
from turbine.errors import ConfigError

_CONTROL = 3  # llama.cpp token type of special (control) tokens
_FORMAT = "1"  # bump when the written files change, so cached directories are rewritten


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file (tensors are not loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueError/struct errors for non-GGUF files
        raise ValueError(f"{path} is not a GGUF file: {exc}") from None
    return {key: field.contents() for key, field in reader.fields.items()}


def write_tokenizer_dir(gguf: Path, out: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and config.json of `gguf` into `out`."""
    meta = read_metadata(gguf)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gpt2) GGUF vocabularies are handled")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t == _CONTROL])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    arch = meta.get("general.architecture", "llama")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    context = meta.get(f"{arch}.context_length", 2048)
    (out / "config.json").write_text(json.dumps({"max_position_embeddings": context, "eos_token_id": eos}))
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turbine" / "gguf-tokenizer"


def tokenizer_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The tokenizer directory of `gguf`, written once per file version under `cache_dir`;
    `ConfigError` for a file that is missing, not a GGUF, or of a vocabulary not handled."""
    path = gguf.resolve()
    try:
        key = derived_dir.version_key(path, _FORMAT)
    except OSError as exc:
        raise ConfigError(f"--model-path {str(gguf)!r}: {exc.strerror}") from None
    out = (cache_dir or default_cache_dir()) / f"{path.name.removesuffix('.gguf')}-{key}"
    try:
        return derived_dir.build_once(out, path, lambda tmp: write_tokenizer_dir(path, tmp))
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--model-path {str(gguf)!r}: {exc}") from None
