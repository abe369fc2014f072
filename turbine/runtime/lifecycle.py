"""The lifecycle pieces every server, plane and composition root shares.

- `InFlight`: draining and in-flight bookkeeping. A server (or the HTTP edge) counts each stream
  it runs, refuses new ones once `drain()` was called, and `wait_idle()` lets its owner wait,
  bounded, for the running ones to finish.
- `Closing` / `Connecting`: what makes a store, plane or client an async context manager.
  `async with x:` hands back `x` (connected first, for a `Connecting` one) and closes it on exit,
  so a composition root enters each resource once on an `AsyncExitStack` and tears everything
  down in one place, in reverse order.
- `stop_on_signals` and `cancel_and_wait`: the two steps of a process's start and of a
  background task's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any, Self


class InFlight:
    """Streams (or requests) in flight, and whether their owner is draining.

    The owner calls `enter()` when one starts and `leave()` when it ends (or wraps it in
    `with hold():`), and checks `draining` before taking a new one. Single event loop; not
    thread-safe."""

    def __init__(self) -> None:
        self._active = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        """From now on the owner refuses new streams; running ones go on."""
        self._draining = True

    @property
    def active_streams(self) -> int:
        return self._active

    def enter(self) -> None:
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One stream in flight for the duration of the block."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (or the timeout passes); True if idle."""
        if self._active:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        return not self._active


class Closing:
    """An async context manager over `close()`: entering hands back the object, leaving closes it."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Connecting(Closing):
    """A `Closing` object that connects up front: entering awaits `start()` first."""

    async def start(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop` (where the loop can take signal handlers: the main thread)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended; its cancellation is not re-raised."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
