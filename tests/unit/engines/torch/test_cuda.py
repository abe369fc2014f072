"""The CUDA path: the Triton paged-decode kernel against SDPA, and the engine with CUDA graphs against
`transformers`. Skipped without a GPU (CI has none); run on the GPU machine with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_kernel_matches_sdpa(dtype: torch.dtype) -> None:
    from turbine.engines.torch.triton_decode import paged_decode

    torch.manual_seed(0)
    heads, kv_heads, dim, block, blocks = 8, 2, 64, 16, 64
    k_cache = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn(blocks, block, kv_heads, dim, device="cuda", dtype=dtype)
    lens = [1, 17, 100, 333]
    perm = torch.randperm(blocks).tolist()
    tables, start = [], 0
    for n in lens:
        need = -(-n // block)
        tables.append(perm[start : start + need])
        start += need
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), heads, dim, device="cuda", dtype=dtype)
    out = paged_decode(
        q, k_cache, v_cache, table_t, torch.tensor(lens, dtype=torch.int32, device="cuda"), 0.125
    )
    for i, (n, table) in enumerate(zip(lens, tables, strict=True)):
        k = k_cache[table].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)[None]
        v = v_cache[table].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(
            q[i][None, :, None].float(), k.float(), v.float(), scale=0.125, enable_gqa=True
        )
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), ref[0, :, 0], atol=tol, rtol=tol)


def test_engine_with_cuda_graphs_equals_transformers(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = [[5 + i, 17, 99, 400 + 3 * i, 1000, 7] * (i + 1) for i in range(12)]
    hf: Any = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    hf = hf.to("cuda")
    expected = []
    for p in prompts:
        ids = hf.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        expected.append(ids[0, len(p) :].tolist())
    for eager in (False, True):
        results, _ = run_engine(
            tiny_llama_dir,
            [request(p, 40, temperature=0.0) for p in prompts],
            device="cuda",
            block_size=16,
            num_gpu_blocks=256,
            enforce_eager=eager,
        )
        assert [tokens_of(r) for r in results] == expected, f"enforce_eager={eager}"
