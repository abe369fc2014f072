"""Continuous batching after vLLM v1's scheduler, shared by the mocker and the torch engine.

Each step:
1. Running sequences, in admission order, get their next chunk: one token when decoding, or as much
   of their remaining prompt as the token budget (`max_num_batched_tokens`) allows (chunked prefill).
   When the cache cannot grow a sequence, the most recently admitted running sequence is preempted
   (blocks freed, recomputed later from whatever is still cached) until it fits.
2. If nobody was preempted, waiting sequences are admitted first-come-first-served while there are
   sequence slots (`max_num_seqs`), budget and blocks; the queue head blocks the rest (no overtaking).
   Admission takes the longest cached prefix, always leaving at least one token to compute.

Blocks a step will fill are cached when the step is scheduled (vLLM v1's `allocate_slots`), so a
sequence admitted after them reuses them at once. `complete()` then advances what the step computed
and samples one token for every sequence whose context is fully computed, applying the stop
conditions.

A sequence that can never fit (it needs more blocks than the whole cache) is finished instead of
waiting forever: with an error if nothing was generated yet, else with "length" (its context is full).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from turbine.engines.core.block_manager import BlockManager
from turbine.kv.hashing import BlockHashes, block_hashes, hash_block
from turbine.protocol.request import SamplingOptions


class SeqStatus(enum.IntEnum):
    """Lifecycle of a sequence; ordered so that `is_finished` is one comparison."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > SeqStatus.PREEMPTED


class Sampled(NamedTuple):
    """What the model (real or simulated) produced for a sequence's next position."""

    token_id: int
    """The sampled token; EOS and stop ids among `Seq.eos_token_ids`/`stop_token_ids` end the sequence."""
    eos: bool = False
    """The model chose to end the sequence (honoured unless ignore_eos or under min_tokens)."""
    logprob: float | None = None
    """Log probability of `token_id`, when the request asked for logprobs."""
    top_logprobs: list[tuple[int, float]] | None = None
    """The most likely alternatives `(token_id, logprob)`, descending, when asked for."""


class StepShape(NamedTuple):
    """What a step computes, in the units a timing model prices."""

    prefill_tokens: int
    """Uncached prompt tokens computed this step (summed over every prefill chunk)."""
    prefill_attention_pairs: int
    """Σ over prefill chunks of (new tokens × context each attends to): the quadratic attention work."""
    decode_seqs: int
    """Sequences decoding one token this step."""
    decode_context_tokens: int
    """Σ over decoding sequences of their context length: KV cache read this step."""

    @property
    def is_empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_seqs == 0


def attention_pairs(num_computed: int, num_new: int) -> int:
    """Key tokens attended by a chunk of `num_new` tokens after `num_computed` cached/computed ones.

    Causal attention: the j-th new token (1-based) sees `num_computed + j` keys.
    """
    return num_new * num_computed + num_new * (num_new + 1) // 2


@dataclass(slots=True, eq=False)
class Seq:
    """One request inside the scheduler. Mutable; owned by the scheduler once added."""

    seq_id: int
    tokens: list[int]
    """Prompt followed by every generated token."""
    prompt_len: int
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    seed: int = 0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """The request's sampling knobs (temperature, top-p/k, min-p, logprobs), read by executors."""
    block_size: int = 64
    hashes: BlockHashes = field(default_factory=lambda: BlockHashes([], []))
    """Hashes of every full block of `tokens`, kept current as tokens are appended."""
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    """Tokens whose KV is in the cache (computed or served from prefix cache)."""
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache at first admission (what the client is told)."""
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.hashes.local:
            self.hashes = block_hashes(self.tokens, self.block_size)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    def append(self, token_id: int) -> None:
        """Append a generated token, hashing the block it completes."""
        self.tokens.append(token_id)
        n = len(self.tokens)
        if n % self.block_size == 0:
            seq = self.hashes.sequence
            local, chained = hash_block(self.tokens[n - self.block_size :], seq[-1] if seq else None)
            self.hashes.local.append(local)
            seq.append(chained)


class Chunk(NamedTuple):
    seq: Seq
    num_new_tokens: int
    is_decode: bool


class Update(NamedTuple):
    """What a step did to one sequence: a new token and/or its end."""

    seq: Seq
    token_id: int | None
    finished: SeqStatus | None
    sampled: Sampled | None = None
    """What the model produced for `token_id` (its logprobs), when a token was sampled."""


@dataclass(frozen=True)
class StepPlan:
    chunks: list[Chunk]
    """Work of this step, in scheduling order."""
    finished: list[Update]
    """Sequences ended while scheduling (they can never fit); deliver without waiting for the step."""
    num_preempted: int
    shape: StepShape


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences running (holding blocks and scheduled) at once."""
    max_num_batched_tokens: int = 8192
    """Most tokens computed in one step, prefill chunks and decodes together."""

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


