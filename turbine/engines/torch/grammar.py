"""Guided decoding in the batched sampler: per-sequence grammar state, token bitmasks, their use.

Each guided sequence has a matcher (`engines/grammar.py`) that has consumed every token the sequence
produced under the grammar: its own output, and after a migration also the earlier worker's (the
last `prior_output_tokens` of the prompt). On the event loop, a step hands each guided row the
tokens appended since its last step (`Guides.row`); on the runner thread the matcher consumes them
and writes the row's bitmask of allowed next tokens (`Guides.prepare`, started before the forward so
that on CUDA, where the forward only queues kernels, the mask is computed while the GPU works, and on
CPU in a thread beside it); the sampler then sets every disallowed logit of those rows to -inf on
the logits' device (`constrain`). Rows without a grammar are untouched. EOS is allowed only where the
grammar is complete; a finished grammar allows nothing but EOS.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llguidance
import torch

from turbine.engines.core.scheduler import Seq
from turbine.engines.grammar import GrammarError, Grammars, load_tokenizer
from turbine.protocol.request import GuidedDecoding

log = logging.getLogger(__name__)


@dataclass
class _State:
    matcher: llguidance.LLMatcher
    start: int
    """Index in `Seq.tokens` of the first token under the grammar."""
    end: int
    """The grammar library's end token: its bit says whether the grammar may end here."""
    eos_ids: list[int] = field(default_factory=list)
    """The request's EOS ids, allowed exactly where the grammar may end."""
    fed: int = 0
    """Tokens from `start` already handed to the runner thread."""


@dataclass
class GuideRow:
    """One guided row of a step: the tokens its matcher has yet to consume, and (once prepared) the
    bitmask computation."""

    state: _State
    new_tokens: list[int]
    mask: Future[torch.Tensor] | None = None


class Guides:
    """The guided sequences of one engine. `row`/`release`/`error` run on the event loop, `prepare`
    (and `constrain`) on the runner thread; a sequence is in at most one step at a time."""

    def __init__(self, tokenizer_json: Path, vocab_size: int) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._grammars: Grammars | None = None
        self._states: dict[int, _State] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")

    def load(self) -> None:
        """Read the vocabulary into the grammar library (slow: call it off the event loop, before
        serving). Its end token is one of the tokenizer's special tokens, which no grammar matches as
        text; each request's own EOS ids take its place in the masks (`_fill`)."""
        if self._grammars is None:
            marker = _special_token(self._tokenizer_json)
            ends = [marker] if marker is not None and marker < self.vocab_size else []
            self._grammars = Grammars(load_tokenizer(self._tokenizer_json, self.vocab_size, ends))

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            self.load()
        assert self._grammars is not None
        return self._grammars

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def error(self, guided: GuidedDecoding) -> str | None:
        """Why this engine cannot enforce `guided` (it does not compile), or None."""
        return self.grammars.error(guided)

    def row(self, seq: Seq) -> GuideRow | None:
        guided = seq.sampling.guided
        if guided is None:
            return None
        state = self._states.get(seq.seq_id)
        if state is None:
            grammars = self.grammars
            try:
                matcher = grammars.matcher(guided)
            except GrammarError as exc:  # `TorchEngine.rejection` refused such requests already
                raise RuntimeError(f"request grammar does not compile: {exc}") from None
            start = seq.prompt_len - min(seq.sampling.prior_output_tokens, seq.prompt_len)
            eos = sorted(t for t in seq.eos_token_ids if 0 <= t < self.vocab_size)
            end = grammars.tokenizer.eos_token
            state = self._states[seq.seq_id] = _State(matcher, start, end, eos)
        new = seq.tokens[state.start + state.fed :]
        state.fed += len(new)
        return GuideRow(state, new)

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def prepare(self, rows: list[GuideRow]) -> None:
        """Start the rows' mask computation beside the forward."""
        if rows:
            future = self._thread.submit(self._masks, rows)
            for i, row in enumerate(rows):
                row.mask = _Slice(future, i)

    def _masks(self, rows: list[GuideRow]) -> torch.Tensor:
        bitmask = torch.empty((len(rows), self.words), dtype=torch.int32)
        for i, row in enumerate(rows):
            _fill(row, bitmask[i])
        return bitmask


