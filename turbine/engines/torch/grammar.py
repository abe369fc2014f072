"""Guided decoding in the batched sampler: per-sequence grammar state, token bitmasks, their use.

Each guided sequence has a matcher (`engines/grammar.py`) that has consumed every token the sequence
produced under the grammar: its own output, and after a migration also the earlier worker's (the
last `prior_output_tokens` of the prompt). On the event loop, a step hands each guided row the
tokens appended since its last step (`Guides.row`); on the grammar thread the matchers consume them
and write the rows' bitmasks of allowed next tokens, a step's rows together on the library's own
threads (`fill`), started as soon as the previous step sampled (`Guides.speculate`) or else before
the forward (`Guides.prepare`), so that on CUDA, where the forward only queues kernels, the masks are
computed while the GPU works, and on CPU beside it; the sampler then sets every disallowed logit of
those rows to -inf on the logits' device (`constrain`). Rows without a grammar are untouched. EOS is
allowed only where the grammar is complete; a finished grammar allows nothing but EOS.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llguidance
import numpy as np
import torch

from turbine.engines.core.scheduler import Seq
from turbine.engines.grammar import GrammarError, Grammars, load_tokenizer
from turbine.protocol.request import GuidedDecoding

log = logging.getLogger(__name__)


@dataclass
class MaskStats:
    """What the masks cost an engine, logged when it stops: computing them (grammar thread) and
    waiting for them (runner thread), each written by its one thread."""

    computations: int = 0
    rows: int = 0
    computing_s: float = 0.0
    waiting_s: float = 0.0


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
    ahead: GuideRow | None = None
    """The row of the sequence's next step, started on the runner thread as soon as the token it
    consumes was sampled (`Guides.speculate`)."""
    stats: MaskStats | None = None
    """The engine's (`Guides.stats`)."""


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

    def __init__(self, tokenizer_json: Path, vocab_size: int, threads: int = 1) -> None:
        """`threads`: the grammar library's own threads, which compute a step's masks together."""
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._grammars: Grammars | None = None
        self._states: dict[int, _State] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        self.pin = False
        """Masks in pinned memory (CUDA: their copy to the device then does not wait for the host)."""
        self._pool = llguidance.LLExecutor(threads)
        self.threads = threads
        self.stats = MaskStats()

    def load(self) -> None:
        """Read the vocabulary into the grammar library (slow: call it off the event loop, before
        serving). Its end token is one of the tokenizer's special tokens, which no grammar matches as
        text; each request's own EOS ids take its place in the masks (`fill`)."""
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
        st = self.stats
        if st.computations:
            log.info(
                "guided masks: %d rows in %d computations on %d threads, %.1f ms computing (%.1f us a "
                "row); the runner waited %.1f ms for them",
                st.rows,
                st.computations,
                self.threads,
                st.computing_s * 1e3,
                st.computing_s / st.rows * 1e6,
                st.waiting_s * 1e3,
            )

    def error(self, guided: GuidedDecoding) -> str | None:
        """Why this engine cannot enforce `guided` (it does not compile), or None."""
        return self.grammars.error(guided)

    def row(self, seq: Seq) -> GuideRow | None:
        guided = seq.sampling.guided
        if guided is None:
            return None
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = self._new_state(seq, guided)
        new = seq.tokens[state.start + state.fed :]
        ahead, state.ahead = state.ahead, None
        if ahead is not None:
            if new == ahead.new_tokens:
                state.fed += len(new)
                return ahead
            # The sequence went on otherwise than the runner saw: a new matcher over all its tokens.
            state = self._states[seq.seq_id] = self._new_state(seq, guided)
            new = seq.tokens[state.start :]
        state.fed += len(new)
        return GuideRow(state, new)

    def _new_state(self, seq: Seq, guided: GuidedDecoding) -> _State:
        grammars = self.grammars
        try:
            matcher = grammars.matcher(guided)
        except GrammarError as exc:  # `TorchEngine.rejection` refused such requests already
            raise RuntimeError(f"request grammar does not compile: {exc}") from None
        start = seq.prompt_len - min(seq.sampling.prior_output_tokens, seq.prompt_len)
        eos = sorted(t for t in seq.eos_token_ids if 0 <= t < self.vocab_size)
        return _State(matcher, start, grammars.tokenizer.eos_token, eos, stats=self.stats)

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def prepare(self, rows: list[GuideRow]) -> None:
        """Start the mask computation of the rows not started yet, beside the forward."""
        self._submit([row for row in rows if row.mask is None])

    def speculate(self, rows: list[GuideRow], tokens: list[int]) -> None:
        """On the runner thread, once `rows` sampled `tokens`: start each sequence's next row (its
        matcher consumes the token, then writes the next mask) at once, so that it runs while the
        event loop delivers this step and schedules the next, not after. A token that ends the
        sequence (EOS) starts nothing; `row` uses the started row if the sequence's next tokens are
        exactly this one."""
        ahead = []
        for row, token in zip(rows, tokens, strict=True):
            state = row.state
            if token != state.end and token not in state.eos_ids:
                state.ahead = GuideRow(state, [token])
                ahead.append(state.ahead)
        self._submit(ahead)

    def _submit(self, rows: list[GuideRow]) -> None:
        if rows:
            future = self._thread.submit(self._masks, rows)
            for i, row in enumerate(rows):
                row.mask = _Slice(future, i)

    def _masks(self, rows: list[GuideRow]) -> torch.Tensor:
        started = time.perf_counter()
        bitmask = torch.empty((len(rows), self.words), dtype=torch.int32, pin_memory=self.pin)
        fill(rows, bitmask, self._pool)
        st = self.stats
        st.computing_s += time.perf_counter() - started
        st.computations += 1
        st.rows += len(rows)
        return bitmask


