"""A Triton matrix-vector product for batch-1 decode on CUDA, optionally with SiLU·up fused in.

A batch-1 decode step reads every weight once and does two FLOPs per weight: it runs at the speed
of the weight reads. cuBLAS picks GEMM tiles that are fine for the big MLP matrices but leave most of
an H200's 132 SMs idle on the small ones (q/k/v and o_proj of a 1B model: 32-48 tiles), which then
read at under half the memory bandwidth. Here one program reduces `BLOCK_N` whole weight rows,
`BLOCK_K` columns per iteration, so a 2048-row matrix spreads over hundreds of programs.

`gemv(x, w)` = `x @ w.T` for one row `x`. With `silu_mul=True`, `w` is `[gate | up]` stacked along
its rows and the result is SiLU(x @ gate.T) · (x @ up.T): the MLP's element-wise kernel folded into
the matmul's epilogue (a program reduces the same rows of both halves). Accumulates in float32;
stores in `out_dtype` (default: x's dtype). The kernel is our own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def choose(rows: int, k: int) -> GemvConfig:
    """Block sizes for a `[rows, k]` product, tuned with `benchmarks/gemv.py` with the weights cold
    in L2, as a decode step reads them: two rows per program (one for a vocabulary-sized lm_head),
    rows read 2,048 columns at a time, was best or as good as best on every shape of a 1B and an
    8B Llama."""
    block_k = next(b for b in (2048, 1024, 512, 256, 128, 64) if k % b == 0)
    return GemvConfig(block_n=1 if rows >= 65536 else 2, block_k=block_k, num_warps=4, num_stages=1)


@triton.jit  # type: ignore[untyped-decorator]  # Triton reads these annotations itself
def _gemv_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    norm_ptr,
    K,
    half_rows,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    rstd = 1.0
    if NORM:
        # RMSNorm of x in the prologue, as `triton_ops.rms_norm` computes it; x is a few KB and stays
        # in L2, so every program re-reading it costs far less than a kernel launch.
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + k0 + cols).to(tl.float32)
            squares += v * v
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_N], tl.float32)
    w_rows = w_ptr + rows[:, None] * K
    up_rows = w_ptr + (rows + half_rows)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + cols)
        if NORM:
            h = (x.to(tl.float32) * rstd).to(dtype)
            x = (h * tl.load(norm_ptr + k0 + cols)).to(dtype)
        xf = x.to(tl.float32)
        w = tl.load(w_rows + k0 + cols[None, :]).to(tl.float32)
        acc += tl.sum(w * xf[None, :], axis=1)
        if SILU_MUL:
            u = tl.load(up_rows + k0 + cols[None, :]).to(tl.float32)
            acc_up += tl.sum(u * xf[None, :], axis=1)
    if SILU_MUL:
        # SiLU on the gate as the unfused path computes it: each half rounded to the dtype first.
        g = acc.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        acc = g / (1.0 + tl.exp(-g)) * up
    if RESIDUAL:
        # out is the residual stream: out += x @ w.T, the product rounded first as a separate add
        # of two tensors would see it. Each program owns its rows, so the update is race-free.
        acc = tl.load(out_ptr + rows).to(tl.float32) + acc.to(dtype).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty))


def fits(rows: int, k: int) -> bool:
    """Whether a `[rows, k]` product tiles exactly: the kernel has no masks. The shapes of real
    models are multiples of these blocks; anything else keeps cuBLAS."""
    return rows % 2 == 0 and k % 64 == 0


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """`x` [1, K] (contiguous) times `w.T` ([N, K], contiguous) → [1, N] (or [1, N/2] with `silu_mul`).

    `norm`: RMSNorm x first with this weight (and `eps`). `residual` ([1, N]): add the product into it
    in place and return it (the residual stream's update after o_proj and down)."""
    n, k = w.shape
    rows = n // 2 if silu_mul else n
    cfg = config or choose(rows, k)
    if residual is not None:
        out = residual
    else:
        out = torch.empty((1, rows), dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(rows // cfg.block_n,)](
        x,
        w,
        out,
        norm if norm is not None else x,
        k,
        rows,
        eps,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        NORM=norm is not None,
        SILU_MUL=silu_mul,
        RESIDUAL=residual is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
