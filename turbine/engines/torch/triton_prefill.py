"""Paged prefill attention on CUDA: every prefill chunk of a step in one Triton launch, reading K/V
straight from the cache blocks.

One program computes `BLOCK_M` query rows of one sequence for one query head, walking its context
one cache block at a time (online softmax, fp32 accumulation): causal within the new tokens, with
the cached prefix in front, and a sliding window where the model has one. Nothing depends on the
prompt's length but the grid, so a new length never compiles anything: the kernel is compiled once,
at start-up (`warm_up`), for the model's head layout. The alternative it replaces gathered each
sequence's context and called SDPA once per sequence, whose cuDNN backend builds an execution plan
for every new shape on Hopper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64
"""Query rows per program."""


def supported(block_size: int, head_dim: int) -> bool:
    """Shapes the kernel takes: a cache block and the head dim are powers of two of 16 or more."""

    def pow2(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0

    return pow2(block_size) and pow2(head_dim) and head_dim <= 256


@triton.jit(do_not_specialize=["table_stride", "window"])  # type: ignore[untyped-decorator]
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    q_start_ptr,
    q_len_ptr,
    ctx_len_ptr,
    tables_ptr,
    table_stride,
    scale,
    window,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    if m_block * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_len_ptr + seq)
    prefix = ctx - q_len
    kv_head = head // (HEADS // KV_HEADS)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM)
    valid = rows < q_len
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + (q_rows[:, None] * HEADS + head) * DIM + dims[None, :], mask=valid[:, None], other=0.0
    )
    q_pos = prefix + rows
    # A finite floor: a row whose first tiles are all masked (sliding window) adds exp(-inf) = 0 and
    # keeps alpha = 1, instead of -inf - -inf = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM], dtype=tl.float32)
    hi = tl.minimum(ctx, prefix + (m_block + 1) * BLOCK_M)
    # With a window, the tiles before the first row's window hold nothing any row of this program sees.
    first = tl.maximum(prefix + m_block * BLOCK_M - window + 1, 0) // BLOCK * BLOCK
    lo = tl.where(window > 0, first, 0)
    offs = tl.arange(0, BLOCK)
    for start in range(lo, hi, BLOCK):
        page = tl.load(tables_ptr + seq * table_stride + start // BLOCK).to(tl.int64)
        slots = page * BLOCK + offs
        kv_off = (slots[:, None] * KV_HEADS + kv_head) * DIM + dims[None, :]
        k = tl.load(k_cache_ptr + kv_off)
        qk = tl.dot(q, tl.trans(k)) * scale
        k_pos = start + offs
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < ctx)
        if window > 0:
            keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    dst = out_ptr + (q_rows[:, None] * HEADS + head) * DIM + dims[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_q_len: int,
    scale: float,
    window: int | None,
) -> None:
    """Attention of each sequence's new rows of `q` ([T, heads, dim]) over its cached context, written
    into the same rows of `out`. Per sequence (int32 on the device): its first row in `q`, its new
    tokens, the tokens it attends in total (cached + new), and its block table ([n, max_blocks])."""
    heads, dim = q.shape[1], q.shape[2]
    block, kv_heads = k_cache.shape[1], k_cache.shape[2]
    grid = (q_lens.shape[0], triton.cdiv(max_q_len, BLOCK_M), heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        q_starts,
        q_lens,
        ctx_lens,
        block_tables,
        block_tables.stride(0),
        scale,
        window or 0,
        HEADS=heads,
        KV_HEADS=kv_heads,
        DIM=dim,
        BLOCK=block,
        BLOCK_M=BLOCK_M,
    )
