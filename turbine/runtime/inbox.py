"""A single-consumer inbox for per-token hand-offs inside one event loop.

Token streams hand one item per decode step from a producer (the engine's step loop, a socket's
`data_received`) to the task that owns the stream. `asyncio.Queue` pays for what these hand-offs
never use (bounded size, many waiters, loop checks per call); with one consumer that takes
everything queued at once, a list and one future per wait do the same job for less CPU per token
(`benchmarks/results/README.md`).
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Unbounded; `put_nowait` from the loop's thread only; one task awaits `take` at a time."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[T]:
        """Every item queued since the last take, oldest first; waits while there is none."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def empty(self) -> bool:
        return not self._items
