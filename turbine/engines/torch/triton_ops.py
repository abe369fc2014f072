"""Fused Triton kernels for the CUDA forward: fewer, larger kernels per layer.

A decode step of a small batch runs at the speed of its kernel count rather than its arithmetic:
written with plain torch ops a layer is ~36 kernels (RMSNorm alone is seven: cast, square, mean,
add, rsqrt, multiply, cast). These three fuse the element-wise parts:

- `rms_norm(x, w, eps, residual)`: optionally `x += residual` first (returning the sum as the new
  residual stream), then RMSNorm, in one pass over each row.
- `rope_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, ...)`: RoPE on q and k (cos/sin
  computed in the kernel from the position) and the K/V cache write, in one kernel; returns q.
- `silu_mul(gate_up)`: SiLU(gate) · up for the MLP.

All math is in float32, stored in the tensor's dtype. The kernels are our own.
"""

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * n + cols, x.to(x_ptr.dtype.element_ty), mask=ok)
    var = tl.sum(x * x, axis=0) / n
    h = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * n + cols, (h * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of each row of `x` ([rows, n], contiguous). With `residual`, `x` is first updated in
    place to `x + residual` (the residual stream), and the norm is of that sum."""
    rows, n = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _rope_cache_kernel(
    qkv_ptr,
    pos_ptr,
    inv_freq_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    qkv_stride,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dim = 2 * HALF
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i)
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    row = qkv_ptr + tok * qkv_stride
    if head < HEADS:
        src = row + head * dim
        a = tl.load(src + i).to(tl.float32)
        b = tl.load(src + HALF + i).to(tl.float32)
        dst = q_out_ptr + (tok * HEADS + head) * dim
        tl.store(dst + i, (a * cos - b * sin).to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, (b * cos + a * sin).to(q_out_ptr.dtype.element_ty))
    else:
        kv = head - HEADS
        slot = tl.load(slots_ptr + tok).to(tl.int64)
        src = row + (HEADS + kv) * dim
        a = tl.load(src + i).to(tl.float32)
        b = tl.load(src + HALF + i).to(tl.float32)
        dst = k_cache_ptr + (slot * KV_HEADS + kv) * dim
        tl.store(dst + i, (a * cos - b * sin).to(k_cache_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, (b * cos + a * sin).to(k_cache_ptr.dtype.element_ty))
        vsrc = row + (HEADS + KV_HEADS + kv) * dim
        vdst = v_cache_ptr + (slot * KV_HEADS + kv) * dim
        tl.store(vdst + i, tl.load(vsrc + i))
        tl.store(vdst + HALF + i, tl.load(vsrc + HALF + i))


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """q with RoPE applied ([T, heads, head_dim]); K (with RoPE) and V written at `slots` of the cache."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(tokens, heads + kv_heads)](
        qkv,
        positions,
        inv_freq,
        q,
        k_cache,
        v_cache,
        slots,
        qkv.stride(0),
        HEADS=heads,
        KV_HEADS=kv_heads,
        HALF=head_dim // 2,
    )
    return q


@triton.jit  # type: ignore[untyped-decorator]
def _silu_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(x_ptr + row * 2 * n + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n + n + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up for `gate_up` = [gate | up] along the last dim ([T, 2n] → [T, n])."""
    tokens, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(tokens, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
