"""Paged attention: KV-cache layout, per-step metadata, and the attention call itself.

The KV cache of a layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`; a token's
KV lives at slot `block * block_size + offset`, where the block comes from its sequence's block table
(`turbine.engines.core.block_manager`). Each step first writes the new tokens' K and V at their slots
(`write_kv`), then every query attends over its sequence's slots (`attend`) — so a sequence admitted
on a prefix another sequence computes in the same step reads those blocks after they are written.

Two paths:
- Prefill chunks (and every sequence on CPU): gather the sequence's context from its blocks and call
  `scaled_dot_product_attention`, causal with the cached prefix in front.
- Decode batches on CUDA: one Triton kernel reads K/V straight from the blocks
  (`triton_decode.paged_decode`), no gather, and can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PagedDecode = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]
"""(q, k_cache, v_cache, block_tables, context_lens, scale) -> attention output, like q."""


@dataclass
class SeqAttn:
    """One sequence's share of a step."""

    q_start: int
    """First row of this sequence's new tokens in the step's flattened batch."""
    q_len: int
    """New tokens this step."""
    ctx_len: int
    """Tokens attended in total: cached/computed before this step plus the new ones."""
    slots: torch.Tensor
    """Cache slots of all `ctx_len` tokens, in order (long, on the cache's device)."""
    mask: torch.Tensor | None
    """Boolean [q_len, ctx_len] (True = attend), or None when `causal` or a single query says it all."""
    causal: bool
    """No cached prefix: plain causal attention over the new tokens."""


@dataclass
class DecodeBatch:
    """Sequences decoding one token each, laid out for the paged decode kernel (Triton's on CUDA,
    Turbine's on CPU)."""

    rows: torch.Tensor | None
    """Rows of these sequences' tokens in the step's flattened batch (long); None: every row."""
    block_tables: torch.Tensor
    """[n, max_blocks] int32, padded with 0."""
    context_lens: torch.Tensor
    """[n] int32: tokens each attends to, its new one included."""


@dataclass
class PrefillBatch:
    """Sequences computing several new tokens (or a window-limited one), laid out for the paged
    prefill kernel (`triton_prefill.py`, CUDA): one launch per layer for all of them."""

    q_starts: torch.Tensor
    """[n] int32: each sequence's first row in the step's flattened batch."""
    q_lens: torch.Tensor
    """[n] int32: new tokens per sequence."""
    ctx_lens: torch.Tensor
    """[n] int32: tokens each attends to in total (cached + new)."""
    block_tables: torch.Tensor
    """[n, max_blocks] int32, padded with 0."""
    max_q_len: int
    window: int | None


@dataclass
class GatheredDecode:
    """Sequences decoding one token each, served by one padded SDPA call (the CPU path): one call
    per layer instead of one per sequence."""

    rows: torch.Tensor | None
    """Rows of these sequences' tokens in the step's flattened batch (long); None: every row."""
    blocks: torch.Tensor
    """[n, most blocks] block tables (long), padded with block 0 (masked out)."""
    mask: torch.Tensor
    """[n, 1, 1, most blocks × block size] additive, in the compute dtype: 0 where a key is attended,
    -inf where not. SDPA turns a boolean mask into exactly this on every call; built once per step
    instead, the 30-odd layers of a step skip that conversion (bit-identical results)."""


@dataclass
class AttnMeta:
    """Everything a layer needs to read and write the cache for one step; built once per step."""

    slot_mapping: torch.Tensor
    """Where each new token's K/V goes, one slot per row of the flattened batch (long)."""
    seqs: list[SeqAttn]
    """Sequences served by gather + SDPA, in batch order."""
    decode: DecodeBatch | None = None
    """Sequences served by the paged decode kernel, if any."""
    gathered: GatheredDecode | None = None
    """Sequences decoding together through one padded SDPA call, if any."""
    prefill: PrefillBatch | None = None
    """Sequences served by the paged prefill kernel (instead of `seqs`), if any."""


