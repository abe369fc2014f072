"""The shared lifecycle pieces: in-flight counting and draining, async-with resources, task ends."""

from __future__ import annotations

import asyncio

import pytest

from turbine.runtime.discovery.memory import MemoryStore
from turbine.runtime.events.memory import MemoryEventPlane
from turbine.runtime.lifecycle import Closing, Connecting, InFlight, cancel_and_wait
from turbine.runtime.transport.base import StreamTasks
from turbine.runtime.transport.inproc import InprocClient, InprocHub


async def test_in_flight_counts_drains_and_waits_until_idle() -> None:
    work = InFlight()
    assert await work.wait_idle(0.0) and work.active_streams == 0 and not work.draining
    work.enter()
    with work.hold():
        assert work.active_streams == 2
    assert work.active_streams == 1
    work.drain()
    assert work.draining
    assert not await work.wait_idle(0.01)
    waiting = asyncio.ensure_future(work.wait_idle(5.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    work.leave()
    assert await waiting and work.active_streams == 0


async def test_hold_leaves_when_the_block_raises() -> None:
    work = InFlight()
    with pytest.raises(ValueError), work.hold():
        raise ValueError("boom")
    assert work.active_streams == 0 and await work.wait_idle(0.0)


async def test_stream_tasks_count_each_task_until_it_ends_and_cancel_the_rest() -> None:
    tasks = StreamTasks()
    release = asyncio.Event()

    async def until_released() -> None:
        await release.wait()

    quick = asyncio.ensure_future(until_released())
    stuck = asyncio.ensure_future(asyncio.sleep(60))
    tasks.track(quick)
    tasks.track(stuck)
    assert tasks.active_streams == 2
    release.set()
    await quick
    await asyncio.sleep(0)
    assert tasks.active_streams == 1
    assert not await tasks.wait_idle(0.01)
    await tasks.cancel_all()
    assert stuck.cancelled() and tasks.active_streams == 0 and await tasks.wait_idle(0.0)


class _Resource(Connecting):
    def __init__(self) -> None:
        self.log: list[str] = []

    async def start(self) -> None:
        self.log.append("start")

    async def close(self) -> None:
        self.log.append("close")


async def test_connecting_starts_on_enter_and_closing_closes_on_exit_even_on_error() -> None:
    resource = _Resource()
    with pytest.raises(RuntimeError):
        async with resource as entered:
            assert entered is resource and resource.log == ["start"]
            raise RuntimeError("inside")
    assert resource.log == ["start", "close"]


async def test_stores_planes_and_clients_close_on_exit() -> None:
    async with MemoryStore() as store:
        await store.put("k/1", b"v")
        assert await store.get("k/1") == b"v"
    with pytest.raises(RuntimeError):  # closed
        await store.get("k/1")
    async with MemoryEventPlane() as plane:
        sub = plane.subscribe("s.")
        first = asyncio.ensure_future(anext(sub))
        await asyncio.sleep(0)  # subscribed
        plane.publish("s.1", b"x")
        assert await asyncio.wait_for(first, 5.0) == ("s.1", b"x")
    # A closed plane ends its subscriptions.
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(sub), 5.0)
    client = InprocClient(InprocHub())
    async with client as entered:
        assert entered is client
    assert isinstance(client, Closing)


async def test_cancel_and_wait_ends_the_task_and_takes_none() -> None:
    task = asyncio.ensure_future(asyncio.sleep(60))
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)
