"""The served benchmark's ideal: rates at the workloads' own lengths, and chat prompts of the
lengths asked for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from turbine.bench.engine_rates import EngineRates, spread
from turbine.bench.serve import chat_workload
from turbine.preprocess.chat_template import ChatTemplate
from turbine.preprocess.tokenizer import load_model_files


def rates() -> EngineRates:
    # Decode slows with the context (a step reads every sequence's KV cache); prefill too, a little.
    return EngineRates(
        prefill={300: 3000.0, 900: 2400.0},
        decode={(8, 300): 240.0, (8, 900): 160.0, (1, 300): 50.0},
    )


def test_rates_interpolate_between_the_measured_lengths_and_stay_flat_beyond() -> None:
    r = rates()
    assert r.prefill_tok_s(600) == pytest.approx(2700.0)
    assert r.prefill_tok_s(100) == 3000.0 and r.prefill_tok_s(5000) == 2400.0
    assert r.decode_tok_s(8, 450) == pytest.approx(220.0)
    assert r.step_s(8, 900) == pytest.approx(8 / 160)
    assert r.step_s(1, 2000) == pytest.approx(1 / 50)


def test_the_ideal_takes_the_decode_rate_at_the_prompts_mean_length() -> None:
    r = rates()
    c, out = 8, 64
    short, long = [300] * c, [900] * c
    expected_long = c * out / (c * 900 / 2400.0 + out * 8 / 160.0)
    assert r.ideal_tok_s(c, long, out) == pytest.approx(expected_long)
    # Mixed lengths: each prompt's prefill at its own rate, decode at the mean (600) length.
    mixed = [300, 900] * (c // 2)
    prefill_s = c * (300 / 3000.0 + 900 / 2400.0) / 2
    assert r.ideal_tok_s(c, mixed, out) == pytest.approx(c * out / (prefill_s + out * 8 / 200.0))
    assert r.ideal_tok_s(c, long, out) < r.ideal_tok_s(c, mixed, out) < r.ideal_tok_s(c, short, out)


def test_spread_keeps_one_length_per_ten_percent() -> None:
    assert spread([512, 500.4, 530, 900, 880, 1400]) == [500, 880, 1400]
    assert spread([300]) == [300]


def test_chat_prompts_have_the_asked_lengths_after_the_template(tiny_llama_dir: Path) -> None:
    files = load_model_files(tiny_llama_dir)
    assert files.chat_template is not None
    template = ChatTemplate(files.chat_template, files.bos_token, files.eos_token)
    load = chat_workload(files.tokenizer, template.render, 24, 200, 600, 8, 5)
    first_target = random.Random(5).randint(200, 600)  # the workload's first draw
    for body, length in zip(load.bodies, load.prompt_tokens, strict=True):
        assert len(files.tokenizer.encode(template.render(body["messages"])).ids) == length
        assert 190 <= length <= 600
    assert first_target - 12 <= load.prompt_tokens[0] <= first_target  # within a word of it
    # Spread over the range, not bunched at one end.
    assert min(load.prompt_tokens) < 300 and max(load.prompt_tokens) > 500
