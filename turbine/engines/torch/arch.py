"""What the torch engine needs to know about a model: its architecture, read from `config.json`.

One dataclass covers the Llama family as `transformers` implements it — Llama (incl. Llama 3 RoPE
scaling), Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) — since they differ only in
these switches. Anything else is refused with a `ConfigError` naming the architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbine.errors import ConfigError

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelArch:
    family: str
    """llama | mistral | qwen2 | qwen3."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry biases (Qwen2; Llama with attention_bias)."""
    qk_norm: bool
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    sliding_window: int | None
    """Keys further back than this are not attended (Mistral v0.1); None: full attention."""
    rope_scaling: dict[str, Any] | None
    torch_dtype: str | None
    """The dtype the checkpoint was saved in, if it says."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.num_layers * self.kv_size * element_size

    def inv_freq(self) -> list[float]:
        """RoPE inverse frequencies, with the checkpoint's scaling applied."""
        dim = self.head_dim
        inv = [1.0 / self.rope_theta ** (i / dim) for i in range(0, dim, 2)]
        scaling = self.rope_scaling
        if not scaling:
            return inv
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            return inv
        factor = float(scaling.get("factor", 1.0))
        if kind == "linear":
            return [f / factor for f in inv]
        # Llama 3: low frequencies are slowed by `factor`, high ones kept, a smooth ramp between.
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = original / low, original / high
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / factor)
            else:
                smooth = (original / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out


def read_arch(model_dir: Path) -> ModelArch:
    """Parse `model_dir/config.json`; `ConfigError` (one line) for a missing file or a model we can't run."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: the torch engine needs the model's config.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} could not be read: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    archs = config.get("architectures") or []
    family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if family is None:
        family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
            str(config.get("model_type"))
        )
    if family is None:
        name = ", ".join(map(str, archs)) or str(config.get("model_type"))
        raise ConfigError(
            f"{path}: architecture {name} is not supported by the torch engine "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in (None, "default", "linear", "llama3"):
        raise ConfigError(f"{path}: RoPE scaling {kind!r} is not supported by the torch engine")
    theta = config.get("rope_theta")
    if theta is None and isinstance(scaling, dict):
        theta = scaling.get("rope_theta")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        return ModelArch(
            family=family,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=int(window) if window else None,
            rope_scaling=scaling if isinstance(scaling, dict) and kind not in (None, "default") else None,
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: missing or malformed field {exc}") from None
