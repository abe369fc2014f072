"""A Triton paged-attention kernel for decode steps on CUDA.

One program per (sequence, KV head): it loads the queries of every attention head that shares the KV
head (GQA), walks the sequence's block table one KV block at a time straight from the paged cache
(no gather into contiguous memory), and keeps an online softmax (running max, running sum), so any
context length runs in one pass. Everything it reads is a tensor argument, so a decode step that uses
it can be captured in a CUDA graph. The kernel is our own; the technique is the one paged-attention
engines use.
"""

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]  # Triton reads these annotations itself
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    tables_ptr,
    lens_ptr,
    scale,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ts,
    stride_os,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, tl.cdiv(ctx, BLOCK)):
        block = tl.load(tables_ptr + seq * stride_ts + i).to(tl.int64)
        base = block * stride_kb + kv_head * stride_kh + t[:, None] * stride_kt + d[None, :]
        k = tl.load(k_ptr + base)
        v = tl.load(v_ptr + base)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where((i * BLOCK + t)[None, :] < ctx, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / total[:, None]
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None],
    )


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence ([S, heads, head_dim]) over its paged context.

    `k_cache`/`v_cache`: [num_blocks, block_size, kv_heads, head_dim]; `block_tables`: [S, width]
    int32; `context_lens`: [S] int32 (the new token included, its K/V already written).
    """
    seqs, heads, dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(seqs, kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        BLOCK=block,
        # float32 caches get exact (IEEE) products, as the SDPA path computes them; no TF32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
