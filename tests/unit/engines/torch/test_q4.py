"""A GGUF's 4-bit weights kept for the CPU's small steps: the block formats (Q4_0, Q4_1, Q4_K)
against the `gguf` package's own dequantization, the int4 kernel against the dequantized matmul,
the row threshold, SmolLM2's converted blocks, and a model that uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from turbine.engines.torch import q4
from turbine.engines.torch.attention import build_meta
from turbine.engines.torch.engine import TorchEngineConfig, load_model
from turbine.engines.torch.linear import Linear, packs
from turbine.engines.torch.model import LlamaModel


def _raw_blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """GGUF bytes of a random Q4_0 / Q4_1 weight (per block of 32: fp16 d, and m, 16 nibble bytes)
    or Q4_K weight (per 256: fp16 d and dmin, then 12 bytes of 6-bit scales and 128 of nibbles)."""
    rng = np.random.default_rng(seed)
    if kind == "Q4_K":
        supers = rows * cols // 256
        halves = (rng.random((supers, 2)) * 0.01).astype(np.float16).view(np.uint8)
        rest = rng.integers(0, 256, (supers, 140), dtype=np.uint8)
        return np.concatenate([halves, rest], axis=1).reshape(rows, -1)
    groups = rows * cols // q4.GROUP
    d = (rng.random(groups) * 0.02 + 0.001).astype(np.float16).view(np.uint8).reshape(groups, 2)
    parts = [d]
    if kind == "Q4_1":
        parts.append((-rng.random(groups) * 0.1).astype(np.float16).view(np.uint8).reshape(groups, 2))
    parts.append(rng.integers(0, 256, (groups, 16), dtype=np.uint8))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _blocks(kind: str = "Q4_1", rows: int = 64, cols: int = 128, seed: int = 0) -> q4.Blocks:
    return q4.decode(_raw_blocks(kind, rows, cols, seed), kind, rows, cols)


@pytest.mark.parametrize("kind", q4.KINDS)
def test_decoded_blocks_are_the_gguf_packages_dequantization(kind: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 48, 512
    raw = _raw_blocks(kind, rows, cols, seed=1)
    theirs = torch.from_numpy(
        np.asarray(dequantize(raw, GGMLQuantizationType[kind]), dtype=np.float32).reshape(rows, cols)
    )
    ours = q4.dequantize(q4.decode(raw, kind, rows, cols))
    # The zeros (m + 8d, 8·d·sc − dmin·mn) are rounded once in float32: equal up to that rounding.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    if kind == "Q4_0":
        assert torch.equal(ours, theirs)


def test_concat_stacks_rows() -> None:
    a, b = _blocks(rows=32, seed=2), _blocks(rows=64, seed=3)
    both = q4.dequantize(q4.concat([a, b]))
    assert torch.equal(both, torch.cat([q4.dequantize(a), q4.dequantize(b)]))


def test_applies_on_cpu_in_bfloat16_only() -> None:
    assert q4.applies(torch.device("cpu"), torch.bfloat16)
    assert not q4.applies(torch.device("cpu"), torch.float32)  # the kernel is slow there
    assert not q4.applies(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("kind", q4.KINDS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int4_kernel_matches_the_dequantized_matmul(kind: str, rows: int) -> None:
    blocks = _blocks(kind, cols=256, seed=rows)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    ref = x @ q4.dequantize(blocks).T
    got = q4.Q4Weight(blocks, torch.bfloat16)(x.to(torch.bfloat16)).float()
    # bfloat16 activations and scales: a few parts in a thousand of the largest output.
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("pack", [False, True])
def test_linear_takes_the_blocks_only_up_to_the_row_limit(pack: bool) -> None:
    if pack and not packs(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no oneDNN bfloat16 path")
    blocks = _blocks()
    bias = torch.ones(64, dtype=torch.bfloat16)
    # The dense weight is zero, so the output says which path ran: blocks or dense.
    layer = Linear(
        torch.zeros(64, 128, dtype=torch.bfloat16), bias, pack=pack, q4=q4.Q4Weight(blocks, torch.bfloat16),
        q4_max_rows=4,
    )  # fmt: skip
    x = torch.randn(5, 128).to(torch.bfloat16)
    small = layer(x[:4]).float()
    ref = x[:4].float() @ q4.dequantize(blocks).T + 1
    assert (small - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert torch.equal(layer(x), torch.ones(5, 64, dtype=torch.bfloat16))  # 5 rows: the dense weight
    assert layer.q4_nbytes > 0 and Linear(torch.zeros(2, 32)).q4_nbytes == 0


@pytest.mark.integration
def test_smollm2_conversion_keeps_its_q4_1_blocks(smollm2_dir: Path) -> None:
    """Every Q4_1 linear weight of the file, with llama.cpp's q/k row order undone like the rest."""
    from safetensors.torch import load_file

    dense = load_file(str(smollm2_dir / "model.safetensors"))
    blocks = q4.load(smollm2_dir)
    assert len(blocks) == 30 * 7  # q, k, v, o, gate, up, down per layer; the Q8_0 embedding stays dense
    for name, b in blocks.items():
        assert torch.equal(q4.dequantize(b), dense[name]), name
    assert q4.load(smollm2_dir / "nonexistent") == {}


@pytest.mark.integration
def test_smollm2_decode_step_with_the_blocks_agrees_with_the_dequantized_model(smollm2_dir: Path) -> None:
    def model(rows: int) -> LlamaModel:
        cfg = TorchEngineConfig(model_dir=smollm2_dir, device="cpu", dtype="bfloat16", q4_max_rows=rows)
        return load_model(cfg).model

    with_blocks, dense = model(8), model(0)
    assert with_blocks.q4_bytes() > 0 and dense.q4_bytes() == 0
    # One prefill of 20 tokens (dense weights in both), then a 1-row decode step.
    cpu = torch.device("cpu")
    results = []
    for m in (with_blocks, dense):
        cache = m.new_kv_cache(4, 16)
        meta = build_meta([([0, 1], 0, 20)], 16, cpu, dtype=torch.bfloat16)
        m.forward(torch.arange(100, 120), torch.arange(20), cache, meta)
        meta = build_meta([([0, 1], 20, 1)], 16, cpu, dtype=torch.bfloat16)
        results.append(m.logits(m.forward(torch.tensor([7]), torch.tensor([20]), cache, meta))[0])
    ours, ref = results
    assert ours.argmax() == ref.argmax()
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=0) > 0.99
