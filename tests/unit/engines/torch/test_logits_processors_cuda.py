"""Penalties, bias, allowed tokens and bad words on the GPU: the same adjusted logits as on the CPU,
and through the engine with CUDA graphs, beside unadjusted rows of the same batch. Skipped without a
GPU (CI has none); run on the GPU machine with `pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from turbine.engines.torch.logits_processors import RowAdjust, TokenCounts, adjust_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPT = [5, 17, 99, 400, 1000, 7, 12, 3000]
# A fixed KV size: engines earlier in the process may still hold memory the budget would count.
CUDA: dict[str, Any] = {"device": "cuda", "block_size": 16, "num_gpu_blocks": 256}


def _rows(device: torch.device, vocab: int) -> list[RowAdjust | None]:
    buffer = TokenCounts(vocab, device)
    h1 = buffer.track(1, 3)
    h3 = buffer.track(3, 2)
    return [
        RowAdjust(
            presence=0.5,
            frequency=1.0,
            repetition=1.5,
            history=h1,
            counts=buffer,
            pending=h1.take([1, 2, 3, 4, 4, 4, 9]),
        ),
        None,
        RowAdjust(bias_ids=[3, 50], bias_values=[5.0, -100.0], allowed=[3, 4, 50, 60], bad=[60]),
        RowAdjust(
            frequency=2.0,
            bias_ids=[100],
            bias_values=[1.0],
            history=h3,
            counts=buffer,
            pending=h3.take([7, 7, 8, 100, 100]),
        ),
    ]


def test_adjusted_logits_are_the_same_on_the_gpu() -> None:
    torch.manual_seed(0)
    vocab = 4096
    logits = torch.randn(4, vocab) * 3
    cpu = adjust_logits(logits, _rows(torch.device("cpu"), vocab))
    gpu = adjust_logits(logits.cuda(), _rows(torch.device("cuda"), vocab)).cpu()
    assert torch.equal(torch.isinf(cpu), torch.isinf(gpu))
    finite = ~torch.isinf(cpu)
    torch.testing.assert_close(gpu[finite], cpu[finite])
    assert torch.equal(gpu[1], logits[1])


def test_knobs_through_the_engine_with_cuda_graphs(tiny_llama_dir: Path) -> None:
    forced = 1234
    outs, engine = run_engine(
        tiny_llama_dir,
        [
            request(PROMPT, 30, temperature=0.0),
            request(PROMPT, 30, temperature=0.0, logit_bias=((forced, 100.0),)),
            request(PROMPT, 30, temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.5),
            request(PROMPT, 30, temperature=1.0, seed=9, presence_penalty=1.0, logit_bias=((5, 2.0),)),
        ],
        **CUDA,
    )
    plain, biased, penalised, seeded = (tokens_of(o) for o in outs)
    assert engine.loaded.device.type == "cuda" and engine._executor.graphs is not None
    assert biased == [forced] * 30
    banned_out, _ = run_engine(
        tiny_llama_dir, [request(PROMPT, 30, temperature=0.0, logit_bias=((plain[0], -100.0),))], **CUDA
    )
    assert plain[0] not in tokens_of(banned_out[0])
    # Rows without knobs keep the graph's greedy path: the same tokens as alone.
    (alone,), _ = run_engine(tiny_llama_dir, [request(PROMPT, 30, temperature=0.0)], **CUDA)
    assert tokens_of(alone) == plain
    # A seeded row with knobs draws the same tokens whatever its batch.
    (seeded_alone,), _ = run_engine(
        tiny_llama_dir,
        [request(PROMPT, 30, temperature=1.0, seed=9, presence_penalty=1.0, logit_bias=((5, 2.0),))],
        **CUDA,
    )
    assert tokens_of(seeded_alone) == seeded
    assert penalised != plain
