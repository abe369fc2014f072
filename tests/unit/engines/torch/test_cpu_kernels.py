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


def _decode_logits(model: LlamaModel, batch: int) -> torch.Tensor:
    """float32 logits of one decode step of `batch` rows, after a 20-token prefill of each sequence
    (the prefill on the dense weights in any configuration: it has more rows than the limit)."""
    cpu = torch.device("cpu")
    cache = model.new_kv_cache(2 * batch, 16)
    tables = [[2 * i, 2 * i + 1] for i in range(batch)]
    prompts = [torch.arange(100 + 7 * i, 120 + 7 * i) for i in range(batch)]
    meta = build_meta([(t, 0, 20) for t in tables], 16, cpu, dtype=torch.bfloat16)
    model.forward(torch.cat(prompts), torch.arange(20).repeat(batch), cache, meta)
    meta = build_meta([(t, 20, 1) for t in tables], 16, cpu, dtype=torch.bfloat16)
    hidden = model.forward(torch.arange(7, 7 + batch), torch.full((batch,), 20), cache, meta)
    return model.logits(hidden).float()


def test_missing_cpu_flags_reads_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512vl f16c fma amx_tile\n")
    assert cpu_kernels.missing_cpu_flags(info) == ["amx_bf16"]
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


def test_a_model_on_the_amx_kernel_agrees_with_the_dequantized_one(smollm2_dir: Path) -> None:
    """SmolLM2 on its Q4_1 blocks, a decode step of 8 rows: the same argmax on every row as the model
    on the dequantized weights, and logits of cosine > 0.99."""
    _kernels()
    models = {}
    for name, kernels, rows in (("amx", "turbine", 8), ("dense", "torch", 0)):
        cfg = TorchEngineConfig(
            model_dir=smollm2_dir, device="cpu", dtype="bfloat16", progress=False,
            q4_max_rows=rows, cpu_kernels=kernels,
        )  # fmt: skip
        models[name] = load_model(cfg).model
    got, ref = (_decode_logits(models[n], batch=8) for n in ("amx", "dense"))
    assert models["amx"].q4_bytes() > 0
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99
