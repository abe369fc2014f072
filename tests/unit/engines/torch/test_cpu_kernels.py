"""Turbine's CPU kernel for 4-bit weights (`cpu_kernels.py`, `csrc/cpu_q4.cpp`): exact against the
dequantized matmul for every block format and row count, the small-row hand-off to torch's kernel,
the CPU check, and what `--cpu-kernels` does where the kernels cannot run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.unit.engines.torch.test_q4 import _blocks
from turbine.engines.torch import cpu_kernels, q4
from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.model import LlamaModel
from turbine.errors import ConfigError

pytestmark = pytest.mark.slow  # compiles the kernels (once per machine) and runs them


def _kernels() -> None:
    try:
        cpu_kernels.load()
    except cpu_kernels.KernelsUnavailable as exc:
        pytest.skip(f"Turbine's CPU kernels cannot run here: {exc}")


@pytest.mark.parametrize("kind", q4.KINDS)
@pytest.mark.parametrize("rows", [4, 8, 16, 21])
def test_amx_kernel_is_exact_against_the_dequantized_matmul(kind: str, rows: int) -> None:
    """bfloat16 x, float32 products and sums: only the output's rounding to bfloat16 (and, for Q4_K,
    the fp16 rounding of its derived scales) separates it from float32 arithmetic on the same x."""
    _kernels()
    blocks = _blocks(kind, rows=48, cols=512, seed=rows)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    ref = x.float() @ q4.dequantize(blocks).T
    got = cpu_kernels.AmxQ4Weight(blocks, torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
    scale = ref.abs().max()
    tol = 2e-3 if kind == "Q4_K" else 2e-5
    assert ((got.float() - ref).abs() <= ref.abs() * 2**-8 + tol * scale).all()


def test_amx_kernel_beats_torchs_int4_kernel_on_accuracy() -> None:
    """torch's kernel holds scale and zero in bfloat16; this one the file's fp16 d and m."""
    _kernels()
    blocks = _blocks("Q4_1", rows=256, cols=1024, seed=7)
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    ref = x.float() @ q4.dequantize(blocks).T
    ours = (cpu_kernels.AmxQ4Weight(blocks, torch.bfloat16)(x).float() - ref).abs().mean()
    theirs = (q4.Q4Weight(blocks, torch.bfloat16)(x).float() - ref).abs().mean()
    assert ours < theirs


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_few_rows_go_through_torchs_kernel(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _kernels()
    blocks = _blocks("Q4_1", rows=32, cols=256, seed=rows)
    weight = cpu_kernels.AmxQ4Weight(blocks, torch.bfloat16)
    x = torch.randn(rows, 256).to(torch.bfloat16)
    assert torch.equal(weight(x), q4.Q4Weight(blocks, torch.bfloat16)(x))
    monkeypatch.setattr(cpu_kernels, "SMALL_ROWS", 0)  # now the AMX kernel: close, not equal
    ref = x.float() @ q4.dequantize(blocks).T
    assert (weight(x).float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_row_counts_that_are_not_tiles_are_refused() -> None:
    _kernels()
    with pytest.raises(RuntimeError, match="multiples of 16"):
        cpu_kernels.AmxQ4Weight(_blocks("Q4_1", rows=40, cols=256), torch.bfloat16)
    weight = cpu_kernels.AmxQ4Weight(_blocks("Q4_1", rows=32, cols=256), torch.bfloat16)
    with pytest.raises(RuntimeError, match="does not fit"):
        weight(torch.randn(8, 128).to(torch.bfloat16))


def _decode_logits(model: LlamaModel, batch: int, *, decode_kernel: bool = False) -> torch.Tensor:
    """float32 logits of one decode step of `batch` rows, after a 20-token prefill of each sequence
    (the prefill on the dense weights in any configuration: it has more rows than the limit)."""
    cpu = torch.device("cpu")
    cache = model.new_kv_cache(2 * batch, 16)
    tables = [[2 * i, 2 * i + 1] for i in range(batch)]
    prompts = [torch.arange(100 + 7 * i, 120 + 7 * i) for i in range(batch)]
    meta = build_meta([(t, 0, 20) for t in tables], 16, cpu, dtype=torch.bfloat16)
    model.forward(torch.cat(prompts), torch.arange(20).repeat(batch), cache, meta)
    meta = build_meta(
        [(t, 20, 1) for t in tables], 16, cpu, decode_kernel=decode_kernel, dtype=torch.bfloat16
    )
    hidden = model.forward(torch.arange(7, 7 + batch), torch.full((batch,), 20), cache, meta)
    return model.logits(hidden).float()


def test_missing_cpu_flags_reads_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512vl f16c fma amx_tile\n")
    assert cpu_kernels.missing_cpu_flags(info) == ["amx_bf16", "avx512_bf16"]
    assert cpu_kernels.missing_cpu_flags(tmp_path / "absent") == list(cpu_kernels.CPU_FLAGS)


def test_resolve_falls_back_or_fails_as_asked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse() -> None:
        raise cpu_kernels.KernelsUnavailable("this CPU lacks amx_tile")

    monkeypatch.setattr(cpu_kernels, "load", refuse)
    assert cpu_kernels.resolve("torch") is False
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.resolve("auto") is False
    assert "lacks amx_tile" in caplog.text
    with pytest.raises(cpu_kernels.KernelsUnavailable):
        cpu_kernels.resolve("turbine")


def test_engine_config_turbine_where_they_cannot_run_is_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path
) -> None:
    def refuse() -> None:
        raise cpu_kernels.KernelsUnavailable("this CPU lacks amx_tile")

    monkeypatch.setattr(cpu_kernels, "load", refuse)
    cfg = TorchEngineConfig(
        model_dir=smollm2_dir, device="cpu", dtype="bfloat16", progress=False, cpu_kernels="turbine"
    )
    with pytest.raises(ConfigError, match="--cpu-kernels turbine: this CPU lacks amx_tile"):
        load_model(cfg)


# ------------------------------------------------------------------ fused layer ops, paged decode

BF16 = torch.bfloat16


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_is_the_plain_one_bit_for_bit(with_residual: bool) -> None:
    from turbine.engines.torch.model import rms_norm

    _kernels()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 576, generator=gen).to(BF16)
    delta = torch.randn(8, 576, generator=gen).to(BF16)
    w = torch.randn(576, generator=gen).to(BF16)
    plain_x = x.clone()
    if with_residual:
        plain_x += delta
    expected = rms_norm(plain_x, w, 1e-5)
    fused_x = x.clone()
    got = cpu_kernels.rms_norm(fused_x, w, 1e-5, delta if with_residual else None)
    assert torch.equal(got, expected)
    assert torch.equal(fused_x, plain_x)  # the residual stream, updated in place


def test_fused_silu_mul_matches_torch() -> None:
    _kernels()
    gate_up = (torch.randn(8, 2 * 1536, generator=torch.Generator().manual_seed(2)) * 4).to(BF16)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = cpu_kernels.silu_mul(gate_up)
    # Its exp is about 1 ulp from torch's: the rounded SiLU may differ in the last bfloat16 bit.
    assert (got == expected).float().mean() > 0.995
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-3)


def test_fused_rope_and_cache_is_the_plain_path_bit_for_bit() -> None:
    _kernels()
    heads, kv_heads, dim, tokens = 9, 3, 64, 8
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(BF16)
    positions = torch.tensor([0, 1, 5, 77, 300, 1023, 4000, 8191])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    # The plain path of model.py: cos and sign-folded sin rounded to the dtype, then bf16 ops.
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([freqs, freqs], -1).cos().to(BF16)[:, None, :]
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1).to(BF16)[:, None, :]
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    rotated = qk * cos + qk.roll(dim // 2, -1) * sin
    k_cache = torch.zeros(4, 16, kv_heads, dim, dtype=BF16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 9, 17, 20, 33, 40, 50, 63])
    q = cpu_kernels.rope_and_cache(qkv, positions, inv_freq, k_cache, v_cache, slots, heads, kv_heads, dim)
    assert torch.equal(q, rotated[:, :heads])
    assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots], rotated[:, heads:])
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots], v)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(-1, kv_heads, dim)[untouched].any()


def test_fused_rope_and_cache_refuses_a_slot_outside_the_cache() -> None:
    _kernels()
    qkv = torch.randn(1, 5 * 64).to(BF16)
    cache = torch.zeros(1, 16, 1, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu_kernels.rope_and_cache(
            qkv, torch.tensor([0]), torch.ones(32), cache, cache.clone(), torch.tensor([16]), 3, 1, 64
        )


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("contexts", [[164] * 8, [1, 17, 64, 65, 130, 200, 3, 64]])
def test_paged_decode_matches_sdpa_over_the_gathered_context(dtype: torch.dtype, contexts: list[int]) -> None:
    from turbine.engines.torch.attention import attend, build_meta

    _kernels()
    heads, kv_heads, dim, bs = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(len(set(contexts)))
    per = [-(-c // bs) for c in contexts]
    order = torch.randperm(sum(per), generator=gen).tolist()  # blocks scattered over the cache
    tables, start = [], 0
    for n in per:
        tables.append(order[start : start + n])
        start += n
    k_cache = torch.randn(sum(per), bs, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(sum(per), bs, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(contexts), heads, dim, generator=gen).to(dtype)
    chunks = [(t, c - 1, 1) for t, c in zip(tables, contexts, strict=True)]
    cpu = torch.device("cpu")
    expected = attend(
        q, k_cache, v_cache, build_meta(chunks, bs, cpu, gather_decodes=True, dtype=dtype), 0.125
    )
    meta = build_meta(chunks, bs, cpu, decode_kernel=True, dtype=dtype)
    assert meta.decode is not None and meta.decode.rows is None and meta.gathered is None
    got = attend(q, k_cache, v_cache, meta, 0.125)  # on CPU, attend takes Turbine's kernel
    tol = 2e-2 if dtype == BF16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_paged_decode_serves_the_decodes_of_a_mixed_step() -> None:
    """A step with a prefill chunk beside decodes: SDPA for the chunk, the kernel for the decode rows."""
    from turbine.engines.torch.attention import attend, build_meta

    _kernels()
    heads, kv_heads, dim, bs = 4, 2, 32, 16
    gen = torch.Generator().manual_seed(9)
    k_cache = torch.randn(12, bs, kv_heads, dim, generator=gen).to(BF16)
    v_cache = torch.randn(12, bs, kv_heads, dim, generator=gen).to(BF16)
    chunks = [([0, 1], 20, 1), ([2, 3, 4], 10, 30), ([5, 6], 31, 1)]
    q = torch.randn(32, heads, dim, generator=gen).to(BF16)
    cpu = torch.device("cpu")
    plain = attend(q, k_cache, v_cache, build_meta(chunks, bs, cpu, dtype=BF16), 0.2)
    meta = build_meta(chunks, bs, cpu, decode_kernel=True, dtype=BF16)
    assert meta.decode is not None and meta.decode.rows is not None
    torch.testing.assert_close(attend(q, k_cache, v_cache, meta, 0.2), plain, rtol=2e-2, atol=2e-2)


def test_paged_decode_refuses_a_context_longer_than_its_table() -> None:
    _kernels()
    cache = torch.zeros(2, 16, 1, 64, dtype=BF16)
    q = torch.zeros(1, 1, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="context length outside the block table"):
        cpu_kernels.paged_decode(q, cache, cache, torch.tensor([[0]]), torch.tensor([17]), 1.0)
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_kernels.paged_decode(q, cache, cache, torch.tensor([[5]]), torch.tensor([3]), 1.0)


def test_a_model_on_turbines_kernels_agrees_with_the_plain_forward(smollm2_dir: Path) -> None:
    """SmolLM2 in bfloat16 on every Turbine kernel (fused ops, paged decode attention, AMX 4-bit
    matmuls) against the plain torch forward on the dequantized weights: same argmax per row."""
    _kernels()
    models = {}
    for name, kernels, rows in (("turbine", "turbine", 8), ("plain", "torch", 0)):
        cfg = TorchEngineConfig(
            model_dir=smollm2_dir, device="cpu", dtype="bfloat16", progress=False,
            q4_max_rows=rows, cpu_kernels=kernels,
        )  # fmt: skip
        models[name] = load_model(cfg).model
    assert models["turbine"].fused and models["turbine"].q4_bytes() > 0 and not models["plain"].fused
    got, ref = (
        _decode_logits(models[n], batch=8, decode_kernel=n == "turbine") for n in ("turbine", "plain")
    )
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99


def test_the_default_row_limit_follows_the_kernel(smollm2_dir: Path) -> None:
    """Unset `q4_max_rows`: 32 rows on Turbine's AMX kernel (it beats the dequantized weights up to
    there), 8 on torch's int4 kernel (compute-bound beyond)."""
    from turbine.engines.torch.engine import Q4_ROWS_AMX, Q4_ROWS_TORCH

    _kernels()
    for kernels, expected in (("turbine", Q4_ROWS_AMX), ("torch", Q4_ROWS_TORCH)):
        cfg = TorchEngineConfig(
            model_dir=smollm2_dir, device="cpu", dtype="bfloat16", progress=False, cpu_kernels=kernels
        )
        layer = load_model(cfg).model.layers[0]
        assert layer.qkv._q4_rows == expected and layer.down._q4_rows == expected


