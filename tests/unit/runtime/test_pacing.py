"""`paced`: bursts at most once per window, each burst everything that was waiting."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator

from turbine.runtime.events.pacing import paced


class Source:
    """Queued items handed over without suspending while any wait, as the event planes' drain does."""

    def __init__(self) -> None:
        self.pending: collections.deque[int] = collections.deque()
        self.wake = asyncio.Event()

    def push(self, *items: int) -> None:
        self.pending.extend(items)
        self.wake.set()

    async def drain(self) -> AsyncGenerator[int, None]:
        while True:
            while self.pending:
                yield self.pending.popleft()
            self.wake.clear()
            await self.wake.wait()


async def _collect(source: Source, window: float, into: asyncio.Queue[tuple[int, float]]) -> None:
    loop = asyncio.get_running_loop()
    async for item in paced(source.drain(), window):
        into.put_nowait((item, loop.time()))


async def _take(queue: asyncio.Queue[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    return [await asyncio.wait_for(queue.get(), 5) for _ in range(n)]


async def test_a_burst_carries_everything_waiting_and_the_next_waits_for_the_window() -> None:
    loop = asyncio.get_running_loop()
    source, queue = Source(), asyncio.Queue[tuple[int, float]]()
    window = 0.3
    task = asyncio.create_task(_collect(source, window, queue))
    start = loop.time()
    source.push(*range(10))  # a quiet stream: the first burst goes at once, all ten in it
    got = await _take(queue, 10)
    first_burst = loop.time() - start
    source.push(*range(10, 20))  # inside the window: held back until it ends, then all together
    got += await _take(queue, 10)
    task.cancel()
    assert [item for item, _ in got] == list(range(20))
    assert first_burst < window / 2
    second = [t for item, t in got if item >= 10]
    assert second[0] - got[0][1] >= window * 0.9
    assert second[-1] - second[0] < window / 2  # one burst, not one item per window


async def test_no_window_passes_items_straight_through() -> None:
    source, queue = Source(), asyncio.Queue[tuple[int, float]]()
    task = asyncio.create_task(_collect(source, 0.0, queue))
    source.push(1, 2, 3)
    got = await _take(queue, 3)
    source.push(4)
    got += await _take(queue, 1)
    task.cancel()
    assert [item for item, _ in got] == [1, 2, 3, 4]
