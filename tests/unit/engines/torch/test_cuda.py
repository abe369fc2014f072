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


@pytest.mark.parametrize("splits", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_kernel_matches_sdpa(dtype: torch.dtype, splits: int | None) -> None:
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
        q,
        k_cache,
        v_cache,
        table_t,
        torch.tensor(lens, dtype=torch.int32, device="cuda"),
        0.125,
        splits=splits,
    )
    for i, (n, table) in enumerate(zip(lens, tables, strict=True)):
        k = k_cache[table].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)[None]
        v = v_cache[table].reshape(-1, kv_heads, dim)[:n].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(
            q[i][None, :, None].float(), k.float(), v.float(), scale=0.125, enable_gqa=True
        )
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), ref[0, :, 0], atol=tol, rtol=tol)


def test_split_count_fills_the_gpu_and_stays_within_bounds() -> None:
    from turbine.engines.torch.triton_decode import num_splits

    assert num_splits(1, 8, 2048, 132) == 16  # one sequence: split as far as allowed
    assert num_splits(4, 2, 21, 132) == 16
    assert num_splits(1, 8, 3, 132) == 2  # never more splits than table columns (power of two)
    assert num_splits(128, 8, 2048, 132) == 1  # a big batch fills the GPU on its own


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
        results, engine = run_engine(
            tiny_llama_dir,
            [request(p, 40, temperature=0.0) for p in prompts],
            device="cuda",
            block_size=16,
            num_gpu_blocks=256,
            enforce_eager=eager,
        )
        assert [tokens_of(r) for r in results] == expected, f"enforce_eager={eager}"
        if not eager:
            assert engine.executor().ahead_hits > 0  # type: ignore[attr-defined]