def fill(rows: list[GuideRow], out: torch.Tensor, pool: llguidance.LLExecutor | None = None) -> None:
    """Advance each row's matcher over its new tokens and write its bitmask into `out[i]`: what the
    grammar allows next, with the request's EOS ids standing for the library's end token.

    With `pool`, the rows go to the library's threads in two calls (each row consumes its token, then
    every mask is written), each without the GIL from start to end. Calls row by row would need the
    GIL back between rows, and wait for it whenever the event loop or the runner holds it (by up to
    the interpreter's switch interval each time)."""
    size = out.shape[1] * out.element_size()
    if pool is not None and len(rows) > 1:
        live = _fill_together(rows, out, pool, size)
    else:
        live = []
        for i, row in enumerate(rows):
            matcher = row.state.matcher
            if row.new_tokens:
                _consume(matcher, row.new_tokens)
            ok = not matcher.is_error()
            if ok:
                matcher.unsafe_compute_mask_ptr(out[i].data_ptr(), size)
            live.append(ok)
    _set_ends([row.state for row in rows], out.numpy(), live)


def _fill_together(
    rows: list[GuideRow], out: torch.Tensor, pool: llguidance.LLExecutor, size: int
) -> list[bool]:
    """`fill` of a batch through the library's pool; returns which rows' matchers are still live."""
    matchers = [row.state.matcher for row in rows]
    single = []
    for matcher, row in zip(matchers, rows, strict=True):
        if len(row.new_tokens) == 1:
            single.append((matcher, row.new_tokens[0]))
        elif row.new_tokens:  # the first step after a migration: its whole prior output
            _consume(matcher, row.new_tokens)
    if single:
        for (matcher, _), ok in zip(single, pool.consume_token_par(single), strict=True):
            if not ok:
                log.warning("a guided sequence left its grammar: %s", matcher.get_error())
    live = [not matcher.is_error() for matcher in matchers]
    todo = [(matcher, i) for i, matcher in enumerate(matchers) if live[i]]
    if todo:
        pool.unsafe_compute_mask_ptr(todo, out.data_ptr(), size, out.shape[0])
    return live


def _consume(matcher: llguidance.LLMatcher, tokens: list[int]) -> None:
    if not matcher.consume_tokens(tokens):
        log.warning("a guided sequence left its grammar: %s", matcher.get_error())


def _set_ends(states: list[_State], words: np.ndarray, live: list[bool]) -> None:
    """Put the requests' EOS ids in place of the library's end token in the rows' masks (`words`,
    the bitmask as NumPy int32 words: indexing a tensor element by element costs more per row than
    the library's own mask), for all rows of one EOS list at once. A row not `live` (its matcher
    left the grammar) allows EOS only."""
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, state in enumerate(states):
        groups.setdefault((state.end, tuple(state.eos_ids)), []).append(i)
    for (end, eos), indices in groups.items():
        rows = np.asarray(indices)
        dead = np.asarray([not live[i] for i in indices])
        can_end = ((words[rows, end // 32] >> (end % 32)) & 1).astype(bool) | dead
        words[rows[dead]] = 0
        ends = eos or (end,)
        for t in {end, *ends}:
            words[rows, t // 32] &= ~_bit(t % 32)
        for t in ends:
            words[rows[can_end], t // 32] |= _bit(t % 32)


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
        self.whole = whole
        self.i = i

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self.whole.result(timeout)[self.i]


def constrain(logits: torch.Tensor, rows: list[int], guides: list[GuideRow]) -> torch.Tensor:
    """`logits` with every token that row `rows[i]`'s grammar disallows at -inf (a copy; the other
    rows unchanged). Masks not prepared beside the forward are computed now."""
    started = time.perf_counter()
    bitmask = _whole(guides)
    if bitmask is None:
        bitmask = torch.empty((len(rows), -(-logits.shape[1] // 32)), dtype=torch.int32)
        for i, row in enumerate(guides):
            if row.mask is not None:
                bitmask[i] = row.mask.result()
            else:
                fill([row], bitmask[i : i + 1])
    stats = guides[0].state.stats
    if stats is not None:
        stats.waiting_s += time.perf_counter() - started
    return apply_bitmask(logits, rows, bitmask)


def _whole(guides: list[GuideRow]) -> torch.Tensor | None:
    """The batch's bitmask as computed, if the rows' masks are exactly one computation's rows in
    order (the usual case: a step's rows were started together one step before)."""
    masks = [row.mask for row in guides]
    first = masks[0]
    if not isinstance(first, _Slice):
        return None
    whole = first.whole
    if not all(isinstance(m, _Slice) and m.whole is whole and m.i == i for i, m in enumerate(masks)):
        return None
    bitmask = whole.result()
    return bitmask if bitmask.shape[0] == len(guides) else None


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
