"""Per-worker active load, counted from the router's own routing decisions.

Each routed request adds to its worker's load and the pipeline's lifecycle callbacks take it away
again: prefill tokens stop counting at the first token (`prefill_done`), everything stops at
`finish` (success, error or cancel). Counting our own decisions rather than waiting for the workers'
load metrics means a burst of requests sees the load it is itself creating, which is what keeps
cache affinity from piling a burst onto one worker.

Active decode blocks per request: `request_blocks(prompt, expected output, block_size)` =
ceil((prompt tokens + expected output tokens) / block_size), the KV blocks the request will occupy
at its end. Dynamo counts a routed request's blocks as active decode blocks from the moment it is
routed (the worker allocates KV for the whole prompt at once); we add the expected output so a
long generation weighs more than a short one. Callers that cannot predict the output pass 0.

Invariants: `finish` is idempotent and ignores unknown ids; a worker's entry disappears once it has
no active request, so nothing leaks however requests end. Pure and I/O-free; not thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple


class WorkerLoad(NamedTuple):
    """One worker's active load as the router sees it."""

    active_requests: int = 0
    active_prefill_tokens: int = 0
    """Prompt tokens of routed requests that have not produced their first token yet."""
    active_decode_blocks: int = 0
    """KV blocks of every routed, unfinished request (see `request_blocks`)."""


IDLE = WorkerLoad()


def request_blocks(prompt_tokens: int, expected_output_tokens: int, block_size: int) -> int:
    """KV blocks a request occupies when done: ceil((prompt + expected output) / block_size)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return -(-(prompt_tokens + max(0, expected_output_tokens)) // block_size)


class _Active:
    __slots__ = ("decode_blocks", "prefill_tokens", "worker")

    def __init__(self, worker: int, prefill_tokens: int, decode_blocks: int) -> None:
        self.worker = worker
        self.prefill_tokens = prefill_tokens
        """Still-counting prefill tokens; 0 once prefill is done."""
        self.decode_blocks = decode_blocks


class LoadTracker:
    """Active requests, prefill tokens and decode blocks per worker."""

    def __init__(self) -> None:
        self._requests: dict[str, _Active] = {}
        self._loads: dict[int, WorkerLoad] = {}
        """worker -> its load; only workers with at least one active request."""

    # -- lifecycle -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, worker: int, prefill_tokens: int, decode_blocks: int) -> None:
        """Count a request just routed to `worker`.

        An id that is already active was re-routed (migration or retry): its old placement stops
        counting first, so one request never counts twice.
        """
        if prefill_tokens < 0 or decode_blocks < 0:
            raise ValueError(f"negative load for {request_id!r}: {prefill_tokens=} {decode_blocks=}")
        if request_id in self._requests:
            self.finish(request_id)
        self._requests[request_id] = _Active(worker, prefill_tokens, decode_blocks)
        load = self._loads.get(worker, IDLE)
        self._loads[worker] = WorkerLoad(
            load.active_requests + 1,
            load.active_prefill_tokens + prefill_tokens,
            load.active_decode_blocks + decode_blocks,
        )

    def prefill_done(self, request_id: str) -> None:
        """The request produced its first token: its prompt no longer waits for prefill."""
        active = self._requests.get(request_id)
        if active is None or not active.prefill_tokens:
            return
        requests, prefill, decode = self._loads[active.worker]
        # A constructor call, not `_replace` (a Python-level method several times its cost): every
        # frontend process runs this for every request, its peers' included.
        self._loads[active.worker] = WorkerLoad(requests, prefill - active.prefill_tokens, decode)
        active.prefill_tokens = 0

    def finish(self, request_id: str) -> bool:
        """The request ended (any outcome). Returns whether it was active; repeated calls are no-ops."""
        active = self._requests.pop(request_id, None)
        if active is None:
            return False
        load = self._loads[active.worker]
        if load.active_requests == 1:
            del self._loads[active.worker]
        else:
            self._loads[active.worker] = WorkerLoad(
                load.active_requests - 1,
                load.active_prefill_tokens - active.prefill_tokens,
                load.active_decode_blocks - active.decode_blocks,
            )
        return True

    def remove_worker(self, worker: int) -> None:
        """Forget `worker` and its requests (it left discovery); their later `finish` is a no-op."""
        if self._loads.pop(worker, None) is None:
            return
        for request_id in [r for r, a in self._requests.items() if a.worker == worker]:
            del self._requests[request_id]

    # -- queries -------------------------------------------------------------------------------------

    def load(self, worker: int) -> WorkerLoad:
        return self._loads.get(worker, IDLE)

    def active_prefill_tokens(self, worker: int) -> int:
        return self._loads.get(worker, IDLE).active_prefill_tokens

    def active_decode_blocks(self, worker: int) -> int:
        return self._loads.get(worker, IDLE).active_decode_blocks

    def active_requests(self, worker: int) -> int:
        return self._loads.get(worker, IDLE).active_requests

    def worker_of(self, request_id: str) -> int | None:
        """Where an active request was routed; None if it is not active."""
        active = self._requests.get(request_id)
        return None if active is None else active.worker

    @property
    def loads(self) -> Mapping[int, WorkerLoad]:
        """Live read-only view (no copy, for the per-request cost computation); idle workers absent."""
        return MappingProxyType(self._loads)

    def snapshot(self) -> dict[int, WorkerLoad]:
        """A copy of every busy worker's load, for metrics; idle workers are absent."""
        return dict(self._loads)

    def __len__(self) -> int:
        """Number of active requests."""
        return len(self._requests)
