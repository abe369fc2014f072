"""The CPU forward's shortcuts: exactly what the plain expressions compute (bit for bit where the
shortcut only reorders work, within float rounding where the kernel sees another layout)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.model import rms_norm


def transformers_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, spelled out."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_transformers_rms_norm_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for scale in (1e-3, 1.0, 50.0):
        x = (torch.randn(9, 576) * scale).to(dtype)
        w = torch.rand(576).to(dtype)
        assert torch.equal(rms_norm(x, w, 1e-5), transformers_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_decode_mask_is_additive_and_attends_like_a_boolean_mask(dtype: torch.dtype) -> None:
    block, heads, kv_heads, dim = 4, 6, 2, 8
    tables = [[3, 1], [0], [2, 4]]
    lens = [7, 2, 5]
    meta = build_meta(
        [(t, n - 1, 1) for t, n in zip(tables, lens, strict=True)],
        block,
        torch.device("cpu"),
        gather_decodes=True,
        dtype=dtype,
    )
    g = meta.gathered
    assert g is not None and g.rows is None
    assert g.mask.dtype == dtype and g.mask.shape == (3, 1, 1, 8)
    attended = torch.arange(8)[None, :] < torch.tensor(lens)[:, None]
    assert torch.equal(g.mask[:, 0, 0] == 0, attended)
    assert bool(torch.isneginf(g.mask[:, 0, 0][~attended]).all())
    torch.manual_seed(1)
    q = torch.randn(3, heads, 1, dim).to(dtype)
    k = torch.randn(3, kv_heads, 8, dim).to(dtype)
    v = torch.randn(3, kv_heads, 8, dim).to(dtype)
    additive = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, enable_gqa=True)
    boolean = F.scaled_dot_product_attention(q, k, v, attn_mask=attended[:, None, None, :], enable_gqa=True)
    assert torch.equal(additive, boolean)


def reference_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: list[int], ctx: int
) -> torch.Tensor:
    """One decode token's attention ([heads, dim]) over its context, per query head, in float64."""
    heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = torch.cat([k_cache[b] for b in table]).double()[:ctx].repeat_interleave(heads // kv_heads, 1)
    v = torch.cat([v_cache[b] for b in table]).double()[:ctx].repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("hd,lhd->hl", q.double(), k) * dim**-0.5
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["decodes", "lone decode", "decodes beside a prefill"])
def test_decode_attention_groups_query_heads_and_matches_per_head_attention(
    dtype: torch.dtype, layout: str
) -> None:
    from turbine.engines.torch.attention import attend

    block, heads, kv_heads, dim = 4, 6, 2, 8
    torch.manual_seed(2)
    k_cache = torch.randn(6, block, kv_heads, dim).to(dtype)
    v_cache = torch.randn(6, block, kv_heads, dim).to(dtype)
    decodes = [([3, 1], 7), ([0], 2), ([2, 4], 5)]
    if layout == "lone decode":
        decodes = decodes[:1]
    chunks = [(t, n - 1, 1) for t, n in decodes]
    if layout == "decodes beside a prefill":
        chunks.insert(1, ([5], 0, 3))  # a 3-token prefill between the decodes
    meta = build_meta(chunks, block, torch.device("cpu"), gather_decodes=True, dtype=dtype)
    rows = sum(c[2] for c in chunks)
    q = torch.randn(rows, heads, dim).to(dtype)
    out = attend(q, k_cache, v_cache, meta, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    row = 0
    for table, computed, new in chunks:
        if new == 1:
            want = reference_attention(q[row], k_cache, v_cache, table, computed + 1)
            assert torch.allclose(out[row].double(), want, atol=tol, rtol=tol)
        row += new