def test_run_ahead_gives_the_same_tokens_when_batches_change(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences end at different steps (queued launches dropped), sampled rows mix with greedy ones
    (no run-ahead for them), and blocks fill up mid-run (no run-ahead across a block boundary)."""
    import msgspec

    from turbine.engines.torch.runner import TorchExecutor
    from turbine.protocol.request import StopConditions

    prompts = [[9 + i, 40, 77, 300 + i] * (i + 1) for i in range(10)]

    def reqs() -> list[Any]:
        out = [request(p, 6 + 5 * i, temperature=0.0) for i, p in enumerate(prompts)]
        banned = request(prompts[3], 20, temperature=0.0)  # EOS banned for its first 5 tokens
        banned = msgspec.structs.replace(banned, stop=StopConditions(max_tokens=20, min_tokens=5))
        return [*out, request(prompts[0], 20, temperature=0.8, seed=11), banned]

    runs = {}
    hits = {}
    for ahead in (True, False):
        monkeypatch.setattr(TorchExecutor, "run_ahead", ahead)
        results, engine = run_engine(tiny_llama_dir, reqs(), device="cuda", block_size=16, num_gpu_blocks=256)
        runs[ahead] = [tokens_of(r) for r in results]
        hits[ahead] = engine.executor().ahead_hits  # type: ignore[attr-defined]
    assert runs[True] == runs[False]
    assert [len(t) for t in runs[True][:10]] == [6 + 5 * i for i in range(10)]
    assert hits[True] > 0 and hits[False] == 0


def test_fused_kernels_match_the_torch_ops() -> None:
    from turbine.engines.torch import triton_ops as ops
    from turbine.engines.torch.model import rms_norm

    def rotate_half(t: torch.Tensor) -> torch.Tensor:  # transformers' definition
        return torch.cat([-t[..., t.shape[-1] // 2 :], t[..., : t.shape[-1] // 2]], dim=-1)

    torch.manual_seed(0)
    x = torch.randn(7, 576, device="cuda")
    delta = torch.randn(7, 576, device="cuda")
    w = torch.randn(576, device="cuda")
    stream = x.clone()
    out = ops.rms_norm(stream, w, 1e-5, residual=delta)
    torch.testing.assert_close(stream, x + delta)
    torch.testing.assert_close(out, rms_norm(x + delta, w, 1e-5), atol=1e-5, rtol=1e-5)

    heads, kv_heads, dim, block = 4, 2, 64, 16
    qkv = torch.randn(5, (heads + 2 * kv_heads) * dim, device="cuda")
    positions = torch.tensor([0, 3, 17, 100, 1000], device="cuda")
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    k_cache = torch.zeros(8, block, kv_heads, dim, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 20, 21, 64, 127], device="cuda")
    q = ops.rope_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, heads, kv_heads, dim)
    freqs = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    q_ref = qkv[:, : heads * dim].view(5, heads, dim)
    k_ref = qkv[:, heads * dim : (heads + kv_heads) * dim].view(5, kv_heads, dim)
    v_ref = qkv[:, (heads + kv_heads) * dim :].view(5, kv_heads, dim)
    torch.testing.assert_close(q, q_ref * cos + rotate_half(q_ref) * sin, atol=1e-4, rtol=1e-4)
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    torch.testing.assert_close(flat_k[slots], k_ref * cos + rotate_half(k_ref) * sin, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat_v[slots], v_ref)

    gate_up = torch.randn(3, 2 * 1536, device="cuda")
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_two_engines_sharing_one_model_on_the_gpu(tiny_llama_dir: Path) -> None:
    """Two workers of one process share the weights; their steps (and graph captures) interleave."""
    import asyncio

    from tests.unit.engines.torch.helpers import collect
    from turbine.engines.base import NullEventSink
    from turbine.engines.torch.engine import TorchEngine, TorchEngineConfig, load_model

    cfg = TorchEngineConfig(
        model_dir=tiny_llama_dir,
        device="cuda",
        dtype="float32",
        block_size=16,
        num_gpu_blocks=128,
        progress=False,
    )
    loaded = load_model(cfg)
    prompts = [[7 + i, 30, 500 + i] * (i + 2) for i in range(6)]

    async def main() -> list[list[int]]:
        engines = [TorchEngine(cfg, loaded, worker_id=w, events=NullEventSink()) for w in (1, 2)]
        for engine in engines:
            await engine.start()
        try:
            runs = [collect(engines[i % 2], request(p, 30, temperature=0.0)) for i, p in enumerate(prompts)]
            return [tokens_of(out) for out in await asyncio.gather(*runs)]
        finally:
            for engine in engines:
                await engine.stop()

    together = asyncio.run(main())
    alone, _ = run_engine(
        tiny_llama_dir,
        [request(p, 30, temperature=0.0) for p in prompts],
        device="cuda",
        block_size=16,
        num_gpu_blocks=128,
    )
    assert together == [tokens_of(r) for r in alone]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "norm", "norm+silu_mul", "residual", "float32_out"])
def test_gemv_matches_the_unfused_ops(dtype: torch.dtype, variant: str) -> None:
    from turbine.engines.torch import triton_ops as ops
    from turbine.engines.torch.triton_gemv import gemv

    torch.manual_seed(0)
    k, rows = 1024, 768
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    w = torch.randn(2 * rows if "silu" in variant else rows, k, device="cuda", dtype=dtype) * 0.05
    norm = torch.rand(k, device="cuda", dtype=dtype) + 0.5
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if variant == "plain":
        got, ref = gemv(x, w), F.linear(x, w)
    elif variant == "norm":
        got, ref = gemv(x, w, norm=norm, eps=1e-5), F.linear(ops.rms_norm(x, norm, 1e-5), w)
    elif variant == "norm+silu_mul":
        got = gemv(x, w, norm=norm, eps=1e-5, silu_mul=True)
        ref = ops.silu_mul(F.linear(ops.rms_norm(x, norm, 1e-5), w))
    elif variant == "residual":
        stream = torch.randn(1, rows, device="cuda", dtype=dtype)
        ref = stream + F.linear(x, w)
        got = gemv(x, w, residual=stream)
        assert got.data_ptr() == stream.data_ptr()  # updated in place
    else:
        got = gemv(x, w, out_dtype=torch.float32)
        ref = F.linear(x, w).float()
        assert got.dtype == torch.float32
    assert got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_batch_one_gemv_forward_matches_the_batched_forward(tiny_llama_dir: Path) -> None:
    """A one-token step through the GEMV path gives the hidden state of the same token computed in a
    two-row step through cuBLAS (bfloat16, loose tolerance: summation orders differ)."""
    from turbine.engines.torch.arch import read_arch
    from turbine.engines.torch.attention import build_meta
    from turbine.engines.torch.loader import load_weights
    from turbine.engines.torch.model import LlamaModel

    arch = read_arch(tiny_llama_dir)
    model = LlamaModel(arch, load_weights(tiny_llama_dir, torch.bfloat16), torch.device("cuda"))
    assert model._gemv
    cache = model.new_kv_cache(8, 16)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    meta = build_meta([([0], 0, len(prompt))], 16, model.device)
    ids = torch.tensor(prompt, device="cuda")
    model.forward(ids, torch.arange(len(prompt), device="cuda"), cache, meta)
    step = build_meta([([0], len(prompt), 1)], 16, model.device, decode_kernel=True)
    one = model.forward(torch.tensor([26], device="cuda"), torch.tensor([8], device="cuda"), cache, step)
    # The same token as the second row of a two-row step (the first row repeats the prompt's last).
    two_meta = build_meta([([1], 0, 1), ([0], len(prompt), 1)], 16, model.device, decode_kernel=True)
    two = model.forward(
        torch.tensor([79, 26], device="cuda"), torch.tensor([0, 8], device="cuda"), cache, two_meta
    )
    torch.testing.assert_close(one[0].float(), two[1].float(), atol=5e-2, rtol=5e-2)
    logits = model.logits(one)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.lm_head(one).float(), atol=5e-2, rtol=5e-2)
