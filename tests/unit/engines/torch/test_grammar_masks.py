"""The guided rows' bitmasks (`engines/torch/grammar.py`): the request's EOS ids stand for the
grammar's end, a matcher that left its grammar allows EOS only, a batch's rows get the masks they get
alone, and a row started as soon as its token was sampled (`Guides.speculate`) is the one the next
step uses, unless the sequence went on otherwise."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import llguidance
import pytest
import tokenizers
import torch

from turbine.engines.core.scheduler import Seq
from turbine.engines.torch.grammar import GuideRow, Guides, _State, constrain, fill
from turbine.protocol.request import GuidedDecoding, SamplingOptions

pytestmark = pytest.mark.unit

VOCAB = 4096


@pytest.fixture
def guides(tiny_llama_dir: Path) -> Iterator[Guides]:
    guides = Guides(tiny_llama_dir / "tokenizer.json", VOCAB)
    yield guides
    guides.close()


def _ids(model_dir: Path, text: str) -> list[int]:
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return list(tok.encode(text, add_special_tokens=False).ids)


def _allowed(mask: torch.Tensor) -> set[int]:
    bits = (mask[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def _state(guides: Guides, kind: str, spec: str, eos: list[int]) -> _State:
    matcher = guides.grammars.matcher(GuidedDecoding(kind, spec, "test"))
    return _State(matcher, 0, guides.grammars.tokenizer.eos_token, eos)


def test_the_requests_eos_ids_stand_for_the_grammars_end(guides: Guides, tiny_llama_dir: Path) -> None:
    state = _state(guides, "choice", json.dumps(["yes"]), [2, 7])
    end = state.end
    out = torch.empty((1, guides.words), dtype=torch.int32)
    fill([GuideRow(state, [])], out)
    assert not {2, 7, end} & _allowed(out[0])  # nothing written yet: no end
    fill([GuideRow(state, _ids(tiny_llama_dir, "yes"))], out)
    assert _allowed(out[0]) == {2, 7}  # complete: the request's EOS ids, not the library's end


def test_a_row_that_left_its_grammar_allows_eos_only(guides: Guides, tiny_llama_dir: Path) -> None:
    state = _state(guides, "regex", "[0-9]+", [2])
    out = torch.empty((1, guides.words), dtype=torch.int32)
    fill([GuideRow(state, _ids(tiny_llama_dir, "abc"))], out)
    assert state.matcher.is_error()
    assert _allowed(out[0]) == {2}


@pytest.mark.parametrize("threads", [None, 1, 2], ids=["row by row", "pool of 1", "pool of 2"])
def test_a_batch_gets_each_rows_own_mask(guides: Guides, tiny_llama_dir: Path, threads: int | None) -> None:
    """Rows of different grammars and EOS lists (one that left its grammar) in one bitmask, row by row
    or through the library's pool: each row's mask is the one it gets alone."""

    def rows() -> list[GuideRow]:
        return [
            GuideRow(_state(guides, "regex", "[0-9]{2,4}", [2]), _ids(tiny_llama_dir, "12")),
            GuideRow(_state(guides, "choice", json.dumps(["alpha", "beta"]), [2, 9]), []),
            GuideRow(_state(guides, "regex", "[0-9]+", [3]), _ids(tiny_llama_dir, "x")),  # left it
            GuideRow(
                _state(guides, "json_schema", '{"type": "object"}', []), _ids(tiny_llama_dir, '{"a": 1}')
            ),
            GuideRow(_state(guides, "regex", "ab", [2]), _ids(tiny_llama_dir, "ab")),
        ]

    batch = torch.empty((5, guides.words), dtype=torch.int32)
    fill(rows(), batch, None if threads is None else llguidance.LLExecutor(threads))
    for i, row in enumerate(rows()):
        alone = torch.empty((1, guides.words), dtype=torch.int32)
        fill([row], alone)
        assert torch.equal(batch[i], alone[0]), i
    assert _allowed(batch[2]) == {3} and _allowed(batch[4]) == {2}


def _seq(tokens: list[int], prompt_len: int, guided: GuidedDecoding) -> Seq:
    return Seq(
        seq_id=1,
        tokens=tokens,
        prompt_len=prompt_len,
        max_tokens=50,
        eos_token_ids=frozenset({2}),
        sampling=SamplingOptions(guided=guided),
    )


def test_a_row_started_when_its_token_was_sampled_is_the_next_steps(
    guides: Guides, tiny_llama_dir: Path
) -> None:
    guided = GuidedDecoding("regex", "[0-9]{1,6}", "test")
    digits = _ids(tiny_llama_dir, "123456")
    seq = _seq([5, 6], 2, guided)
    first = guides.row(seq)
    assert first is not None
    guides.prepare([first])
    guides.speculate([first], [digits[0]])
    seq.append(digits[0])
    second = guides.row(seq)
    assert second is not None and second.new_tokens == [digits[0]] and second.mask is not None
    assert torch.equal(second.mask.result(), _fresh_mask(guides, seq, guided))


def test_a_sequence_that_went_on_otherwise_gets_a_new_matcher(guides: Guides, tiny_llama_dir: Path) -> None:
    guided = GuidedDecoding("regex", "[0-9]{1,6}", "test")
    one, two = _ids(tiny_llama_dir, "1")[0], _ids(tiny_llama_dir, "2")[0]
    seq = _seq([5, 6], 2, guided)
    first = guides.row(seq)
    assert first is not None
    guides.prepare([first])
    guides.speculate([first], [one])
    seq.append(two)  # not what the runner started from
    second = guides.row(seq)
    assert second is not None and second.new_tokens == [two] and second.state is not first.state
    guides.prepare([second])
    assert second.mask is not None
    assert torch.equal(second.mask.result(), _fresh_mask(guides, seq, guided))


def test_an_eos_starts_nothing(guides: Guides) -> None:
    seq = _seq([5, 6], 2, GuidedDecoding("regex", "[0-9]{1,6}", "test"))
    first = guides.row(seq)
    assert first is not None
    guides.speculate([first], [2])
    assert first.state.ahead is None


def _fresh_mask(guides: Guides, seq: Seq, guided: GuidedDecoding) -> torch.Tensor:
    """The mask of a matcher that consumed the sequence's output in one go."""
    state = _State(guides.grammars.matcher(guided), seq.prompt_len, guides.grammars.tokenizer.eos_token, [2])
    out = torch.empty((1, guides.words), dtype=torch.int32)
    fill([GuideRow(state, seq.tokens[seq.prompt_len :])], out)
    return out[0]


def test_what_the_masks_cost_is_counted_and_logged_at_close(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guides = Guides(tiny_llama_dir / "tokenizer.json", VOCAB, threads=2)
    guided = GuidedDecoding("regex", "[0-9]{1,6}", "test")
    seqs = [_seq([5, 6], 2, guided) for _ in range(3)]
    for i, seq in enumerate(seqs):
        seq.seq_id = 10 + i
    ready = [row for seq in seqs if (row := guides.row(seq)) is not None]
    assert len(ready) == 3
    guides.prepare(ready)
    constrain(torch.zeros((3, VOCAB)), [0, 1, 2], ready)
    assert guides.stats.computations == 1 and guides.stats.rows == 3
    assert guides.stats.computing_s > 0 and guides.stats.waiting_s >= 0
    with caplog.at_level(logging.INFO, logger="turbine.engines.torch.grammar"):
        guides.close()
    assert "guided masks: 3 rows in 1 computations on 2 threads" in caplog.text
