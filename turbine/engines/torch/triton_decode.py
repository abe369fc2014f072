"""A Triton paged-attention kernel for decode steps on CUDA.

One program per (sequence, KV head, split): it loads the queries of every attention head that shares
the KV head (GQA), walks its share of the sequence's block table one KV block at a time straight from
the paged cache (no gather into contiguous memory), and keeps an online softmax (running max, running
sum). Small batches split each context over several programs (split-K, "flash decoding"): a batch
of one sequence with 8 KV heads would otherwise run 8 programs on a GPU of 132 SMs, leaving most of
it idle for a large share of a small model's layer. A second kernel merges the splits' partial
softmaxes. The number of splits depends only on the batch shape, never on context lengths, and
everything read is a tensor argument, so a decode step that uses it can be captured in a CUDA graph.
The kernels are our own; the technique is the one paged-attention engines use.
"""

import torch
import triton
import triton.language as tl


# The block-table stride is a step's widest table, which grows with context: Triton would compile a
# variant per divisibility class of it on the request path.
@triton.jit(do_not_specialize=["stride_ts"])  # type: ignore[untyped-decorator]
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    part_ptr,
    stats_ptr,
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
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    num_blocks = tl.cdiv(ctx, BLOCK)
    per_split = tl.cdiv(num_blocks, SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)
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
    for i in range(first, last):
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
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_ok[:, None],
        )
    else:
        # Partials, unnormalised: part [S, heads, SPLITS, HEAD_DIM], stats [S, heads, SPLITS, 2] = (max, sum).
        # A split past the context's end keeps max = -inf and sum = 0, which the merge weighs as 0.
        row = (seq * tl.num_programs(1) * GROUP + heads) * SPLITS + split
        tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
        tl.store(stats_ptr + row * 2, m, mask=g_ok)
        tl.store(stats_ptr + row * 2 + 1, total, mask=g_ok)


@triton.jit  # type: ignore[untyped-decorator]
def _merge_splits_kernel(
    part_ptr, stats_ptr, out_ptr, stride_os, stride_oh, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq * tl.num_programs(1) + head) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(stats_ptr + row * 2)
    total = tl.load(stats_ptr + row * 2 + 1)
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :])
    m_all = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(total * w, 0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + tl.arange(0, HEAD_DIM),
        out.to(out_ptr.dtype.element_ty),
    )


def num_splits(seqs: int, kv_heads: int, width: int, sms: int) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU about twice, at most 16, never
    more than the block-table width, a power of two (the merge kernel's arange needs one)."""
    want = -(-2 * sms // max(seqs * kv_heads, 1))
    splits = 1
    while splits * 2 <= min(want, 16, width):
        splits *= 2
    return splits


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence ([S, heads, head_dim]) over its paged context.

    `k_cache`/`v_cache`: [num_blocks, block_size, kv_heads, head_dim]; `block_tables`: [S, width]
    int32; `context_lens`: [S] int32 (the new token included, its K/V already written). `splits`
    (a power of two) overrides the split-K choice.
    """
    seqs, heads, dim = q.shape
    _, block, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if splits is None:
        splits = num_splits(seqs, kv_heads, block_tables.shape[1], sms)
    part = stats = out  # unused when there is one split
    if splits > 1:
        part = torch.empty((seqs, heads, splits, dim), dtype=torch.float32, device=q.device)
        stats = torch.empty((seqs, heads, splits, 2), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(seqs, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        part,
        stats,
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
        SPLITS=splits,
        # float32 caches get exact (IEEE) products, as the SDPA path computes them; no TF32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if splits > 1:
        _merge_splits_kernel[(seqs, heads)](
            part, stats, out, out.stride(0), out.stride(1), SPLITS=splits, HEAD_DIM=dim
        )
    return out
