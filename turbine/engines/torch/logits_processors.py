"""Per-row logit adjustments before sampling: allowed tokens, bad words, logit bias, penalties.

Applied in vLLM's order, each as one batched tensor operation over the rows that use it:
`allowed_token_ids` (every other token to -inf), bad words (their banned tokens to -inf), logit bias
(added), then the penalties. Repetition (vLLM's) divides a positive logit by the penalty and
multiplies a negative one, for every token seen in the prompt or the output; frequency and presence
(OpenAI's) subtract `frequency × count + presence × (count > 0)`, counting the generated tokens only.

The counts live on the model's device in `TokenCounts`, one row per penalised sequence of two
[rows, vocab] buffers: each step folds in only the tokens appended since the last one, with one
scatter for all rows, so the per-step cost is a few batched operations over [rows, vocab], not a
rebuild from the whole text nor a launch per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from turbine.engines.core.scheduler import Seq


@dataclass
class TokenHistory:
    """Host-side bookkeeping of one penalised sequence: its row of the `TokenCounts` buffers, where
    its output begins (earlier tokens are prompt: seen by the repetition penalty, not counted by
    presence/frequency), and how many of its tokens were handed over for counting."""

    slot: int
    output_start: int
    taken: int = 0
    fresh: bool = True
    """Its row still holds a released sequence's counts (zeroed by the next fold)."""

    def take(self, tokens: list[int]) -> tuple[int, list[int]]:
        """The tokens appended since the last call, and the index of the first of them."""
        start, self.taken = self.taken, len(tokens)
        return start, tokens[start:]


class TokenCounts:
    """The token counts of every penalised sequence, one row each of two device buffers
    ([rows, vocab]: counts of output tokens, and whether each token was seen in prompt or output),
    so a step folds in its new tokens and reads its rows with a few batched operations, however
    many sequences it has. Rows are handed out on the event loop (`track`, `release`); the buffers
    are touched only on the runner thread (`fold`, `rows`), which grows them by doubling."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.device = device
        self._histories: dict[int, TokenHistory] = {}
        self._free: list[int] = []
        self._next = 0
        self._allowed: dict[int, torch.Tensor] = {}
        self.counts = torch.zeros((0, vocab), dtype=torch.float32, device=device)
        self.seen = torch.zeros((0, vocab), dtype=torch.bool, device=device)

    def track(self, seq_id: int, output_start: int) -> TokenHistory:
        """The sequence's history, given a row on first use."""
        history = self._histories.get(seq_id)
        if history is None:
            slot = self._free.pop() if self._free else self._next
            self._next = max(self._next, slot + 1)
            history = self._histories[seq_id] = TokenHistory(slot, output_start)
        return history

    def release(self, seq_id: int) -> None:
        self._allowed.pop(seq_id, None)
        history = self._histories.pop(seq_id, None)
        if history is not None:
            self._free.append(history.slot)

    def allowed_mask(self, seq_id: int, allowed: list[int]) -> torch.Tensor:
        """The sequence's `allowed_token_ids` as a [vocab] mask on the device, built on its first
        step (runner thread) and kept until it is released."""
        mask = self._allowed.get(seq_id)
        if mask is None:
            mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            mask[_long(allowed, self.device)] = True
            self._allowed[seq_id] = mask
        return mask

    def fold(self, pending: list[tuple[TokenHistory, tuple[int, list[int]]]]) -> None:
        """Count the tokens each history took since its last fold."""
        self._grow(max(h.slot for h, _ in pending) + 1)
        fresh = [h.slot for h, _ in pending if h.fresh]
        if fresh:
            rows = _long(fresh, self.device)
            self.counts[rows] = 0.0
            self.seen[rows] = False
        seen_rows: list[int] = []
        seen_ids: list[int] = []
        out_rows: list[int] = []
        out_ids: list[int] = []
        for history, (start, new) in pending:
            history.fresh = False
            seen_rows += [history.slot] * len(new)
            seen_ids += new
            output = new[max(0, history.output_start - start) :]
            out_rows += [history.slot] * len(output)
            out_ids += output
        if not seen_ids:
            return
        # One host-to-device copy for all four index lists.
        flat = _long(seen_rows + seen_ids + out_rows + out_ids, self.device)
        n, m = len(seen_ids), len(out_ids)
        self.seen[flat[:n], flat[n : 2 * n]] = True
        if m:
            ones = torch.ones(m, dtype=torch.float32, device=self.device)
            self.counts.index_put_((flat[2 * n : 2 * n + m], flat[2 * n + m :]), ones, accumulate=True)

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts and seen masks of these rows (`TokenHistory.slot`s), [len(slots), vocab] each."""
        return self.counts[slots], self.seen[slots]

    def _grow(self, needed: int) -> None:
        have = self.counts.shape[0]
        if needed <= have:
            return
        size = max(needed, 2 * have, 8)
        counts = torch.zeros((size, self.vocab), dtype=torch.float32, device=self.device)
        seen = torch.zeros((size, self.vocab), dtype=torch.bool, device=self.device)
        counts[:have] = self.counts
        seen[:have] = self.seen
        self.counts, self.seen = counts, seen


@dataclass
class RowAdjust:
    """One row's adjustments for this step (None in `RowParams.adjust` when it has none)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    allowed: list[int] | None = None
    """The only tokens that may be sampled; None: any."""
    bad: list[int] = field(default_factory=list)
    """Tokens banned now because they would complete a bad word."""
    history: TokenHistory | None = None
    """The sequence's row of `counts` (None: no penalty)."""
    counts: TokenCounts | None = None
    """The executor's per-sequence device state (None: build everything for this step alone)."""
    seq_id: int = -1
    pending: tuple[int, list[int]] = (0, [])
    """Tokens to fold into `counts` before this step's penalties (from `TokenHistory.take`)."""

    @property
    def penalised(self) -> bool:
        return (
            self.history is not None
            and self.counts is not None
            and (self.presence != 0.0 or self.frequency != 0.0 or self.repetition != 1.0)
        )


