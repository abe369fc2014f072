"""Penalties, logit bias, allowed tokens and bad words: the batched processors against a plain
reference of their formulas on logits recorded from the tiny model, and through the torch engine
(greedy output moves the way each knob says)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from turbine.engines.torch.logits_processors import RowAdjust, TokenCounts, adjust_logits

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 99, 400, 1000, 7, 12, 3000]


@dataclasses.dataclass
class Knobs:
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: dict[int, float] = dataclasses.field(default_factory=dict)
    allowed: list[int] | None = None
    bad: list[int] = dataclasses.field(default_factory=list)


def _reference(row: list[float], prompt: list[int], output: list[int], k: Knobs) -> list[float]:
    """The formulas, one token at a time: allowed → bad words → bias → repetition (prompt and
    output) → frequency and presence (output only)."""
    out = list(row)
    if k.allowed is not None:
        out = [v if i in k.allowed else -math.inf for i, v in enumerate(out)]
    for t in k.bad:
        out[t] = -math.inf
    for t, b in k.bias.items():
        out[t] += b
    if k.repetition != 1.0:
        for t in set(prompt) | set(output):
            out[t] = out[t] / k.repetition if out[t] > 0 else out[t] * k.repetition
    for t, count in collections.Counter(output).items():
        out[t] -= k.frequency * count + k.presence
    return out


def _recorded_logits(model_dir: Path, prompts: list[list[int]]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    rows = []
    with torch.no_grad():
        for p in prompts:
            rows.append(model(torch.tensor([p])).logits[0, -1])
    return torch.stack(rows)


def test_adjusted_logits_match_the_reference_formulas(tiny_llama_dir: Path) -> None:
    prompts = [PROMPT, PROMPT[:5], [9, 9, 31, 2000, 45], [77, 1, 2, 3]]
    outputs = [[], [40, 40, 41, 7], [3000, 12, 12, 12, 9], [5, 6, 5]]
    logits = _recorded_logits(tiny_llama_dir, [p + o for p, o in zip(prompts, outputs, strict=True)])
    vocab = logits.shape[1]
    top = torch.topk(logits, 3, dim=-1).indices.tolist()
    settings = [
        None,
        Knobs(presence=0.5, frequency=1.5, repetition=1.3),
        Knobs(
            bias={top[2][0]: -100.0, top[2][2]: 7.5, 11: 2.0},
            allowed=[top[2][1], top[2][2], 11, 40],
            repetition=0.8,
        ),
        Knobs(presence=-1.0, frequency=2.0, bias={5: 3.0}, bad=[top[3][0], 6]),
    ]
    buffer = TokenCounts(vocab, torch.device("cpu"))
    rows: list[RowAdjust | None] = []
    for seq_id, (prompt, output, k) in enumerate(zip(prompts, outputs, settings, strict=True)):
        if k is None:
            rows.append(None)
            continue
        history = (
            buffer.track(seq_id, len(prompt)) if k.presence or k.frequency or k.repetition != 1 else None
        )
        pending = history.take(prompt + output) if history is not None else (0, [])
        rows.append(
            RowAdjust(
                presence=k.presence,
                frequency=k.frequency,
                repetition=k.repetition,
                bias_ids=list(k.bias),
                bias_values=list(k.bias.values()),
                allowed=k.allowed,
                bad=k.bad,
                history=history,
                counts=buffer if history is not None else None,
                pending=pending,
            )
        )
    got = adjust_logits(logits, rows)
    assert torch.equal(got[0], logits[0])  # a row with no knobs is untouched
    for i in range(1, 4):
        k = settings[i]
        assert k is not None
        want = torch.tensor(_reference(logits[i].tolist(), prompts[i], outputs[i], k))
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        finite = ~torch.isinf(want)
        torch.testing.assert_close(got[i][finite], want[finite], rtol=1e-6, atol=1e-5)
    assert not torch.equal(got[1], logits[1])  # the penalties did change something
    # A history folds only what is new: a second step adds just the next token's count.
    row = rows[1]
    assert row is not None and row.history is not None
    history = row.history
    counts, seen = buffer.rows(torch.tensor([history.slot]))
    assert counts[0, 40].item() == 2.0 and counts[0, PROMPT[0]].item() == 0.0 and seen[0, PROMPT[0]]
    buffer.fold([(history, history.take(prompts[1] + outputs[1] + [40]))])
    assert buffer.rows(torch.tensor([history.slot]))[0][0, 40].item() == 3.0
    # A released row is reused, from zero.
    buffer.release(1)
    again = buffer.track(99, 2)
    assert again.slot == history.slot
    buffer.fold([(again, again.take([40, 40, 7]))])
    counts, seen = buffer.rows(torch.tensor([again.slot]))
    assert counts[0].sum().item() == 1.0 and counts[0, 7].item() == 1.0 and int(seen[0].sum()) == 2


def _greedy(model_dir: Path, n: int = 40, **sampling: Any) -> list[int]:
    (out,), _ = run_engine(model_dir, [request(PROMPT, n, temperature=0.0, **sampling)])
    return tokens_of(out)


def _repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


def test_logit_bias_bans_and_forces_tokens(tiny_llama_dir: Path) -> None:
    plain = _greedy(tiny_llama_dir)
    common = collections.Counter(plain).most_common(1)[0][0]
    banned = _greedy(tiny_llama_dir, logit_bias=((common, -100.0),))
    assert common not in banned and banned != plain
    forced_token = next(t for t in range(100, 4000) if t not in plain)
    forced = _greedy(tiny_llama_dir, logit_bias=((forced_token, 100.0),))
    assert forced == [forced_token] * len(plain)


def test_penalties_lower_repetition(tiny_llama_dir: Path) -> None:
    # The random model rarely repeats on its own; a +3 bias on three tokens makes it loop on them.
    lure = tuple((t, 3.0) for t in _greedy(tiny_llama_dir, 3))
    runs: list[dict[str, Any]] = [
        {},
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 2.0},
    ]
    outs, _ = run_engine(
        tiny_llama_dir, [request(PROMPT, 40, temperature=0.0, logit_bias=lure, **r) for r in runs]
    )
    plain, *penalised = (tokens_of(o) for o in outs)
    assert _repeats(plain) > 10
    for knobs, tokens in zip(runs[1:], penalised, strict=True):
        assert _repeats(tokens) < _repeats(plain), (knobs, plain, tokens)
    # A negative frequency penalty rewards repeating.
    (unlured, rewarded), _ = run_engine(
        tiny_llama_dir,
        [request(PROMPT, 40, temperature=0.0), request(PROMPT, 40, temperature=0.0, frequency_penalty=-2.0)],
    )
    assert _repeats(tokens_of(rewarded)) > _repeats(tokens_of(unlured))


def test_allowed_tokens_and_bad_words(tiny_llama_dir: Path) -> None:
    plain = _greedy(tiny_llama_dir, 20)
    allowed = (plain[0], 300, 301, 302)
    limited = _greedy(tiny_llama_dir, 20, allowed_token_ids=allowed)
    assert set(limited) <= set(allowed)
    # A one-token bad word never appears; a two-token one never appears as a pair.
    first = plain[0]
    single = _greedy(tiny_llama_dir, 20, bad_words_ids=((first,),))
    assert first not in single
    pair = (plain[0], plain[1])
    without_pair = _greedy(tiny_llama_dir, 20, bad_words_ids=(pair,))
    assert without_pair[0] == plain[0]  # the first token alone is fine
    assert pair not in set(itertools.pairwise(without_pair))


def test_seeded_draws_with_knobs_do_not_depend_on_the_batch(tiny_llama_dir: Path) -> None:
    knobs: dict[str, Any] = {
        "frequency_penalty": 1.0,
        "repetition_penalty": 1.2,
        "logit_bias": ((PROMPT[0], 2.0),),
    }
    alone, _ = run_engine(tiny_llama_dir, [request(PROMPT, 30, temperature=1.0, seed=11, **knobs)])
    batch, _ = run_engine(
        tiny_llama_dir,
        [
            request(PROMPT[:4], 30, temperature=0.7, seed=3),
            request(PROMPT, 30, temperature=1.0, seed=11, **knobs),
            request(PROMPT, 30, temperature=0.0, presence_penalty=1.0),
        ],
    )
    assert tokens_of(batch[1]) == tokens_of(alone[0])


def test_a_migrated_continuation_counts_its_earlier_output(tiny_llama_dir: Path) -> None:
    """`prior_output_tokens`: the continuation of a moved stream penalises what it had generated."""
    whole = _greedy(tiny_llama_dir, 30, frequency_penalty=2.0)
    head = whole[:10]
    (rest,), _ = run_engine(
        tiny_llama_dir,
        [request(PROMPT + head, 20, temperature=0.0, frequency_penalty=2.0, prior_output_tokens=len(head))],
    )
    assert head + tokens_of(rest) == whole
