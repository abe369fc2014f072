"""Our own forward pass of the Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Written functionally over plain tensors: q/k/v and gate/up projections are fused into one matmul
each (fewer, larger GEMMs), RMSNorm and RoPE follow `transformers`' definitions to the operation, so
float32 outputs match it token for token (the tests use `transformers` as the oracle). A step is a
flat batch of tokens from many sequences — prefill chunks and decodes mixed — with positions and
cache slots given per token; see `attention.py` for the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbine.engines.torch.arch import ModelArch
from turbine.engines.torch.attention import AttnMeta, attend, write_kv


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class LlamaModel:
    """Weights plus the forward. Not thread-safe: one runner thread calls `forward` at a time."""

    def __init__(
        self,
        arch: ModelArch,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        *,
        fused: bool | None = None,
    ) -> None:
        """`fused`: use the Triton kernels of `triton_ops` (default: on CUDA, where they apply)."""
        self.arch = arch
        self.device = device
        self.fused = _fused_ops_apply(arch, device) if fused is None else fused

        def take(name: str) -> torch.Tensor:
            try:
                return weights.pop(name).to(device)
            except KeyError:
                raise ValueError(f"checkpoint has no tensor {name!r}") from None

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        self.embed = take("model.embed_tokens.weight")
        self.layers: list[Layer] = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            q, k, v = take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")
            bias = None
            if arch.attention_bias:
                bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
            self.layers.append(
                Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=torch.cat([q, k, v]),
                    qkv_bias=bias,
                    q_norm=maybe(a + "q_norm.weight") if arch.qk_norm else None,
                    k_norm=maybe(a + "k_norm.weight") if arch.qk_norm else None,
                    o_proj=take(a + "o_proj.weight"),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )
            del q, k, v
        self.norm = take("model.norm.weight")
        lm_head = maybe("lm_head.weight")
        self.lm_head = self.embed if lm_head is None or arch.tie_word_embeddings else lm_head
        self.dtype = self.embed.dtype
        inv_freq = torch.tensor(arch.inv_freq(), dtype=torch.float32, device=device)
        self._inv_freq = inv_freq
        self.scale = arch.head_dim**-0.5

    def weight_bytes(self) -> int:
        tensors = [self.embed, self.norm]
        if self.lm_head is not self.embed:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def new_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.arch
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(a.num_layers)
        ]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per position, [T, head_dim], as transformers computes them (float32, then cast)."""
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMeta,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for the step's flat token batch."""
        if self.fused:
            return self._forward_fused(input_ids, positions, kv_cache, meta)
        a = self.arch
        n = input_ids.shape[0]
        cos, sin = cos_sin if cos_sin is not None else self.rope(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            h = rms_norm(x, layer.input_norm, a.rms_norm_eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q = qkv[:, : a.q_size].view(n, a.num_heads, a.head_dim)
            k = qkv[:, a.q_size : a.q_size + a.kv_size].view(n, a.num_kv_heads, a.head_dim)
            v = qkv[:, a.q_size + a.kv_size :].view(n, a.num_kv_heads, a.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = rms_norm(q, layer.q_norm, a.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, a.rms_norm_eps)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            write_kv(k_cache, v_cache, k, v.contiguous(), meta.slot_mapping)
            o = attend(q, k_cache, v_cache, meta, self.scale)
            x = x + F.linear(o.view(n, a.q_size), layer.o_proj)
            h = rms_norm(x, layer.post_norm, a.rms_norm_eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return rms_norm(x, self.norm, a.rms_norm_eps)

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMeta,
    ) -> torch.Tensor:
        """The same computation with the element-wise work in fused Triton kernels (CUDA)."""
        from turbine.engines.torch import triton_ops as ops

        a = self.arch
        n = input_ids.shape[0]
        eps = a.rms_norm_eps
        x = F.embedding(input_ids, self.embed)  # the residual stream, updated in place
        delta: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            h = ops.rms_norm(x, layer.input_norm, eps, residual=delta)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q = ops.rope_and_cache(
                qkv, positions, self._inv_freq, k_cache, v_cache, meta.slot_mapping,
                a.num_heads, a.num_kv_heads, a.head_dim,
            )  # fmt: skip
            o = attend(q, k_cache, v_cache, meta, self.scale)
            delta = F.linear(o.view(n, a.q_size), layer.o_proj)
            h = ops.rms_norm(x, layer.post_norm, eps, residual=delta)
            delta = F.linear(ops.silu_mul(F.linear(h, layer.gate_up)), layer.down)
        return ops.rms_norm(x, self.norm, eps, residual=delta)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the given rows of hidden states."""
        return F.linear(hidden, self.lm_head).float()


def _fused_ops_apply(arch: ModelArch, device: torch.device) -> bool:
    """The fused kernels cover RoPE on power-of-two half head dims and no per-head q/k norm."""
    if device.type != "cuda" or arch.qk_norm:
        return False
    half = arch.head_dim // 2
    if half & (half - 1):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, scale in the input dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
