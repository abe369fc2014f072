"""The CPU forward's shortcuts compute exactly what the plain expressions compute, bit for bit."""

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