def _fill(row: GuideRow, out: torch.Tensor) -> None:
    """Advance the row's matcher over its new tokens and write its bitmask into `out`: what the
    grammar allows next, with the request's EOS ids standing for the library's end token."""
    state = row.state
    matcher = state.matcher
    # The few words touched below go through a NumPy view of the row: indexing a tensor element by
    # element costs more per row than the library's own mask computation.
    words = out.numpy()
    if row.new_tokens and not matcher.consume_tokens(row.new_tokens):
        log.warning("a guided sequence left its grammar: %s", matcher.get_error())
    if matcher.is_error():  # end it: EOS only
        words[:] = 0
        can_end = True
    else:
        matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())
        can_end = bool((int(words[state.end // 32]) >> (state.end % 32)) & 1)
    ends = state.eos_ids or [state.end]
    for t in {state.end, *ends}:
        words[t // 32] &= ~_bit(t % 32)
    if can_end:
        for t in ends:
            words[t // 32] |= _bit(t % 32)


def _special_token(tokenizer_json: Path) -> int | None:
    """The id of the tokenizer's first special added token (`<|endoftext|>`, `</s>`, ...)."""
    try:
        added = json.loads(tokenizer_json.read_text()).get("added_tokens") or []
    except (OSError, ValueError):
        return None
    ids = [
        t["id"] for t in added if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int)
    ]
    return min(ids) if ids else None


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


class _Slice(Future[torch.Tensor]):
    """Row i of a batch's bitmask future."""

    def __init__(self, whole: Future[torch.Tensor], i: int) -> None:
        super().__init__()
        self._whole = whole
        self._i = i

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self._whole.result(timeout)[self._i]


def constrain(logits: torch.Tensor, rows: list[int], guides: list[GuideRow]) -> torch.Tensor:
    """`logits` with every token that row `rows[i]`'s grammar disallows at -inf (a copy; the other
    rows unchanged). Masks not prepared beside the forward are computed now."""
    bitmask = torch.empty((len(rows), -(-logits.shape[1] // 32)), dtype=torch.int32)
    for i, row in enumerate(guides):
        if row.mask is not None:
            bitmask[i] = row.mask.result()
        else:
            _fill(row, bitmask[i])
    return apply_bitmask(logits, rows, bitmask)


_BIAS_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _bias_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: 0 where bit j of byte value i is set, -inf where not (the bitmask's bytes are
    little-endian words, so byte k holds tokens 8k..8k+7)."""
    table = _BIAS_TABLES.get((device, dtype))
    if table is None:
        values = torch.arange(256, dtype=torch.int32)
        bits = (values[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
        table = torch.zeros(256, 8).masked_fill(bits == 0, float("-inf")).to(device, dtype)
        _BIAS_TABLES[(device, dtype)] = table
    return table


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` with the tokens whose bit is 0 in `bitmask[i]` at -inf in row `rows[i]` (a copy),
    computed on the logits' device. Each byte of the mask looks up its 8 biases (0 or -inf) and the
    biases are added: a vectorized add, where a boolean masked fill branches per element."""
    device = logits.device
    vocab = logits.shape[1]
    packed = bitmask.to(device, non_blocking=True).view(torch.uint8).flatten().long()
    bias = _bias_table(device, logits.dtype).index_select(0, packed).reshape(len(rows), -1)[:, :vocab]
    if len(rows) == logits.shape[0]:
        return logits + bias
    out = logits.clone()
    out.index_add_(0, torch.tensor(rows, dtype=torch.long, device=device), bias)
    return out