def build_meta(
    chunks: list[tuple[list[int], int, int]],
    block_size: int,
    device: torch.device,
    *,
    sliding_window: int | None = None,
    decode_kernel: bool = False,
    gather_decodes: bool = False,
    dtype: torch.dtype = torch.float32,
    prefill_kernel: bool = False,
) -> AttnMeta:
    """Metadata of a step from `(block_table, num_computed, num_new)` per sequence, in batch order.

    With `decode_kernel`, single-token chunks go to `AttnMeta.decode` instead of the SDPA path;
    with `gather_decodes` (and no sliding window), several of them go to one padded SDPA call, whose
    mask is built in `dtype` (the model's compute dtype). With `prefill_kernel`, every other chunk
    goes to `AttnMeta.prefill`.
    """
    slot_rows: list[int] = []
    seqs: list[SeqAttn] = []
    dec_rows: list[int] = []
    dec_tables: list[list[int]] = []
    dec_lens: list[int] = []
    pre: list[tuple[int, int, int, list[int]]] = []
    row = 0
    gather = gather_decodes and sliding_window is None and sum(1 for c in chunks if c[2] == 1) > 1
    for table, num_computed, num_new in chunks:
        ctx = num_computed + num_new
        _append_slots(slot_rows, table, num_computed, ctx, block_size)
        if (decode_kernel or gather) and num_new == 1 and sliding_window is None:
            dec_rows.append(row)
            dec_tables.append(table[: -(-ctx // block_size)])
            dec_lens.append(ctx)
        elif prefill_kernel:
            pre.append((row, num_new, ctx, table[: -(-ctx // block_size)]))
        else:
            seqs.append(_seq_attn(table, num_computed, num_new, row, block_size, device, sliding_window))
        row += num_new
    slot_mapping = torch.tensor(slot_rows, dtype=torch.long, device=device)
    if gather and dec_rows:
        rows = None if len(dec_rows) == row else dec_rows
        return AttnMeta(
            slot_mapping, seqs, gathered=_gathered(rows, dec_tables, dec_lens, block_size, device, dtype)
        )
    decode = None
    if dec_rows:
        width = max(len(t) for t in dec_tables)
        padded = [t + [0] * (width - len(t)) for t in dec_tables]
        decode = DecodeBatch(
            # A step of decodes alone needs no gather of its rows or scatter of their output.
            rows=None if len(dec_rows) == row else torch.tensor(dec_rows, dtype=torch.long, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            context_lens=torch.tensor(dec_lens, dtype=torch.int32, device=device),
        )
    prefill = _prefill_batch(pre, device, sliding_window) if pre else None
    return AttnMeta(slot_mapping, seqs, decode, prefill=prefill)


def _append_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """The cache slots of positions `start`..`end` - 1, a block's run at a time (a step's prefill
    tokens are thousands: one Python iteration per token is host time every step pays)."""
    pos = start
    while pos < end:
        block, offset = divmod(pos, block_size)
        run = min(block_size - offset, end - pos)
        base = table[block] * block_size + offset
        slots.extend(range(base, base + run))
        pos += run


def _prefill_batch(
    pre: list[tuple[int, int, int, list[int]]], device: torch.device, window: int | None
) -> PrefillBatch:
    width = max(len(t) for *_, t in pre)
    n = len(pre)
    # One host tensor, one transfer: [starts | lens | ctx | tables], each part starting 16 bytes in
    # (Triton compiles a variant per pointer alignment).
    m = -(-n // 4) * 4
    host = torch.zeros(3 * m + n * width, dtype=torch.int32)
    host[0:n] = torch.tensor([p[0] for p in pre], dtype=torch.int32)
    host[m : m + n] = torch.tensor([p[1] for p in pre], dtype=torch.int32)
    host[2 * m : 2 * m + n] = torch.tensor([p[2] for p in pre], dtype=torch.int32)
    tables = host[3 * m :].view(n, width)
    for i, (*_, table) in enumerate(pre):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    dev = host.to(device, non_blocking=True)
    return PrefillBatch(
        q_starts=dev[0:n],
        q_lens=dev[m : m + n],
        ctx_lens=dev[2 * m : 2 * m + n],
        block_tables=dev[3 * m :].view(n, width),
        max_q_len=max(p[1] for p in pre),
        window=window,
    )


def _gathered(
    rows: list[int] | None,
    tables: list[list[int]],
    lens: list[int],
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> GatheredDecode:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    masked = torch.arange(width * block_size)[None, :] >= torch.tensor(lens)[:, None]
    mask = torch.zeros(masked.shape, dtype=dtype).masked_fill_(masked, float("-inf"))
    return GatheredDecode(
        rows=None if rows is None else torch.tensor(rows, dtype=torch.long, device=device),
        blocks=padded.to(device),
        mask=mask[:, None, None, :].to(device),
    )


def _seq_attn(
    table: list[int],
    num_computed: int,
    num_new: int,
    row: int,
    block_size: int,
    device: torch.device,
    window: int | None,
) -> SeqAttn:
    ctx = num_computed + num_new
    blocks = torch.tensor(table[: -(-ctx // block_size)], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
    causal = num_computed == 0 and (window is None or ctx <= window)
    mask = None
    if not causal and (num_new > 1 or (window is not None and ctx > window)):
        q_pos = torch.arange(num_computed, ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        mask = allowed.to(device)
    return SeqAttn(row, num_new, ctx, slots.to(device), mask, causal)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store the step's new K/V ([T, kv_heads, head_dim]) at their slots."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k)
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v)


def attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float
) -> torch.Tensor:
    """Attention of every new token ([T, heads, head_dim]) over its sequence's cached context."""
    g = meta.gathered
    if g is not None and g.rows is None:  # a pure decode step: no scatter into a step-wide output
        return _attend_gathered(q, k_cache, v_cache, g, scale)
    out = torch.empty_like(q)
    if meta.prefill is not None:
        from turbine.engines.torch.triton_prefill import paged_prefill

        p = meta.prefill
        paged_prefill(
            q,
            k_cache,
            v_cache,
            out,
            p.q_starts,
            p.q_lens,
            p.ctx_lens,
            p.block_tables,
            p.max_q_len,
            scale,
            p.window,
        )
    heads, dim = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, heads, dim)
    v_flat = v_cache.view(-1, heads, dim)
    for s in meta.seqs:
        ks = k_flat.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)
        vs = v_flat.index_select(0, s.slots).transpose(0, 1).unsqueeze(0)
        if s.q_len == 1 and s.mask is None:  # a lone decode: grouped query heads, as below
            o = _grouped_sdpa(q[s.q_start : s.q_start + 1], ks, vs, None, scale)
            out[s.q_start] = o[0]
            continue
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=s.mask, is_causal=s.causal and s.q_len > 1, scale=scale, enable_gqa=True
        )
        out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    if g is not None:
        assert g.rows is not None
        out[g.rows] = _attend_gathered(q.index_select(0, g.rows), k_cache, v_cache, g, scale)
    if meta.decode is not None:
        paged_decode = _paged_decode(q.device)
        d = meta.decode
        if d.rows is None:  # a pure decode step: no gather, no scatter
            return paged_decode(q, k_cache, v_cache, d.block_tables, d.context_lens, scale)
        out[d.rows] = paged_decode(q[d.rows], k_cache, v_cache, d.block_tables, d.context_lens, scale)
    return out


def _paged_decode(device: torch.device) -> PagedDecode:
    """The paged decode kernel for `device`: Triton's on CUDA, Turbine's C++ one on CPU."""
    if device.type == "cpu":
        from turbine.engines.torch.cpu_kernels import paged_decode as on_cpu

        return on_cpu
    from turbine.engines.torch.triton_decode import paged_decode as on_cuda

    return on_cuda


def _attend_gathered(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: GatheredDecode, scale: float
) -> torch.Tensor:
    """One padded SDPA call for single-token queries ([n, heads, head_dim]) over their contexts."""
    n, width = g.blocks.shape
    heads, dim = k_cache.shape[-2:]
    # Whole blocks, not single slots: one contiguous copy of block_size tokens per index, which is
    # several times faster on CPU than a slot-by-slot gather (and 2-D fancy indexing is slower still).
    flat = g.blocks.view(-1)
    length = width * k_cache.shape[1]
    kd = k_cache.index_select(0, flat).view(n, length, heads, dim).transpose(1, 2)  # [n, kv, L, dim]
    vd = v_cache.index_select(0, flat).view(n, length, heads, dim).transpose(1, 2)
    return _grouped_sdpa(q, kd, vd, g.mask, scale)


def _grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one query token per sequence (q [n, heads, dim]) over k, v [n, kv_heads, L, dim].

    The query heads sharing a KV head become that head's query rows ([n, kv_heads, group, dim]), so
    SDPA reads each KV head once for its whole group, where `enable_gqa` with one query row per head
    expands K and V per query head: faster per call on CPU (`benchmarks/results/cpu_attention.md`).
    Same math; rows are computed independently, so only float rounding can differ."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    o = F.scaled_dot_product_attention(
        q.view(n, kv_heads, heads // kv_heads, dim), k, v, attn_mask=mask, scale=scale
    )
    return o.view(n, heads, dim)
