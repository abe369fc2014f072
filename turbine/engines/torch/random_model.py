"""Random-weight Llama-family models built from a config: for tests (a tiny model `transformers` can
load as the oracle) and for benchmarks on machines that cannot download weights (~1B and ~8B shapes).

    python -m turbine.engines.torch.random_model --preset tiny --out DIR [--tokenizer-from DIR]

writes a Hugging Face model directory (config.json, model.safetensors, generation_config.json, and
the tokenizer files copied from `--tokenizer-from`, default: Turbine's bundled tiny tokenizer).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CI: exact comparisons against transformers in float32 run in milliseconds.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
    # Llama 3.2 1B's shape (without its RoPE scaling, which changes no cost).
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # Llama 3.1 8B's shape.
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
}


def llama_config(preset: str, **overrides: Any) -> dict[str, Any]:
    """A `config.json` for a LlamaForCausalLM of the preset's shape."""
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    config.update(PRESETS[preset])
    config.update(overrides)
    return config


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint of `config` has, by name, with its shape."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def random_weights(
    config: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Every tensor a Llama checkpoint of `config` has, normal(0, std) (norm weights 1 + noise).

    Drawn on the CPU, in checkpoint order, for the same values on any device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(*shape, generator=gen)
        else:
            t = torch.randn(*shape, generator=gen) * std
        out[name] = t.to(dtype=dtype, device=device)
    return out


def dummy_weights(
    config: dict[str, Any], dtype: torch.dtype, device: torch.device, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights of `config`'s shape drawn on `device` itself (`--load-format dummy`): an 8B shape
    in seconds on a GPU, where drawing on the CPU and copying takes minutes. The same distribution as
    `random_weights`, other values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        mean, std = (1.0, 0.1) if name.endswith("norm.weight") else (0.0, 0.02)
        out[name] = t.normal_(mean, std, generator=gen)
    return out


def bundled_tokenizer_dir() -> Path:
    from turbine.models import bundled_model_path

    return bundled_model_path()


def write_model_dir(
    out: Path,
    config: dict[str, Any],
    *,
    tokenizer_from: Path | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    """A loadable HF model directory with random weights (float32 safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    source = tokenizer_from or bundled_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": config.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    weights = random_weights(config, seed=seed, std=std)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight Llama model directory.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-from", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    write_model_dir(
        args.out, llama_config(args.preset), tokenizer_from=args.tokenizer_from, seed=args.seed, std=args.std
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