def test_the_sources_are_compiled_from_a_copy_in_the_build_directory(tmp_path: Path) -> None:
    """torch's builder rebuilds when the source paths in its build file change: compiling from a copy
    in the (content-keyed) build directory lets every checkout share one build."""
    staged = cpu_kernels.staged_sources(tmp_path)
    assert [p.parent for p in staged] == [tmp_path / "src"] * len(cpu_kernels.SOURCES)
    for src in (*cpu_kernels.SOURCES, *cpu_kernels.HEADERS):
        assert (tmp_path / "src" / src.name).read_bytes() == src.read_bytes()
    before = [p.stat().st_mtime_ns for p in staged]
    assert cpu_kernels.staged_sources(tmp_path) == staged
    assert [p.stat().st_mtime_ns for p in staged] == before  # unchanged copies are not rewritten


def test_a_dead_builders_lock_is_cleared_and_a_live_ones_kept(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")
    mtime = lock.stat().st_mtime
    assert not cpu_kernels.clear_stale_lock(tmp_path, now=mtime + 10)  # a build in progress
    assert lock.exists()
    assert cpu_kernels.clear_stale_lock(tmp_path, now=mtime + cpu_kernels.STALE_LOCK_S + 1)
    assert not lock.exists()
    assert not cpu_kernels.clear_stale_lock(tmp_path)  # nothing to clear
