"""Our own forward pass of the Llama family (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Written functionally over plain tensors: q/k/v and gate/up projections are fused into one matmul
each (fewer, larger GEMMs), RMSNorm and RoPE follow `transformers`' definitions to the operation, so
float32 outputs match it token for token (the tests use `transformers` as the oracle). A step is a
flat batch of tokens from many sequences — prefill chunks and decodes mixed — with positions and
cache slots given per token; see `attention.py` for the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from turbine.engines.torch import q4
from turbine.engines.torch.arch import ModelArch
from turbine.engines.torch.attention import AttnMeta, attend, write_kv
from turbine.engines.torch.linear import Linear, packs

log = logging.getLogger(__name__)


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """Weights plus the forward. Not thread-safe: one runner thread calls `forward` at a time."""

    def __init__(
        self,
        arch: ModelArch,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        *,
        fused: bool | None = None,
        q4_blocks: dict[str, q4.Blocks] | None = None,
        q4_max_rows: int = 0,
        q4_kernel: q4.Q4Kernel = q4.Q4Weight,
        cpu_kernels: bool = False,
    ) -> None:
        """`fused`: use the Triton kernels of `triton_ops` (default: on CUDA, where they apply).
        `cpu_kernels`: on CPU, Turbine's kernels are loaded (`cpu_kernels.py`): the forward runs
        fused with their element-wise ops, as on CUDA with Triton's.
        `q4_blocks`: 4-bit blocks of linear weights by checkpoint name (a GGUF's, `q4.py`); where
        `q4.applies`, each linear whose parts all have them uses them for inputs of at most
        `q4_max_rows` rows, through `q4_kernel` (torch's int4 kernel unless told otherwise)."""
        self.arch = arch
        self.device = device
        self.fused = _fused_ops_apply(arch, device) if fused is None else fused
        self._ops: FusedOps | None = None
        if device.type == "cpu" and cpu_kernels and not arch.qk_norm:
            from turbine.engines.torch import cpu_kernels as cpu_ops

            self.fused, self._ops = True, cpu_ops
        elif self.fused:
            from turbine.engines.torch import triton_ops

            self._ops = triton_ops

        def take(name: str) -> torch.Tensor:
            try:
                return weights.pop(name).to(device)
            except KeyError:
                raise ValueError(f"checkpoint has no tensor {name!r}") from None

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        self.embed = take("model.embed_tokens.weight")
        dtype = self.embed.dtype
        pack = packs(device, dtype)
        small = (q4_blocks or {}) if q4_max_rows > 0 and q4.applies(device, dtype) else {}

        def linear(names: list[str], weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            blocks = [small.get(n) for n in names]
            quarter = None
            if blocks and all(b is not None for b in blocks):
                try:
                    quarter = q4_kernel(q4.concat([b for b in blocks if b is not None]), dtype)
                except RuntimeError as exc:  # a shape the kernel's packing refuses: dense only
                    log.warning("%s stays dequantized only: %s", names[0], exc)
            return Linear(weight, bias, pack=pack, q4=quarter, q4_max_rows=q4_max_rows)

        self.layers: list[Layer] = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            q, k, v = take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")
            bias = None
            if arch.attention_bias:
                bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
            qkv_names = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
            gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            self.layers.append(
                Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=linear(qkv_names, torch.cat([q, k, v]), bias),
                    q_norm=maybe(a + "q_norm.weight") if arch.qk_norm else None,
                    k_norm=maybe(a + "k_norm.weight") if arch.qk_norm else None,
                    o_proj=linear([a + "o_proj.weight"], take(a + "o_proj.weight")),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=linear(gate_up, torch.cat([take(n) for n in gate_up])),
                    down=linear([p + "mlp.down_proj.weight"], take(p + "mlp.down_proj.weight")),
                )
            )
            del q, k, v
        self.norm = take("model.norm.weight")
        lm_head = maybe("lm_head.weight")
        tied = lm_head is None or arch.tie_word_embeddings
        self.lm_head = (
            Linear(self.embed, pack=pack) if lm_head is None or tied else linear(["lm_head.weight"], lm_head)
        )
        self._tied = tied
        self.dtype = dtype
        inv_freq = torch.tensor(arch.inv_freq(), dtype=torch.float32, device=device)
        self._inv_freq = inv_freq
        self.scale = arch.head_dim**-0.5
        self._gemv = self.fused and device.type == "cuda" and _gemv_applies(self)

    def q4_bytes(self) -> int:
        """Bytes of the 4-bit copies of weights, if any (held besides the weights)."""
        linears = [self.lm_head, *(p for layer in self.layers for p in vars(layer).values())]
        return sum(p.q4_nbytes for p in linears if isinstance(p, Linear))

    def weight_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.embed, self.norm))
        if not self._tied:
            total += self.lm_head.nbytes
        for layer in self.layers:
            for part in vars(layer).values():
                if isinstance(part, Linear):
                    total += part.nbytes
                elif part is not None:
                    total += part.numel() * part.element_size()
        return total

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
        """cos and sign-folded sin per position, [T, head_dim], as transformers computes them (float32,
        then cast). The sin's first half is negated so that `rotate_half(x) * sin` becomes
        `x.roll(half) * sin`: one operation fewer per use, and bit-identical (a sign flip is exact)."""
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMeta,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden], for the step's flat token batch."""
        if self.fused:
            return self._forward_fused(input_ids, positions, kv_cache, meta)
        a = self.arch
        n = input_ids.shape[0]
        cos, sin = self.rope(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]
        half = a.head_dim // 2
        heads = a.num_heads
        x = F.embedding(input_ids, self.embed)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            h = rms_norm(x, layer.input_norm, a.rms_norm_eps)
            qkv = layer.qkv(h)
            v = qkv[:, a.q_size + a.kv_size :].view(n, a.num_kv_heads, a.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q = rms_norm(qkv[:, : a.q_size].view(n, heads, a.head_dim), layer.q_norm, a.rms_norm_eps)
                k = rms_norm(
                    qkv[:, a.q_size : a.q_size + a.kv_size].view(n, -1, a.head_dim),
                    layer.k_norm,
                    a.rms_norm_eps,
                )
                qk = torch.cat([q, k], dim=1)
            else:
                qk = qkv[:, : a.q_size + a.kv_size].view(n, heads + a.num_kv_heads, a.head_dim)
            # RoPE on q and k together: half the element-wise calls of rotating them one by one.
            qk = qk * cos + qk.roll(half, -1) * sin
            q, k = qk[:, :heads], qk[:, heads:]
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            o = attend(q, k_cache, v_cache, meta, self.scale)
            x += layer.o_proj(o.reshape(n, a.q_size))  # x is this forward's own tensor: add in place
            h = rms_norm(x, layer.post_norm, a.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x += layer.down(F.silu(gate) * up)
        return rms_norm(x, self.norm, a.rms_norm_eps)

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMeta,
    ) -> torch.Tensor:
        """The same computation with the element-wise work in fused kernels (Triton's on CUDA,
        Turbine's C++ ones on CPU)."""
        ops = self._ops
        assert ops is not None
        a = self.arch
        n = input_ids.shape[0]
        eps = a.rms_norm_eps
        if n == 1 and self._gemv:
            return self._forward_one(input_ids, positions, kv_cache, meta)
        x = F.embedding(input_ids, self.embed)  # the residual stream, updated in place
        delta: torch.Tensor | None = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            h = ops.rms_norm(x, layer.input_norm, eps, residual=delta)
            qkv = layer.qkv(h)
            q = ops.rope_and_cache(
                qkv, positions, self._inv_freq, k_cache, v_cache, meta.slot_mapping,
                a.num_heads, a.num_kv_heads, a.head_dim,
            )  # fmt: skip
            o = attend(q, k_cache, v_cache, meta, self.scale)
            delta = layer.o_proj(o.view(n, a.q_size))
            h = ops.rms_norm(x, layer.post_norm, eps, residual=delta)
            delta = layer.down(ops.silu_mul(layer.gate_up(h)))
        return ops.rms_norm(x, self.norm, eps, residual=delta)

    def _forward_one(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttnMeta,
    ) -> torch.Tensor:
        """One token (a batch-1 decode step): every matmul is a GEMV that also does the element-wise
        work around it (the norm before, SiLU·up or the residual add after), 7 kernels a layer."""
        from turbine.engines.torch import triton_ops as ops
        from turbine.engines.torch.triton_gemv import gemv

        a = self.arch
        eps = a.rms_norm_eps
        x = F.embedding(input_ids, self.embed)  # the residual stream, updated in place
        for layer, (k_cache, v_cache) in zip(self.layers, kv_cache, strict=True):
            qkv = gemv(x, _plain(layer.qkv), norm=layer.input_norm, eps=eps)
            q = ops.rope_and_cache(
                qkv, positions, self._inv_freq, k_cache, v_cache, meta.slot_mapping,
                a.num_heads, a.num_kv_heads, a.head_dim,
            )  # fmt: skip
            o = attend(q, k_cache, v_cache, meta, self.scale)
            gemv(o.view(1, a.q_size), _plain(layer.o_proj), residual=x)
            act = gemv(x, _plain(layer.gate_up), norm=layer.post_norm, eps=eps, silu_mul=True)
            gemv(act, _plain(layer.down), residual=x)
        return ops.rms_norm(x, self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the given rows of hidden states."""
        if hidden.shape[0] == 1 and self._gemv:
            from turbine.engines.torch.triton_gemv import gemv

            return gemv(hidden, _plain(self.lm_head), out_dtype=torch.float32)
        return self.lm_head(hidden).float()


class FusedOps(Protocol):
    """The fused element-wise kernels of a layer: `triton_ops` (CUDA) or `cpu_kernels` (CPU)."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...


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


def _gemv_applies(model: LlamaModel) -> bool:
    """The batch-1 GEMV path covers bias-free layers whose shapes tile exactly."""
    from turbine.engines.torch.triton_gemv import fits

    if model.arch.attention_bias:
        return False
    shapes = [_plain(model.lm_head).shape]
    for layer in model.layers:
        shapes += [_plain(layer.qkv).shape, _plain(layer.o_proj).shape, _plain(layer.down).shape]
        rows, k = _plain(layer.gate_up).shape
        shapes.append(torch.Size([rows // 2, k]))
    return all(fits(rows, k) for rows, k in shapes)


def _plain(linear: Linear) -> torch.Tensor:
    """The `[out, in]` weight of a linear that is not pre-packed (CUDA never packs)."""
    assert linear.weight is not None
    return linear.weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, scale in the input dtype."""
    # F.rms_norm computes the same float32 expression in one call (bit-identical, checked in tests).
    # On CPU it also upcasts a bfloat16 input itself and rounds the result back once, exactly as the
    # explicit casts do (checked in tests): two operations fewer per norm, ~60 per decode step.
    if x.device.type == "cpu":
        return weight * F.rms_norm(x, x.shape[-1:], eps=eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
