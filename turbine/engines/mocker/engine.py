"""MockerEngine: a GPU-free engine that behaves like vLLM serving an 8B model on one H100.

It simulates what routers and frontends can observe of a real engine: a paged KV cache with prefix
caching (and its KV events), continuous batching with chunked prefill and preemption, step times
from `timing.TimingModel` divided by `speedup_ratio`, load metrics, and deterministic output tokens.

Concurrency: one background task (started by `start()`, cancelled by `stop()`) runs the scheduler
loop; `generate()` only enqueues and then reads its own output queue. Everything runs on one event
loop, so the scheduler and block manager need no locks.

Output tokens are a pure function of the token context: the token at position p is
XXH3(seed, p, chained hash of the last full block before p, the tokens after it), mapped into
`token_id_range`, with seed = `sampling.seed` (0 when unset). Identical requests therefore stream
identical tokens, different prompts diverge, and a request migrated with its generated tokens appended
to the prompt (and max_tokens reduced) continues exactly where it left off on any worker with the
same block size. Seeding from a hash of the prompt would break that last property, since migration
changes the prompt.

Logprobs (when the request asks for them) are a pure function of the same inputs, so a migrated
stream's logprobs equal an uninterrupted one's too: see `mock_logprobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import struct
from array import array
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TypeVar

import xxhash

from turbine.engines.base import EngineCapacity, EventSink
from turbine.engines.embedding import hash_embedding
from turbine.engines.mocker.block_manager import BlockManager
from turbine.engines.mocker.scheduler import (
    Sampled,
    Scheduler,
    SchedulerConfig,
    Seq,
    SeqStatus,
    Update,
)
from turbine.engines.mocker.timing import TimingModel
from turbine.protocol.kv_events import KvDump, KvEvent, KvEventBatch, LoadMetrics
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_pack_position = struct.Struct("<QQQ").pack
_EOS_SALT = 0x5EED_E05
_LOGPROB_SALT = 0x1069_9F0B
_T = TypeVar("_T")

_FINISH_REASONS = {
    SeqStatus.FINISHED_STOPPED: FinishReason.STOP,
    SeqStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    SeqStatus.FINISHED_ABORTED: FinishReason.CANCELLED,
    SeqStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(frozen=True)
class MockerConfig:
    """Mocker settings; names follow `python -m dynamo.mocker`'s flags."""

    block_size: int = 64
    """Tokens per KV block; must match the router's block size for KV-aware routing."""
    num_gpu_blocks: int = 16384
    """KV blocks in the simulated cache."""
    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill chunks plus decodes)."""
    speedup_ratio: float = 1.0
    """Divides every simulated step time; 1e6 makes the mocker effectively instant."""
    enable_prefix_caching: bool = True
    """Reuse cached blocks across requests (and publish KV events for them)."""
    eos_probability: float = 0.0
    """Chance, per generated token, that the model ends the sequence (subject to min_tokens)."""
    token_id_range: tuple[int, int] = (1000, 32000)
    """[low, high) of generated token ids: ordinary tokens of the served tokenizer, no specials."""
    load_publish_interval_s: float = 1.0
    """Least time between two LoadMetrics publications; also the idle heartbeat period."""
    timing: TimingModel = field(default_factory=TimingModel)
    """Step-time coefficients, before speedup_ratio."""

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MockerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.speedup_ratio <= 0:
            raise ValueError(f"MockerConfig.speedup_ratio must be positive, got {self.speedup_ratio}")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ValueError(f"MockerConfig.eos_probability must be in [0, 1], got {self.eos_probability}")
        low, high = self.token_id_range
        if not 0 <= low < high <= 1 << 32:
            raise ValueError(f"MockerConfig.token_id_range must satisfy 0 <= low < high, got {low, high}")
        if self.load_publish_interval_s < 0:
            raise ValueError("MockerConfig.load_publish_interval_s must be >= 0")


def mock_logprobs(
    context: bytes, token: int, k: int, token_id_range: tuple[int, int]
) -> tuple[float, list[tuple[int, float]]]:
    """The simulated model's distribution at one position, as (sampled token's logprob, top k).

    `context` identifies the position (seed, position, token context: what the sampled token was
    drawn from), so the result is a pure function of the request's seed and the token sequence so far.
    The simulated model samples greedily: the sampled token is the most likely one, with probability
    in [0.5, 0.99), and is the first of the top k; alternative i (1-based) takes a share of the
    remaining mass below half of the previous one's, so the list is strictly descending, every logprob
    is < 0 and the probabilities sum to less than 1. Alternatives are distinct ordinary token ids
    (fewer than k only when `token_id_range` is that small).
    """
    h = xxhash.xxh3_64_intdigest(context, _LOGPROB_SALT)
    p0 = 0.5 + 0.49 * (h & 0xFFFF_FFFF) / 2.0**32
    lp0 = math.log(p0)
    if not k:
        return lp0, []
    top = [(token, lp0)]
    rest = 1.0 - p0
    low, high = token_id_range
    span = high - low
    seen = {token}
    for i in range(1, min(k, span)):
        hi = xxhash.xxh3_64_intdigest(context, _LOGPROB_SALT + i)
        candidate = low + hi % span
        while candidate in seen:
            candidate = low + (candidate - low + 1) % span
        seen.add(candidate)
        jitter = 0.5 + 0.5 * (hi >> 32) / 2.0**32  # [0.5, 1)
        top.append((candidate, math.log(rest * 0.5**i * jitter)))
    return lp0, top


def _concat(a: list[_T] | None, b: list[_T] | None) -> list[_T] | None:
    if a is None:
        return b
    return a if b is None else a + b


class _Stream:
    """Engine-side state of one generate() call."""

    __slots__ = ("logprobs", "queue", "seq")

    def __init__(self, seq: Seq, logprobs: int | None) -> None:
        self.seq = seq
        # Alternatives per token the request wants logprobs for; None: no logprobs.
        self.logprobs = logprobs
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()


class MockerEngine:
    """Implements `turbine.engines.base.Engine`; see the module docstring for the simulation."""

    def __init__(self, config: MockerConfig, worker_id: int, events: EventSink) -> None:
        self.config = config
        self.worker_id = worker_id
        self._sink = events
        self._pending_events: list[KvEvent] = []
        self._next_event_id = 0
        self.blocks = BlockManager(
            config.num_gpu_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            on_event=self._pending_events.append,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks
        )
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._last_load: LoadMetrics | None = None
        self._last_load_at = float("-inf")

    def capacity(self) -> EngineCapacity:
        c = self.config
        return EngineCapacity(c.block_size, c.num_gpu_blocks, c.max_num_seqs, c.max_num_batched_tokens)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("MockerEngine already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mocker-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # The worker drains before stopping; anything still open is told it was cancelled, not left hanging.
        self._fail_all(FinishReason.CANCELLED, None)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (publishing `cleared`); False while requests hold blocks."""
        ok = self.blocks.reset()
        self._flush_events()
        return ok

    def kv_dump(self) -> KvDump:
        """The whole prefix cache, consistent with the event stream: pending events go out first."""
        self._flush_events()
        return KvDump(
            self.worker_id, self.blocks.cached_hashes(), self._next_event_id, self.config.block_size
        )

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            worker_id=self.worker_id,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
        )

    async def embed(self, token_ids: list[int]) -> list[float]:
        """A deterministic hash vector (see `turbine.engines.embedding`); no scheduling or KV use."""
        return hash_embedding(token_ids)

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._task is None:
            raise RuntimeError("MockerEngine.generate() called before start()")
        if self._failure is not None:
            yield EngineOutput(finish_reason=FinishReason.ERROR, cached_tokens=0, error=self._failure)
            return
        seq = self._new_seq(request)
        reason = self.scheduler.rejection(seq)
        if reason is not None:
            yield EngineOutput(finish_reason=FinishReason.ERROR, cached_tokens=0, error=reason)
            return
        if seq.max_tokens <= 0:
            yield EngineOutput(finish_reason=FinishReason.LENGTH, cached_tokens=0)
            return
        stream = _Stream(seq, request.sampling.logprobs)
        self._streams[seq.seq_id] = stream
        self.scheduler.add(seq)
        self._wakeup.set()
        try:
            while True:
                out = await stream.queue.get()
                # Coalesce whatever piled up while the consumer was busy: one delta, same tokens.
                while out.finish_reason is None and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    out = EngineOutput(
                        token_ids=out.token_ids + nxt.token_ids,
                        finish_reason=nxt.finish_reason,
                        cached_tokens=nxt.cached_tokens,
                        error=nxt.error,
                        logprobs=_concat(out.logprobs, nxt.logprobs),
                        top_logprobs=_concat(out.top_logprobs, nxt.top_logprobs),
                    )
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self._streams.pop(seq.seq_id, None)
            if not seq.status.is_finished:
                # Cancelled by the consumer: free its blocks now, not at the next step.
                self.scheduler.abort(seq)
                self._wakeup.set()

    # ---- the scheduler loop --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave every open stream hanging
            log.exception("mocker scheduler loop crashed")
            self._failure = f"mocker engine failed: {exc!r}"
            self._fail_all(FinishReason.ERROR, self._failure)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        while True:
            if not sched.has_work:
                self._flush_events()
                timeout = self._publish_load_if_due(loop.time())
                self._wakeup.clear()
                # No work: sleep until a request arrives (or a load heartbeat is due), never spin.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                continue
            started = loop.time()
            plan = sched.schedule()
            self._deliver(plan.finished)
            if plan.shape.is_empty:
                # Nothing could run (only possible when the plan ended sequences instead); still yield.
                await asyncio.sleep(0)
                continue
            duration = self.config.timing.step_seconds(plan.shape, self.config.speedup_ratio)
            # Sleep to the step's end measured from its start, so scheduling overhead is not added on
            # top; sleep(0) at least, so that consumers run between steps even at huge speedups.
            await asyncio.sleep(max(0.0, started + duration - loop.time()))
            self._deliver(sched.complete(plan, self._sample))
            self._flush_events()
            self._publish_load_if_due(loop.time())

    def _sample(self, seq: Seq) -> Sampled:
        """The simulated model: a deterministic token for position len(seq.tokens)."""
        data = _context(seq, len(seq.tokens))
        h = xxhash.xxh3_64_intdigest(data)
        low, high = self.config.token_id_range
        span = high - low
        token = low + h % span
        if seq.num_output < seq.min_tokens:
            # As with logit masking for min_tokens: never pick a token that would stop the sequence.
            stopping = seq.stop_token_ids if seq.ignore_eos else seq.stop_token_ids | seq.eos_token_ids
            for _ in range(span):
                if token not in stopping:
                    break
                token = low + (token - low + 1) % span
        p_eos = self.config.eos_probability
        eos = p_eos > 0.0 and (p_eos >= 1.0 or xxhash.xxh3_64_intdigest(data, _EOS_SALT) < p_eos * 2.0**64)
        return Sampled(token, eos)

    def _deliver(self, updates: list[Update]) -> None:
        # Every stream's delta of this step is queued before the loop yields again.
        for seq, token, finished in updates:
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            tokens = [] if token is None else [token]
            logprobs = top = None
            if stream.logprobs is not None and token is not None:
                # The token is already appended: its context is everything before it.
                context = _context(seq, len(seq.tokens) - 1)
                lp, alternatives = mock_logprobs(context, token, stream.logprobs, self.config.token_id_range)
                logprobs, top = [lp], ([alternatives] if stream.logprobs else None)
            if finished is None:
                stream.queue.put_nowait(EngineOutput(token_ids=tokens, logprobs=logprobs, top_logprobs=top))
            else:
                stream.queue.put_nowait(
                    EngineOutput(
                        token_ids=tokens,
                        finish_reason=_FINISH_REASONS[finished],
                        cached_tokens=seq.cached_tokens or 0,
                        error=seq.error,
                        logprobs=logprobs,
                        top_logprobs=top,
                    )
                )

    def _flush_events(self) -> None:
        if not self._pending_events:
            return
        batch = KvEventBatch(self.worker_id, self._next_event_id, list(self._pending_events))
        self._pending_events.clear()
        self._next_event_id += 1
        self._sink.publish_kv_events(batch)

    def _publish_load_if_due(self, now: float) -> float | None:
        """Publish load when the interval allows; returns seconds until the next heartbeat, if any."""
        interval = self.config.load_publish_interval_s
        metrics = self.load_metrics()
        since = now - self._last_load_at
        if since >= interval and (metrics != self._last_load or interval > 0):
            self._sink.publish_load(metrics)
            self._last_load, self._last_load_at, since = metrics, now, 0.0
        if interval <= 0:
            return None
        return max(interval - since, 0.0)

    def _fail_all(self, reason: FinishReason, error: str | None) -> None:
        for stream in list(self._streams.values()):
            seq = stream.seq
            if not seq.status.is_finished:
                self.scheduler.abort(seq)
            stream.queue.put_nowait(EngineOutput(finish_reason=reason, cached_tokens=0, error=error))
        self._streams.clear()

    def _new_seq(self, request: PreprocessedRequest) -> Seq:
        stop = request.stop
        seed = request.sampling.seed
        return Seq(
            seq_id=next(self._ids),
            tokens=list(request.token_ids),
            prompt_len=len(request.token_ids),
            max_tokens=stop.max_tokens,
            min_tokens=stop.min_tokens,
            ignore_eos=stop.ignore_eos,
            eos_token_ids=frozenset(request.eos_token_ids),
            stop_token_ids=frozenset(stop.stop_token_ids),
            seed=0 if seed is None else seed & _U64,
            block_size=self.config.block_size,
        )


def _context(seq: Seq, p: int) -> bytes:
    """What the token at position `p` is drawn from: the seed, `p`, the chained hash of the last full
    block before `p` and the tokens after it (so equal contexts give equal tokens on any worker)."""
    bs = seq.block_size
    full = p // bs
    parent = seq.hashes.sequence[full - 1] if full else 0
    tail = array("I", seq.tokens[full * bs : p]).tobytes()
    return _pack_position(seq.seed, p, parent) + tail
