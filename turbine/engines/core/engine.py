"""EngineCore: the request-facing half of every scheduling engine (mocker, torch).

It owns the scheduler and block manager and runs the step loop: schedule → execute → complete →
deliver. What a step *computes* is the executor's business: the mocker's executor sleeps for a
simulated step time and draws deterministic tokens; the torch executor runs a real forward pass and
samples. Everything else — request admission, streaming deltas, cancellation (blocks freed at
once), KV events numbered per worker, load metrics, prefix-cache dumps — lives here, once.

Concurrency: one background task (started by `start()`, cancelled by `stop()`) runs the loop;
`generate()` only enqueues and then reads its own output queue. The scheduler and block manager are
touched only from the event loop, so they need no locks; an executor that computes in a thread must
not touch them (it reads the plan, which the loop does not mutate while the step runs: sequences
aborted meanwhile are skipped by `Scheduler.complete`, and their blocks are not handed out again
before the next `schedule()`, which runs only after the step's results are in).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, TypeVar

from turbine.engines.base import EngineCapacity, EventSink
from turbine.engines.core.block_manager import BlockManager
from turbine.engines.core.scheduler import (
    Sampled,
    Scheduler,
    SchedulerConfig,
    Seq,
    SeqStatus,
    StepPlan,
    Update,
)
from turbine.protocol.kv_events import KvDump, KvEvent, KvEventBatch, LoadMetrics
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput, FinishReason
from turbine.runtime.inbox import Inbox

log = logging.getLogger(__name__)

_U64 = (1 << 64) - 1
_T = TypeVar("_T")

FINISH_REASONS = {
    SeqStatus.FINISHED_STOPPED: FinishReason.STOP,
    SeqStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    SeqStatus.FINISHED_ABORTED: FinishReason.CANCELLED,
    SeqStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Executor(Protocol):
    """Computes scheduled steps. Owned by one EngineCore; called from its loop only.

    `execute(plan, scheduled_at)` runs the step (it may await: sleep, or wait for a thread) and
    returns, for every sequence whose context the step completes, the model's next token — as a
    function the scheduler calls once per such sequence while applying the step. It must not block
    the event loop. `release(seq)` is called once when a sequence ends for any reason, so per-sequence
    state (a seeded generator, say) can go.
    """

    async def execute(self, plan: StepPlan, scheduled_at: float) -> Callable[[Seq], Sampled]: ...

    def release(self, seq: Seq) -> None: ...


def _concat(a: list[_T] | None, b: list[_T] | None) -> list[_T] | None:
    if a is None:
        return b
    return a if b is None else a + b


class _Stream:
    """Engine-side state of one request: pulled (`generate`: outputs wait in an `Inbox`, not an
    `asyncio.Queue`, since the hand-off is paid per token) or pushed (`generate_into`: each output
    goes to the caller's sink from the step loop, and `done` resolves with the last one)."""

    __slots__ = ("done", "inbox", "seq", "sink")

    def __init__(self, seq: Seq, sink: Callable[[EngineOutput], None] | None = None) -> None:
        self.seq = seq
        self.sink = sink
        # One or the other: an inbox for a pulled stream, a completion future for a pushed one.
        self.inbox: Inbox[EngineOutput] | None = Inbox() if sink is None else None
        self.done: asyncio.Future[None] | None = (
            None if sink is None else asyncio.get_running_loop().create_future()
        )

    def deliver(self, out: EngineOutput) -> None:
        sink, done = self.sink, self.done
        if sink is None or done is None:
            assert self.inbox is not None
            self.inbox.put_nowait(out)
            return
        if done.done():  # ended already (the sink failed, or a second finish at shutdown)
            return
        try:
            sink(out)
        except Exception as exc:  # the consumer's failure ends its request, not the step loop
            done.set_exception(exc)
            return
        if out.finish_reason is not None:
            done.set_result(None)

    async def take(self) -> EngineOutput:
        """Everything queued since the last take, as one output (waits while there is none)."""
        assert self.inbox is not None
        items = await self.inbox.take()
        return items[0] if len(items) == 1 else _merge(items)


def _merge(items: list[EngineOutput]) -> EngineOutput:
    """Outputs queued while the consumer was busy, as one delta with the same tokens, up to the first
    that finishes the stream (engine shutdown may queue a second finish behind a real one)."""
    out = items[0]
    for nxt in items[1:]:
        if out.finish_reason is not None:
            break
        out = EngineOutput(
            token_ids=out.token_ids + nxt.token_ids,
            finish_reason=nxt.finish_reason,
            cached_tokens=nxt.cached_tokens,
            error=nxt.error,
            logprobs=_concat(out.logprobs, nxt.logprobs),
            top_logprobs=_concat(out.top_logprobs, nxt.top_logprobs),
        )
    return out


class EngineCore:
    """Implements `turbine.engines.base.Engine` (and `KvCacheReporter`) over an `Executor`."""

    name = "engine"
    """Used in log and error messages ("mocker", "torch")."""
    capabilities: tuple[str, ...] = ()
    """Published in the model card (turbine.protocol.model_card capability names)."""

    def __init__(
        self,
        *,
        worker_id: int,
        events: EventSink,
        block_size: int,
        num_blocks: int,
        scheduler: SchedulerConfig,
        enable_prefix_caching: bool = True,
        load_publish_interval_s: float = 1.0,
    ) -> None:
        self.worker_id = worker_id
        self._sink = events
        self._pending_events: list[KvEvent] = []
        self._next_event_id = 0
        self.block_size = block_size
        self.blocks = BlockManager(
            num_blocks,
            block_size,
            enable_prefix_caching=enable_prefix_caching,
            on_event=self._pending_events.append,
        )
        self.scheduler = Scheduler(scheduler, self.blocks)
        self._load_interval = load_publish_interval_s
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._last_load: LoadMetrics | None = None
        self._last_load_at = float("-inf")

    # ---- to be provided by the concrete engine -------------------------------------------------

    def executor(self) -> Executor:
        raise NotImplementedError

    async def _prepare(self) -> None:
        """Anything slow before the loop starts (loading weights); runs inside `start()`."""

    # ---- Engine --------------------------------------------------------------------------------

    def capacity(self) -> EngineCapacity:
        c = self.scheduler.config
        return EngineCapacity(
            self.block_size,
            self.blocks.num_blocks,
            c.max_num_seqs,
            c.max_num_batched_tokens,
            capabilities=self.capabilities,
        )

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} engine already started")
        await self._prepare()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-scheduler")

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
        return KvDump(self.worker_id, self.blocks.cached_hashes(), self._next_event_id, self.block_size)

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(
            worker_id=self.worker_id,
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
        )

    def rejection(self, request: PreprocessedRequest) -> str | None:
        """Why this engine can never serve `request`, or None (engines add their own checks)."""
        return None

    def _admit(self, request: PreprocessedRequest) -> Seq | EngineOutput:
        """The request's sequence, or the one output that answers it without scheduling."""
        if self._task is None:
            raise RuntimeError(f"{self.name} engine: generate() called before start()")
        if self._failure is not None:
            return EngineOutput(finish_reason=FinishReason.ERROR, cached_tokens=0, error=self._failure)
        seq = self.new_seq(request)
        reason = self.rejection(request) or self.scheduler.rejection(seq)
        if reason is not None:
            return EngineOutput(finish_reason=FinishReason.ERROR, cached_tokens=0, error=reason)
        if seq.max_tokens <= 0:
            return EngineOutput(finish_reason=FinishReason.LENGTH, cached_tokens=0)
        return seq

    def _open(self, stream: _Stream) -> None:
        self._streams[stream.seq.seq_id] = stream
        self.scheduler.add(stream.seq)
        self._wakeup.set()

    def _close(self, seq: Seq) -> None:
        self._streams.pop(seq.seq_id, None)
        if not seq.status.is_finished:
            # Cancelled by the consumer: free its blocks now, not at the next step.
            self.scheduler.abort(seq)
            self.executor().release(seq)
            self._wakeup.set()

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        seq = self._admit(request)
        if isinstance(seq, EngineOutput):
            yield seq
            return
        stream = _Stream(seq)
        self._open(stream)
        try:
            while True:
                # Whatever piled up while the consumer was busy comes as one delta, same tokens.
                out = await stream.take()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self._close(seq)

    async def generate_into(self, request: PreprocessedRequest, sink: Callable[[EngineOutput], None]) -> None:
        """`generate`, pushed: each output is handed to `sink` from the step loop as the step that
        made it completes (one per step, nothing coalesced); returns after the last one. Cancelling
        the caller cancels the request. An exception from `sink` ends this request and is raised
        here; the other requests go on."""
        seq = self._admit(request)
        if isinstance(seq, EngineOutput):
            sink(seq)
            return
        stream = _Stream(seq, sink)
        assert stream.done is not None
        self._open(stream)
        try:
            await stream.done
        finally:
            self._close(seq)

    def new_seq(self, request: PreprocessedRequest) -> Seq:
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
            sampling=request.sampling,
            block_size=self.block_size,
        )

    # ---- the scheduler loop --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave every open stream hanging
            log.exception("%s scheduler loop crashed", self.name)
            self._failure = f"{self.name} engine failed: {exc!r}"
            self._fail_all(FinishReason.ERROR, self._failure)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self.scheduler
        executor = self.executor()
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
            sample = await executor.execute(plan, started)
            self._deliver(sched.complete(plan, sample))
            self._flush_events()
            self._publish_load_if_due(loop.time())

    def _deliver(self, updates: list[Update]) -> None:
        # Every stream's delta of this step is queued before the loop yields again.
        for seq, token, finished, sampled in updates:
            if finished is not None:
                self.executor().release(seq)
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            tokens = [] if token is None else [token]
            logprobs = top = None
            wanted = seq.sampling.logprobs is not None and token is not None
            if wanted and sampled is not None and sampled.logprob is not None:
                logprobs = [sampled.logprob]
                top = [sampled.top_logprobs or []] if seq.sampling.logprobs else None
            if finished is None:
                stream.deliver(EngineOutput(token_ids=tokens, logprobs=logprobs, top_logprobs=top))
            else:
                stream.deliver(
                    EngineOutput(
                        token_ids=tokens,
                        finish_reason=FINISH_REASONS[finished],
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
        interval = self._load_interval
        since = now - self._last_load_at
        if interval > 0 and since < interval:  # not due: skip building the metrics (every step)
            return interval - since
        metrics = self.load_metrics()
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
                self.executor().release(seq)
            stream.deliver(EngineOutput(finish_reason=reason, cached_tokens=0, error=error))
        self._streams.clear()
