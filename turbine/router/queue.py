"""The router queue (`--router-queue-threshold`): requests wait here while every candidate is busy.

Without it, a burst larger than the workers can prefill gets 503s. With it, a request whose
candidates are all over the threshold waits, and is routed as soon as load falls (a routed request
produced its first token, finished, or a worker joined): the owner calls `pump` after each such
change. Routing happens inside `pump`, synchronously, so each admitted request's load is counted
before the next one is considered and one pump never over-admits.

Order among waiting requests (`policy`):
- `fcfs`: arrival order; no request waits behind one that came later (best for tail latency).
- `wspt`: weighted shortest processing time first (Smith's rule, all weights 1): the request with
  the least predicted prefill work (uncached prompt tokens) goes first, arrival order breaking
  ties. It minimises the mean wait; a long prompt can wait for as long as short ones keep coming.

Bounds: at most `max_queued` waiting requests; one more is refused with `QueueFull` (HTTP 503 with
Retry-After). A waiter that is cancelled (its client disconnected) leaves the queue at once; if it
was cancelled just after being routed, the routing is undone through `on_abandoned`.

Single event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from turbine.choices import QUEUE_POLICIES
from turbine.errors import ServiceUnavailable, TurbineError
from turbine.protocol.request import PreprocessedRequest
from turbine.router.base import Decision

# Upper bounds (seconds) of the wait-time histogram exported at /metrics.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(ServiceUnavailable):
    """The router queue holds `--router-max-queued` requests already."""


@dataclass(frozen=True)
class QueueSettings:
    threshold: float
    """A worker is busy while its active prefill tokens exceed this × its max batched tokens."""
    policy: str = "fcfs"
    max_queued: int = 1024

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise ValueError(f"threshold must be positive, got {self.threshold}")
        if self.policy not in QUEUE_POLICIES:
            raise ValueError(f"unknown queue policy {self.policy!r}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")


class WaitStats:
    """Cumulative histogram of queue waits (every routed request, 0 for those that never waited)."""

    def __init__(self) -> None:
        self.bucket_counts = [0] * (len(WAIT_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.bucket_counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.count += 1
        self.total_s += seconds


class _Waiter:
    __slots__ = ("candidates", "enqueued", "future", "request", "restricted")

    def __init__(
        self,
        request: PreprocessedRequest,
        candidates: Callable[[], Sequence[int]],
        future: asyncio.Future[Decision],
        enqueued: float,
        restricted: bool,
    ) -> None:
        self.request = request
        self.restricted = restricted
        self.candidates = candidates
        self.future = future
        self.enqueued = enqueued


class RouterQueue:
    def __init__(
        self,
        settings: QueueSettings,
        select: Callable[[PreprocessedRequest, Sequence[int]], Decision],
        is_busy: Callable[[int], bool],
        on_abandoned: Callable[[str, Decision], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._select = select
        self._is_busy = is_busy
        self._on_abandoned = on_abandoned
        self._clock = clock
        self._heap: list[tuple[int, int, _Waiter]] = []
        self._seq = itertools.count()
        self._restricted = 0  # waiters narrowed to some of the workers
        self.waits = WaitStats()

    def __len__(self) -> int:
        """Requests waiting now."""
        return len(self._heap)

    def all_busy(self, candidates: Sequence[int]) -> bool:
        return all(self._is_busy(w) for w in candidates)

    async def route(
        self,
        request: PreprocessedRequest,
        candidates: Callable[[], Sequence[int]],
        predicted_work: Callable[[], int],
        *,
        restricted: bool = False,
    ) -> Decision:
        """Route now if some candidate is free and nobody waits; else wait for a turn.

        `candidates` is asked again whenever the request's turn comes (workers come and go while it
        waits); `predicted_work` (uncached prompt tokens) is asked only if the request must wait.
        `restricted`: the candidates are narrowed to some workers (see `pump`).
        Raises QueueFull, ServiceUnavailable (no candidate left), or whatever `select` raises.
        """
        now = candidates()
        if not now:
            raise ServiceUnavailable(f"model '{request.model}' has no live workers")
        if not self._heap and not self.all_busy(now):
            self.waits.observe(0.0)
            return self._select(request, now)
        if len(self._heap) >= self.settings.max_queued:
            raise QueueFull(
                f"model '{request.model}': every worker is busy and {len(self._heap)} request(s) "
                "already wait; retry later"
            )
        priority = predicted_work() if self.settings.policy == "wspt" else 0
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(request, candidates, future, self._clock(), restricted)
        entry = (priority, next(self._seq), waiter)
        heapq.heappush(self._heap, entry)
        self._restricted += restricted
        if self._restricted:
            self.pump()  # waiters ahead may be blocked only on their own workers
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Routed by a pump in the same loop turn as the cancel: undo that routing.
                self._on_abandoned(request.request_id, future.result())
                self.pump()
            else:
                self._discard(entry)
            raise

    def _discard(self, entry: tuple[int, int, _Waiter]) -> None:
        try:
            self._heap.remove(entry)
        except ValueError:
            return  # already taken by a pump
        heapq.heapify(self._heap)
        self._restricted -= entry[2].restricted

    def pump(self) -> None:
        """Load fell or workers changed: route waiting requests in policy order. A waiter whose
        candidates are all busy stays; when every waiter may use every worker, that ends the pump
        (the rest are blocked too). Waiters narrowed to some workers (hard session affinity) do
        not block the ones behind them."""
        heap = self._heap
        kept: list[tuple[int, int, _Waiter]] = []
        while heap:
            entry = heap[0]
            waiter = entry[2]
            if waiter.future.done():  # cancelled; nothing else to undo
                heapq.heappop(heap)
                self._restricted -= waiter.restricted
                continue
            candidates = waiter.candidates()
            if candidates and self.all_busy(candidates):
                if not self._restricted:
                    break
                kept.append(heapq.heappop(heap))
                continue
            heapq.heappop(heap)
            self._restricted -= waiter.restricted
            if not candidates:
                waiter.future.set_exception(
                    ServiceUnavailable(f"model '{waiter.request.model}' has no live workers")
                )
                continue
            try:
                decision = self._select(waiter.request, candidates)
            except TurbineError as exc:
                waiter.future.set_exception(exc)
                continue
            self.waits.observe(self._clock() - waiter.enqueued)
            waiter.future.set_result(decision)
        for entry in kept:
            heapq.heappush(heap, entry)

    def fail_all(self, exc: TurbineError) -> None:
        """The model is going away: every waiter gets `exc`."""
        self._restricted = 0
        while self._heap:
            waiter = heapq.heappop(self._heap)[2]
            if not waiter.future.done():
                waiter.future.set_exception(exc)