def adjust_logits(logits: torch.Tensor, rows: list[RowAdjust | None]) -> torch.Tensor:
    """A copy of `logits` ([rows, vocab]) with every row's adjustments applied."""
    logits = logits.clone()
    apply_token_masks(logits, rows)
    apply_logit_bias(logits, rows)
    apply_penalties(logits, rows)
    return logits


def apply_token_masks(logits: torch.Tensor, rows: list[RowAdjust | None]) -> None:
    """In place: outside `allowed` and on `bad` tokens, -inf."""
    device = logits.device
    limited = [(i, r) for i, r in enumerate(rows) if r is not None and r.allowed is not None]
    if limited:
        keep = torch.stack([_allowed_mask(r, logits.shape[1], device) for _, r in limited])
        rows_t = _long([i for i, _ in limited], device)
        logits[rows_t] = logits[rows_t].masked_fill(~keep, float("-inf"))
    bad_rows = [(i, t) for i, r in enumerate(rows) if r is not None for t in r.bad]
    if bad_rows:
        r_t = _long([i for i, _ in bad_rows], device)
        c_t = _long([t for _, t in bad_rows], device)
        logits[r_t, c_t] = float("-inf")


def apply_logit_bias(logits: torch.Tensor, rows: list[RowAdjust | None]) -> None:
    """In place: each row's biases added to its logits."""
    pairs = [
        (i, t, v)
        for i, r in enumerate(rows)
        if r is not None
        for t, v in zip(r.bias_ids, r.bias_values, strict=True)
    ]
    if not pairs:
        return
    device = logits.device
    index = _long([p[0] for p in pairs] + [p[1] for p in pairs], device)
    values = torch.tensor([p[2] for p in pairs], dtype=logits.dtype, device=device)
    logits.index_put_((index[: len(pairs)], index[len(pairs) :]), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[RowAdjust | None]) -> None:
    """In place: repetition, then frequency and presence penalties, over the rows that set them."""
    picked = [(i, r) for i, r in enumerate(rows) if r is not None and r.penalised]
    if not picked:
        return
    buffer = picked[0][1].counts
    assert buffer is not None and all(r.counts is buffer for _, r in picked)  # one per executor
    histories = [r.history for _, r in picked if r.history is not None]
    buffer.fold([(h, r.pending) for h, (_, r) in zip(histories, picked, strict=True)])
    for _, row in picked:
        row.pending = (0, [])
    device = logits.device
    k = len(picked)
    index = _long([i for i, _ in picked] + [h.slot for h in histories], device)
    rows_t = index[:k]
    counts, seen = buffer.rows(index[k:])
    knobs = torch.tensor(
        [[r.repetition, r.frequency, r.presence] for _, r in picked], dtype=logits.dtype, device=device
    )
    rep, frequency, presence = knobs[:, 0:1], knobs[:, 1:2], knobs[:, 2:3]
    values = logits[rows_t]
    if any(r.repetition != 1.0 for _, r in picked):
        values = torch.where(seen, torch.where(values > 0, values / rep, values * rep), values)
    values = values - frequency * counts - presence * (counts > 0).to(values.dtype)
    logits[rows_t] = values


def _allowed_mask(row: RowAdjust, vocab: int, device: torch.device) -> torch.Tensor:
    allowed = row.allowed or []
    if row.counts is not None:
        return row.counts.allowed_mask(row.seq_id, allowed)
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[_long(allowed, device)] = True
    return mask


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def row_adjust(seq: Seq, counts: TokenCounts) -> RowAdjust | None:
    """This step's adjustments for `seq` (None when its request sets none). Runs on the event loop:
    reads the sequence's tokens and tracks it in `counts` (the runner releases it with the
    sequence)."""
    vocab = counts.vocab
    s = seq.sampling
    if (
        s.presence_penalty == 0.0
        and s.frequency_penalty == 0.0
        and s.repetition_penalty == 1.0
        and not s.logit_bias
        and not s.bad_words_ids
        and not s.allowed_token_ids
    ):
        return None  # the common case, checked on every step of every sequence
    adjust = RowAdjust(
        presence=s.presence_penalty,
        frequency=s.frequency_penalty,
        repetition=s.repetition_penalty,
        counts=counts,
        seq_id=seq.seq_id,
    )
    for token, bias in s.logit_bias:
        if token < vocab:
            adjust.bias_ids.append(token)
            adjust.bias_values.append(bias)
    if s.allowed_token_ids:
        adjust.allowed = [t for t in s.allowed_token_ids if t < vocab]
    if s.bad_words_ids:
        adjust.bad = _bad_now(seq.tokens, s.bad_words_ids, vocab)
    if adjust.presence or adjust.frequency or adjust.repetition != 1.0:
        history = counts.track(seq.seq_id, max(0, seq.prompt_len - s.prior_output_tokens))
        adjust.history = history
        adjust.pending = history.take(seq.tokens)
    return adjust


def _bad_now(tokens: list[int], words: tuple[tuple[int, ...], ...], vocab: int) -> list[int]:
    """The last token of each bad word whose other tokens end `tokens` (one-token words: always)."""
    banned: set[int] = set()
    for word in words:
        head = word[:-1]
        if word[-1] < vocab and (not head or tuple(tokens[-len(head) :]) == head):
            banned.add(word[-1])
    return sorted(banned)
