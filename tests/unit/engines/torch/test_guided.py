"""Guided decoding in the torch engine: a random-weight model (which would write noise) produces only
what each row's grammar allows, batched with unconstrained rows that stay exactly as they are alone;
EOS comes only where the grammar is complete; a continued request (migration) resumes the grammar."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import tokenizers
import torch

from tests.unit.engines.torch.helpers import request, run_engine, tokens_of
from turbine.engines.torch.grammar import apply_bitmask
from turbine.protocol.request import GuidedDecoding, PreprocessedRequest
from turbine.protocol.response import FinishReason

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 99, 400, 1000, 7, 12, 3000]
EOS = 2
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["n"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "tags", "inner"],
    "additionalProperties": False,
}


def _guided(kind: str, spec: str, max_tokens: int = 80, **sampling: Any) -> PreprocessedRequest:
    return request(
        PROMPT, max_tokens, ignore_eos=False, guided=GuidedDecoding(kind, spec, "test"), **sampling
    )


def _text(model_dir: Path, ids: list[int]) -> str:
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.decode([t for t in ids if t != EOS])


def test_guided_rows_follow_their_grammar_beside_free_rows(tiny_llama_dir: Path) -> None:
    free = request(PROMPT, 20, temperature=0.0)
    (alone,), _ = run_engine(tiny_llama_dir, [free])
    results, engine = run_engine(
        tiny_llama_dir,
        [
            _guided("json_schema", json.dumps(SCHEMA), temperature=0.0),
            request(PROMPT, 20, temperature=0.0),
            _guided("regex", "[0-9]{3}-[a-z]{2}", temperature=1.0, seed=5),
            _guided("choice", json.dumps(["alpha", "beta gamma"]), temperature=0.0),
            _guided("grammar", 'start: "x" ("," "x")* "!"', max_tokens=12, temperature=0.0),
        ],
    )
    assert "guided_decoding" in engine.capacity().capabilities
    assert tokens_of(results[1]) == tokens_of(alone)  # the unconstrained row is untouched
    for i in (0, 2, 3):
        # Ended by EOS (not max_tokens), which the grammar allowed only once complete.
        assert results[i][-1].finish_reason is FinishReason.STOP, results[i][-1]
    jsonschema_rs.validate(SCHEMA, json.loads(_text(tiny_llama_dir, tokens_of(results[0]))))
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", _text(tiny_llama_dir, tokens_of(results[2])))
    assert _text(tiny_llama_dir, tokens_of(results[3])) in ("alpha", "beta gamma")
    # An unbounded grammar cut by max_tokens: what came so far is a prefix of the language.
    assert re.fullmatch(r"x(,x)*!?", _text(tiny_llama_dir, tokens_of(results[4])))


def test_a_continued_request_resumes_its_grammar(tiny_llama_dir: Path) -> None:
    """A migrated stream comes back with the tokens sent so far appended to the prompt and counted in
    `prior_output_tokens`: the grammar is advanced over them, so greedy output goes on unchanged."""
    spec = json.dumps(SCHEMA)
    (whole,), _ = run_engine(tiny_llama_dir, [_guided("json_schema", spec, temperature=0.0)])
    ids = tokens_of(whole)
    cut = len(ids) // 2
    first = _guided("json_schema", spec, temperature=0.0)
    resumed = PreprocessedRequest(
        request_id="resumed",
        model="m",
        token_ids=PROMPT + ids[:cut],
        sampling=first.sampling.__class__(
            temperature=0.0, guided=first.sampling.guided, prior_output_tokens=cut
        ),
        stop=first.stop.__class__(max_tokens=first.stop.max_tokens - cut),
        eos_token_ids=(EOS,),
    )
    (rest,), _ = run_engine(tiny_llama_dir, [resumed])
    assert ids[:cut] + tokens_of(rest) == ids


def test_a_grammar_that_does_not_compile_is_refused_by_the_engine(tiny_llama_dir: Path) -> None:
    (out,), _ = run_engine(tiny_llama_dir, [_guided("grammar", "start: nowhere")])
    assert out[-1].finish_reason is FinishReason.ERROR and "test" in (out[-1].error or ""), out


def test_apply_bitmask_blocks_exactly_the_cleared_bits() -> None:
    logits = torch.zeros(3, 70)
    mask = torch.zeros(2, 3, dtype=torch.int32)
    mask[0, 0] = 1 << 5  # row 0: token 5 only
    mask[1, 1] = -(1 << 31)  # row 2: token 63 only (bit 31 of word 1)
    out = apply_bitmask(logits, [0, 2], mask)
    assert out[0].isfinite().nonzero().flatten().tolist() == [5]
    assert out[1].isfinite().all()  # not a guided row
    assert out[2].isfinite().nonzero().flatten().tolist() == [63]
    assert logits.isfinite().all()  # the input is not modified


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guided_rows_on_cuda_beside_free_rows_under_cuda_graphs(tiny_llama_dir: Path) -> None:
    """On CUDA the masks go to the device and apply to the captured graph's logits; free greedy rows
    keep their run-ahead when alone and their tokens when batched with guided ones."""
    cuda = {"device": "cuda", "dtype": "float32", "num_gpu_blocks": 64}
    (alone,), _ = run_engine(tiny_llama_dir, [request(PROMPT, 24, temperature=0.0)], **cuda)
    results, engine = run_engine(
        tiny_llama_dir,
        [
            request(PROMPT, 24, temperature=0.0),
            _guided("json_schema", json.dumps(SCHEMA), temperature=0.0),
            _guided("regex", "[0-9]{3}-[a-z]{2}", temperature=0.8, seed=3),
        ],
        **cuda,
    )
    assert engine._executor.graphs is not None  # the decode steps ran through captured graphs
    assert tokens_of(results[0]) == tokens_of(alone)
    assert results[1][-1].finish_reason is FinishReason.STOP
    jsonschema_rs.validate(SCHEMA, json.loads(_text(tiny_llama_dir, tokens_of(results[1]))))
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", _text(tiny_llama_dir, tokens_of(results[2])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_guided_rows_run_ahead_on_cuda(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy guided rows choose their tokens under the grammar on the GPU and queue the next decode
    step from them (run-ahead), with the tokens of a run without it."""
    from turbine.engines.torch.runner import TorchExecutor

    cuda = {"device": "cuda", "dtype": "float32", "num_gpu_blocks": 64}

    def reqs() -> list[PreprocessedRequest]:
        return [
            _guided("json_schema", json.dumps(SCHEMA), temperature=0.0),
            _guided("regex", "[0-9]{3}-[a-z]{2}", temperature=0.0),
        ]

    runs, hits = {}, {}
    for ahead in (True, False):
        monkeypatch.setattr(TorchExecutor, "run_ahead", ahead)
        results, engine = run_engine(tiny_llama_dir, reqs(), **cuda)
        runs[ahead] = [tokens_of(r) for r in results]
        hits[ahead] = engine.executor().ahead_hits  # type: ignore[attr-defined]
    assert runs[True] == runs[False]
    assert hits[True] > 0 and hits[False] == 0
    jsonschema_rs.validate(SCHEMA, json.loads(_text(tiny_llama_dir, runs[True][0])))
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", _text(tiny_llama_dir, runs[True][1]))