class Scheduler:
    """Single-threaded: one owner calls `add`/`abort`/`schedule`/`complete` from one event loop."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.num_preemptions = 0
        """Sequences preempted since start (a cache too small for the load shows here first)."""

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def rejection(self, seq: Seq) -> str | None:
        """Why `seq` can never be served by this cache, or None when it can."""
        if not seq.tokens:
            return "empty prompt"
        needed = self.blocks.blocks_needed(len(seq.tokens))
        if needed > self.blocks.num_blocks:
            return (
                f"prompt of {len(seq.tokens)} tokens needs {needed} KV blocks of "
                f"{self.blocks.block_size} tokens; this worker has {self.blocks.num_blocks} in total"
            )
        return None

    def add(self, seq: Seq) -> None:
        """Queue `seq`; the caller has checked `rejection(seq)` is None."""
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        """End `seq` now (client gone) and free its blocks at once; a no-op when already finished."""
        if seq.status.is_finished:
            return
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED_ABORTED

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[Chunk] = []
        finished: list[Update] = []
        preempted = 0

        bs = self.blocks.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            computed = seq.num_computed
            remaining = len(seq.tokens) - computed
            is_decode = remaining == 1 and len(seq.tokens) > seq.prompt_len
            if is_decode and computed % bs and (computed + 1) % bs:
                # The common decode: its token lands in the block that holds the one before it (no
                # block to reserve) and does not fill it (nothing to cache), so no call can fail.
                chunks.append(Chunk(seq, 1, True))
                budget -= 1
                i += 1
                continue
            num_new = min(remaining, budget)
            while not self.blocks.reserve(seq.seq_id, seq.num_computed + num_new):
                victim = self.running.pop()
                if victim is seq and not self.running[:i]:
                    # Alone in the cache and still no room: its context can never grow further.
                    self.blocks.free(seq.seq_id)
                    finished.append(self._finish_unfittable(seq))
                    break
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                self._cache_scheduled(seq, num_new)
                chunks.append(Chunk(seq, num_new, is_decode))
                budget -= num_new
                i += 1
                continue
            # `seq` left the running list (finished or preempted); everything after it is gone too.
            break

        while not preempted and self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            reason = self.rejection(seq)
            if reason is not None:
                self.waiting.popleft()
                finished.append(self._finish_unfittable(seq, reason))
                continue
            bs = self.blocks.block_size
            # Leave at least the last token to compute: its forward pass yields the next token.
            cacheable = seq.hashes.sequence[: (len(seq.tokens) - 1) // bs]
            cached = self.blocks.lookup(cacheable) * bs
            num_new = min(len(seq.tokens) - cached, budget)
            alloc = self.blocks.allocate(seq.seq_id, cacheable, cached + num_new)
            if alloc is None:
                break
            self.waiting.popleft()
            seq.num_computed = alloc.cached_tokens
            if seq.cached_tokens is None:
                seq.cached_tokens = alloc.cached_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            is_decode = num_new == 1 and seq.num_output > 0
            self._cache_scheduled(seq, num_new)
            chunks.append(Chunk(seq, num_new, is_decode))
            budget -= num_new

        return StepPlan(chunks, finished, preempted, _shape(chunks))

    def complete(self, plan: StepPlan, sample: Callable[[Seq], Sampled]) -> list[Update]:
        """Apply a step's results; returns one update per sequence that got a token or finished."""
        updates: list[Update] = []
        finished_any = False
        for seq, num_new, _ in plan.chunks:
            if seq.status != SeqStatus.RUNNING:  # aborted while the step ran
                continue
            # No commit here: `schedule` already cached every full block up to this count.
            seq.num_computed += num_new
            if seq.num_computed < len(seq.tokens):  # a prefill chunk that is not the last one
                continue
            update = self._apply(seq, sample(seq))
            updates.append(update)
            if update.finished is not None:
                seq.status = update.finished
                self.blocks.free(seq.seq_id)
                finished_any = True
        if finished_any:
            self.running = [s for s in self.running if s.status == SeqStatus.RUNNING]
        return updates

    # ---- helpers -------------------------------------------------------------------------------

    def _cache_scheduled(self, seq: Seq, num_new: int) -> None:
        """Name the full blocks this step will compute as cached now, at scheduling time, as vLLM v1
        does (`allocate_slots` caches up to computed + new tokens): a request scheduled later in the
        same step, or while this step runs, reuses them instead of computing the prefix again. Within
        one forward pass that is sound because each layer writes the batch's new KV before attention
        reads it."""
        self.blocks.commit(seq.seq_id, seq.hashes, seq.num_computed + num_new)

    def _apply(self, seq: Seq, sampled: Sampled) -> Update:
        """Stop conditions, in vLLM's order: EOS/stop tokens (after min_tokens), then max_tokens."""
        num_output = len(seq.tokens) - seq.prompt_len  # once: this runs for every token
        tok = sampled.token_id
        if num_output >= seq.min_tokens:
            if sampled.eos and not seq.ignore_eos:
                return Update(seq, None, SeqStatus.FINISHED_STOPPED)
            if tok in seq.stop_token_ids or (tok in seq.eos_token_ids and not seq.ignore_eos):
                return Update(seq, None, SeqStatus.FINISHED_STOPPED)
        seq.append(tok)
        if num_output + 1 >= seq.max_tokens:
            return Update(seq, tok, SeqStatus.FINISHED_LENGTH, sampled)
        return Update(seq, tok, None, sampled)

    def _preempt(self, seq: Seq) -> None:
        # Recompute from scratch on readmission; its freed blocks stay cached, so usually cheaply.
        self.num_preemptions += 1
        self.blocks.free(seq.seq_id)
        seq.status = SeqStatus.PREEMPTED
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def _finish_unfittable(self, seq: Seq, reason: str | None = None) -> Update:
        if seq.num_output > 0:
            seq.status = SeqStatus.FINISHED_LENGTH
        else:
            seq.status = SeqStatus.FINISHED_ERROR
            seq.error = reason or "sequence does not fit in the KV cache"
        return Update(seq, None, seq.status)


def _shape(chunks: list[Chunk]) -> StepShape:
    prefill_tokens = pairs = decode_seqs = decode_ctx = 0
    for seq, num_new, is_decode in chunks:
        if is_decode:
            decode_seqs += 1
            decode_ctx += seq.num_computed + 1
        else:
            prefill_tokens += num_new
            pairs += attention_pairs(seq.num_computed, num_new)
    return StepShape(prefill_tokens, pairs, decode_seqs, decode_ctx)
