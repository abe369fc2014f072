"""Pre-packed CPU weights give the same numbers as `F.linear`, alone and through a whole engine run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from turbine.engines.torch import model as model_module
from turbine.engines.torch.linear import Linear, packs

needs_packing = pytest.mark.skipif(
    not packs(torch.device("cpu"), torch.bfloat16), reason="this CPU has no oneDNN bfloat16 path"
)


def test_float32_and_cuda_weights_are_not_packed() -> None:
    assert not packs(torch.device("cpu"), torch.float32)
    assert not packs(torch.device("cuda"), torch.bfloat16)


def test_unpacked_linear_is_f_linear() -> None:
    w, b, x = torch.randn(7, 5), torch.randn(7), torch.randn(3, 5)
    layer = Linear(w, b)
    assert torch.equal(layer(x), F.linear(x, w, b))
    assert layer.nbytes == (7 * 5 + 7) * 4


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 300])
def test_packed_linear_equals_f_linear_bit_for_bit(rows: int) -> None:
    torch.manual_seed(rows)
    w = (torch.randn(96, 64) / 8).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    packed = Linear(w, b, pack=True)
    assert packed.weight is None  # the plain copy is dropped
    assert packed.nbytes == (96 * 64 + 96) * 2
    assert torch.equal(packed(x), F.linear(x, w, b))


@pytest.mark.integration
@needs_packing
def test_bfloat16_engine_gives_the_same_tokens_packed_and_plain(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (4, 11, 40, 90)]
    reqs = [request(p, 12, temperature=0.0) for p in prompts]
    kwargs = {"dtype": "bfloat16", "block_size": 8, "max_num_batched_tokens": 64}
    packed, _ = run_engine(tiny_llama_dir, reqs, **kwargs)
    monkeypatch.setattr(model_module, "packs", lambda device, dtype: False)
    plain, _ = run_engine(tiny_llama_dir, [request(p, 12, temperature=0.0) for p in prompts], **kwargs)
    assert [tokens_of(r) for r in packed] == [tokens_of(r) for r in plain]
    assert all(len(tokens_of(r)) == 12 for r in packed)
