"""Sampling through the torch engine: seeds, top-k 1, min_tokens, logprobs against the model's own
log-softmax; and the sampler's filters on hand-made distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from turbine.engines.torch.sampler import RowParams, sample
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 99, 400, 1000, 7, 12, 3000]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llama_dir: Path) -> None:
    alone, _ = run_engine(tiny_llama_dir, [request(PROMPT, 30, temperature=1.0, seed=42)])
    batch, _ = run_engine(
        tiny_llama_dir,
        [
            request(PROMPT, 30, temperature=1.0, seed=7),
            request(PROMPT, 30, temperature=1.0, seed=42),
            request(PROMPT[:5], 30, temperature=0.9),
        ],
    )
    assert tokens_of(batch[1]) == tokens_of(alone[0])
    assert tokens_of(batch[0]) != tokens_of(alone[0])  # another seed, another draw


def test_top_k_1_equals_greedy(tiny_llama_dir: Path) -> None:
    results, _ = run_engine(
        tiny_llama_dir,
        [request(PROMPT, 30, temperature=0.0), request(PROMPT, 30, temperature=1.0, top_k=1, seed=3)],
    )
    assert tokens_of(results[0]) == tokens_of(results[1])


def test_min_tokens_bans_eos_then_eos_stops(tiny_llama_dir: Path) -> None:
    """With EOS = the greedy first token, min_tokens=0 stops at once; min_tokens=3 forbids it for 3."""
    (probe,), _ = run_engine(tiny_llama_dir, [request(PROMPT, 1, temperature=0.0)])
    first = tokens_of(probe)[0]

    def with_eos(min_tokens: int) -> PreprocessedRequest:
        return PreprocessedRequest(
            request_id=f"eos{min_tokens}",
            model="m",
            token_ids=PROMPT,
            sampling=SamplingOptions(temperature=0.0),
            stop=StopConditions(max_tokens=10, min_tokens=min_tokens),
            eos_token_ids=(first,),
        )

    (stopped, delayed), _ = run_engine(tiny_llama_dir, [with_eos(0), with_eos(3)])
    assert tokens_of(stopped) == [] and stopped[-1].finish_reason == "stop"
    got = tokens_of(delayed)
    assert len(got) >= 3 and first not in got[:3]


def test_logprobs_match_the_models_log_softmax(tiny_llama_dir: Path) -> None:
    (out,), _ = run_engine(tiny_llama_dir, [request(PROMPT, 12, temperature=0.0, logprobs=5)])
    tokens = tokens_of(out)
    logprobs = [lp for o in out for lp in (o.logprobs or [])]
    top = [t for o in out for t in (o.top_logprobs or [])]
    assert len(logprobs) == len(top) == len(tokens) == 12
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + tokens])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, (tok, lp, alternatives) in enumerate(zip(tokens, logprobs, top, strict=True)):
        row = reference[len(PROMPT) - 1 + i]
        assert lp == pytest.approx(row[tok].item(), abs=1e-4)
        values, ids = torch.topk(row, 5)
        assert [a for a, _ in alternatives] == ids.tolist()
        assert [b for _, b in alternatives] == pytest.approx(values.tolist(), abs=1e-4)
        assert alternatives[0][0] == tok  # greedy: the sampled token is the most likely


# ---- the sampler alone ---------------------------------------------------------------------------


def _draws(logits: list[float], params: RowParams, n: int = 4000) -> torch.Tensor:
    rows = torch.tensor([logits] * n, dtype=torch.float32)
    return torch.tensor([s.token_id for s in sample(rows, [params] * n)])


def test_sampler_follows_the_distribution_and_its_filters() -> None:
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist()
    freq = torch.bincount(_draws(logits, RowParams(temperature=1.0)), minlength=4) / 4000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    assert set(_draws(logits, RowParams(temperature=1.0, top_k=2)).tolist()) == {0, 1}
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it; the rest is cut.
    assert set(_draws(logits, RowParams(temperature=1.0, top_p=0.7)).tolist()) == {0, 1}
    # min_p 0.5: tokens below half the top probability (0.25) are cut.
    assert set(_draws(logits, RowParams(temperature=1.0, min_p=0.5)).tolist()) == {0, 1}
    assert set(_draws(logits, RowParams(temperature=0.0, banned=[0])).tolist()) == {1}


def test_seeded_generators_repeat_their_draws() -> None:
    logits = torch.zeros(1, 1000)

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [sample(logits, [RowParams(generator=gen)])[0].token_id for _ in range(20)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_a_rows_knobs_are_built_once_unless_they_change_from_step_to_step(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor keeps a sequence's `RowParams` while nothing in them can change; rows with
    penalties (token counts) or under `min_tokens` (banned ids) get theirs built every step."""
    from turbine.engines.torch.runner import TorchExecutor

    built: dict[int, int] = {}
    original = TorchExecutor._new_params

    def counting(self: TorchExecutor, seq: Any) -> RowParams:
        built[seq.tokens[0]] = built.get(seq.tokens[0], 0) + 1
        return original(self, seq)

    monkeypatch.setattr(TorchExecutor, "_new_params", counting)
    plain = request([11, *PROMPT], 10, temperature=0.0)
    penalised = request([12, *PROMPT], 10, temperature=0.0, presence_penalty=1.0)
    seeded = request([13, *PROMPT], 10, temperature=1.0, seed=5)
    late_eos = PreprocessedRequest(
        request_id="late-eos",
        model="m",
        token_ids=[14, *PROMPT],
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=10, min_tokens=4, ignore_eos=True),
        eos_token_ids=(2,),
    )
    results, _ = run_engine(tiny_llama_dir, [plain, penalised, seeded, late_eos])
    assert [len(tokens_of(r)) for r in results] == [10, 10, 10, 10]
    assert built == {11: 1, 12: 10, 13: 1, 14: 5}
    (again,), _ = run_engine(tiny_llama_dir, [request([13, *PROMPT], 10, temperature=1.0, seed=5)])
    assert tokens_of(again) == tokens_of(results[2])  # the kept generator goes on drawing as before
