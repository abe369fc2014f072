"""A single `.gguf` file → a cached Hugging Face model directory the rest of Turbine reads.

The file carries everything: hyper-parameters, the tokenizer, the chat template and (usually
quantized) weights. Converting once to an ordinary model directory — config.json, tokenizer.json,
tokenizer_config.json with the template, generation_config.json and float32 safetensors — lets the
frontend, the model-file publisher and the torch loader treat it like any checkpoint, and a restart
finds the directory in the cache instead of dequantizing again. The cache key covers the file's
path, size and modification time, so a replaced file is converted anew (and its older conversions
are removed). The 4-bit (Q4_0/Q4_1/Q4_K) linear weights are also kept as the file stores them,
beside the checkpoint, for the CPU's small steps (`q4.py`).

Facts of the format used here: GGUF stores a 2-D weight as ggml dims `[in, out]` (rows of `in`);
`gguf.quants.dequantize` returns it row-major as `[out, in]`. llama.cpp's converter permutes the rows
of Llama-architecture q/k projections (per head, interleaving the two RoPE halves), so they are
permuted back here to the `transformers` layout our forward (and the test oracle) uses. The
tokenizer is rebuilt by `transformers`' GGUF tokenizer converter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turbine.engines import derived_dir
from turbine.engines.torch import q4
from turbine.errors import ConfigError
from turbine.models import gguf_served_name

log = logging.getLogger(__name__)

_FORMAT = 3  # bump when the converted layout changes, so old cache entries are not reused

# GGUF tensor name (after "blk.N.") → transformers name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turbine" / "gguf"


def served_name(path: Path) -> str:
    return gguf_served_name(path)


def convert_gguf(path: Path, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The model directory for `path`, converting it on first use; `ConfigError` for unusable files."""
    path = path.resolve()
    try:
        key = derived_dir.version_key(path, _FORMAT)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    root = cache_dir or default_cache_dir()
    out = root / f"{served_name(path)}-{key}"
    if derived_dir.is_complete(out):
        log.info("using the converted %s from %s", path.name, out)
    else:
        log.info("converting %s to %s (once; later starts reuse it)", path.name, out)
        derived_dir.build_once(out, path, lambda tmp: _convert(path, tmp, progress))
    prune_stale(root, out, path)
    return out


def prune_stale(root: Path, current: Path, path: Path) -> list[Path]:
    """Remove `root`'s other conversions of the same file `path` (an older format, or the file as it
    was before it changed): each is as large as the model in float32, and nothing reads them again.
    Conversions of other files are kept, whatever their names. Returns what was removed."""
    removed = []
    for entry in root.glob(f"{served_name(path)}-*"):
        marker = entry / derived_dir.COMPLETE
        if entry == current or not marker.is_file():
            continue
        try:
            source = marker.read_text().strip()
        except OSError:
            continue
        if source == str(path):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.info("removed %s, an older conversion of %s", entry, path.name)
    return removed


def _convert(path: Path, out: Path, progress: bool) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueError/struct errors for non-GGUF files
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from None
    meta = _metadata(reader)
    arch = str(meta.get("general.architecture"))
    if arch not in _ARCHITECTURES:
        raise ConfigError(
            f"{path}: GGUF architecture {arch!r} is not supported by the torch engine "
            f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
        )
    config = _config(meta, arch, has_output=any(t.name == "output.weight" for t in reader.tensors))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights: dict[str, torch.Tensor] = {}
    blocks: dict[str, q4.Blocks] = {}  # 4-bit linear weights, also kept as they are (q4.py)
    bar = tqdm(
        reader.tensors, desc=f"Dequantizing {path.name}", unit="tensor", file=sys.stderr, disable=not progress
    )
    for tensor in bar:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        data = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        w = torch.from_numpy(data.reshape(shape).copy())
        kind = tensor.tensor_type.name
        linear = name.endswith("proj.weight") or name == "lm_head.weight"
        found = q4.decode(tensor.data, kind, *shape) if linear and kind in q4.KINDS else None
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if name.endswith("q_proj.weight") else kv_heads
            w = _unpermute(w, n)
            if found is not None:
                found = (_unpermute(found[0], n), _unpermute(found[1], n), _unpermute(found[2], n))
        weights[name] = w
        if found is not None:
            blocks[name] = found
    save_file(weights, str(out / "model.safetensors"))
    if blocks:
        q4.save(blocks, out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(path, out, meta, config)


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue  # large arrays: read where needed
        try:
            out[key] = field.contents()
        except Exception:  # a field type this reader cannot render is not one we need
            continue
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        out["tokenizer.ggml.tokens"] = tokens.contents()
    return out


def _config(meta: dict[str, Any], arch: str, *, has_output: bool) -> dict[str, Any]:
    def get(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata has no {arch}.{name}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    architecture, model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = int(value)
    return config


def _hf_name(name: str) -> str | None:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        mapped = _LAYER_NAMES.get(rest)
        return None if mapped is None else f"model.layers.{layer}.{mapped}"
    return None  # e.g. rope_freqs: derived from the config instead


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of q/k projections (back to rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_tokenizer(path: Path, out: Path, meta: dict[str, Any], config: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    tokenizer_config: dict[str, Any] = {
        "model_max_length": config["max_position_embeddings"],
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation: dict[str, Any] = {}
    if "eos_token_id" in config:
        generation["eos_token_id"] = config["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
