"""The subscription queue every event plane shares: bounded, oldest dropped and counted, drained in order."""

from __future__ import annotations

import asyncio

import pytest

from turbine.runtime.events.fanout import Subscription


async def test_a_full_queue_drops_its_oldest_and_counts_it() -> None:
    sub = Subscription("a.", max_pending=2)
    for i in range(3):
        sub.push(f"a.{i}", b"%d" % i)
    assert sub.dropped == 1
    state = {"closed": False}
    got = []
    async for subject, _ in sub.drain(lambda: state["closed"]):
        got.append(subject)
        if len(got) == 2:
            state["closed"] = True
    assert got == ["a.1", "a.2"]


async def test_drain_waits_for_pushes_and_ends_when_closed() -> None:
    sub = Subscription("", max_pending=8)
    state = {"closed": False}
    got: list[bytes] = []

    async def consume() -> None:
        async for _, payload in sub.drain(lambda: state["closed"]):
            got.append(payload)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    sub.push("x", b"1")
    sub.push("y", b"2")
    await asyncio.sleep(0)
    assert got == [b"1", b"2"]
    state["closed"] = True
    sub.wake.set()  # what a plane's close() does
    await asyncio.wait_for(task, 1)


async def test_a_failing_check_ends_the_subscription() -> None:
    sub = Subscription("", max_pending=8)
    sub.push("x", b"1")

    def broken() -> None:
        raise OSError("transport failed")

    gen = sub.drain(lambda: False, broken)
    assert await gen.__anext__() == ("x", b"1")  # queued messages still come first
    with pytest.raises(OSError, match="transport failed"):
        await gen.__anext__()
