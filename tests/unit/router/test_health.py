"""`Quarantine`: which workers routing skips, and when they come back."""

from __future__ import annotations

import asyncio
import time

from turbine.router.health import HealthCounts, Quarantine


class Answers:
    """A probe that answers as scripted: False (silent) until `answer` is set."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.calls: list[str] = []

    async def __call__(self, address: str, timeout_s: float) -> bool:
        self.calls.append(address)
        try:
            async with asyncio.timeout(0.01):
                await self.answer.wait()
        except TimeoutError:
            return False
        return True


async def _until_healthy(q: Quarantine, instance_id: int) -> None:
    for _ in range(1000):
        if q.healthy(instance_id, time.monotonic()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("still quarantined")


async def test_a_stalled_worker_is_skipped_until_a_probe_answers() -> None:
    probe = Answers()
    q = Quarantine("m", probe, 1.0)
    q.stalled(7, "127.0.0.1:1")
    q.stalled(7, "127.0.0.1:1")  # another stream of the same stall
    assert not q.healthy(7, time.monotonic() + 1e9) and q.healthy(8, time.monotonic())
    assert q.counts() == HealthCounts(stalls=2, quarantines=1, quarantined=1, canary_failures=0)
    for _ in range(100):
        if len(probe.calls) >= 2:
            break
        await asyncio.sleep(0.01)
    assert not q.healthy(7, time.monotonic())  # silent probes keep it out
    probe.answer.set()
    await _until_healthy(q, 7)
    assert q.counts().quarantined == 0
    await q.close()


async def test_a_worker_that_leaves_discovery_is_forgotten_and_no_longer_probed() -> None:
    probe = Answers()
    q = Quarantine("m", probe, 1.0)
    q.stalled(7, "127.0.0.1:1")
    q.unreachable(8)
    q.retain([8])
    assert q.healthy(7, time.monotonic()) and not q.healthy(8, time.monotonic())
    calls = len(probe.calls)
    await asyncio.sleep(0.05)  # room for a probe that was not stopped: silence is what is tested
    assert len(probe.calls) <= calls + 1  # at most the one in flight when it was cancelled
    await q.close()


async def test_without_a_probe_a_stall_skips_the_worker_for_one_stall_timeout() -> None:
    q = Quarantine("m", None, 5.0)
    q.stalled(7, "127.0.0.1:1")
    now = time.monotonic()
    assert not q.healthy(7, now) and q.healthy(7, now + 5.1)


async def test_a_failed_canary_holds_until_one_passes_even_if_the_process_answers() -> None:
    probe = Answers()
    probe.answer.set()
    q = Quarantine("m", probe, 1.0)
    q.canary_failed(7, "no answer within 1 s")
    q.stalled(7, "127.0.0.1:1")  # its process answers the probe at once...
    await asyncio.sleep(0.05)  # room for such an answer to (wrongly) end the quarantine
    assert not q.healthy(7, time.monotonic())  # ...but its engine failed a real request
    q.canary_passed(7)
    await _until_healthy(q, 7)
    assert q.counts().canary_failures == 1
    await q.close()
