"""Which of a model's workers routing skips for now, and until when.

Two kinds of skip. A worker that refused a connection or a request is skipped for a moment
(`UNREACHABLE_QUARANTINE_S`): discovery drops a dead one when its lease expires. A worker whose
connection went silent past the stall timeout (frozen, hung, partitioned: `WorkerStalled`) is
skipped until it answers again: a probe task (one per such worker, owned here) asks the request
plane to reach it on a fresh connection, repeatedly, and lifts the skip at the first answer; the
worker leaving discovery ends the probe. Clients without `probe` skip it for one stall timeout.
A worker that failed a canary (canary.py) is skipped until a canary passes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)

# After a worker refuses connections, skip it for this long (unless nobody else is left): discovery
# will remove a dead worker only after its lease TTL, and every request in between should not pay
# for a failed connect first.
UNREACHABLE_QUARANTINE_S = 2.0
# Between two probes of a stalled worker that refused the connection outright (one that accepts
# it but stays silent already took a whole stall timeout).
PROBE_RETRY_S = 0.5

Probe = Callable[[str, float], Awaitable[bool]]


class HealthSettings(NamedTuple):
    """`--request-stall-timeout-s`, `--health-check-interval-s`, `--health-check-timeout-s` (0: off)."""

    stall_timeout_s: float = 0.0
    check_interval_s: float = 0.0
    check_timeout_s: float = 10.0


class HealthCounts(NamedTuple):
    """One model's stall bookkeeping, for /metrics."""

    stalls: int  # streams failed because their worker went silent
    quarantines: int  # times a worker was taken out of routing after a stall
    quarantined: int  # workers out of routing right now (any kind of skip)
    canary_failures: int  # canary requests that failed or timed out


class Quarantine:
    def __init__(self, model: str, probe: Probe | None, stall_timeout_s: float) -> None:
        self._model = model
        self._probe = probe
        self._stall_timeout_s = stall_timeout_s
        self._until: dict[int, float] = {}  # instance -> monotonic time (inf: until it answers)
        self._probes: dict[int, asyncio.Task[None]] = {}
        self._stalls = 0
        self._quarantines = 0
        self._canary_failures = 0
        self._failed_canary: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self._until)

    def counts(self) -> HealthCounts:
        now = time.monotonic()
        quarantined = sum(1 for t in self._until.values() if t > now)
        return HealthCounts(self._stalls, self._quarantines, quarantined, self._canary_failures)

    def healthy(self, instance_id: int, now: float) -> bool:
        return self._until.get(instance_id, 0.0) <= now

    def unreachable(self, instance_id: int) -> None:
        """The worker refused a connection or a request: skip it for a moment."""
        until = time.monotonic() + UNREACHABLE_QUARANTINE_S
        self._until[instance_id] = max(until, self._until.get(instance_id, 0.0))

    def stalled(self, instance_id: int, address: str) -> None:
        """A stream to this worker failed by silence: skip the worker until it answers again."""
        self._stalls += 1
        if math.isinf(self._until.get(instance_id, 0.0)) or instance_id in self._probes:
            return  # the other streams of the same stall
        self._quarantines += 1
        if self._probe is None:
            self._until[instance_id] = time.monotonic() + self._stall_timeout_s
            log.warning(
                "model %s: worker %x stalled; skipping it for %.0f s",
                self._model,
                instance_id,
                self._stall_timeout_s,
            )
            return
        log.warning("model %s: worker %x stalled; skipping it until it answers", self._model, instance_id)
        self._until[instance_id] = math.inf
        self._probes[instance_id] = asyncio.get_running_loop().create_task(
            self._probe_until_answer(instance_id, address)
        )

    def canary_failed(self, instance_id: int, why: str) -> None:
        """A canary request failed: skip the worker until one passes."""
        self._canary_failures += 1
        if instance_id not in self._failed_canary:
            self._quarantines += 1
            log.warning(
                "model %s: worker %x failed a health check (%s); skipping it", self._model, instance_id, why
            )
        self._failed_canary.add(instance_id)
        self._until[instance_id] = math.inf

    def canary_passed(self, instance_id: int) -> None:
        if instance_id in self._failed_canary:
            self._failed_canary.discard(instance_id)
            if instance_id not in self._probes:
                self._until.pop(instance_id, None)
            log.info(
                "model %s: worker %x passes health checks again; routing to it", self._model, instance_id
            )

    async def _probe_until_answer(self, instance_id: int, address: str) -> None:
        assert self._probe is not None
        try:
            while True:
                started = time.monotonic()
                if await self._probe(address, self._stall_timeout_s):
                    break
                # A refused connection comes back at once; do not spin on it.
                await asyncio.sleep(max(0.0, PROBE_RETRY_S - (time.monotonic() - started)))
            log.info("model %s: worker %x answers again; routing to it", self._model, instance_id)
            if instance_id not in self._failed_canary:
                self._until.pop(instance_id, None)
        finally:
            if self._probes.get(instance_id) is asyncio.current_task():
                del self._probes[instance_id]

    def retain(self, live: Iterable[int]) -> None:
        """Forget workers that left discovery (and stop probing them)."""
        keep = set(live)
        self._until = {i: t for i, t in self._until.items() if i in keep}
        self._failed_canary &= keep
        for instance_id in [i for i in self._probes if i not in keep]:
            self._probes.pop(instance_id).cancel()

    async def close(self) -> None:
        probes = list(self._probes.values())
        self._probes.clear()
        for task in probes:
            task.cancel()
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)
