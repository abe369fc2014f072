"""Pacing a stream of messages into bursts: at most one burst per window, each burst everything
that was waiting.

A worker's `kv_events` stream carries one message per engine step; a busy engine steps hundreds or
thousands of times a second, and every frontend process that follows it would wake that often. Paced,
a follower wakes at most once per window and gets all the messages of the window at once (the
request plane writes the frames a generator yields without waiting as one write).

A burst is what the source hands over without suspending: the items already queued when the window
opens. The first item after a quiet spell goes out at once, so a lightly loaded worker's events are
not delayed at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def paced(items: AsyncIterator[T], window_s: float) -> AsyncGenerator[T, None]:
    """`items`, in order, in bursts at least `window_s` apart (no pacing when `window_s` is 0)."""
    loop = asyncio.get_running_loop()
    next_burst = 0.0
    in_burst = False

    def burst_over() -> None:
        nonlocal in_burst
        in_burst = False

    async for item in items:
        if window_s and not in_burst:
            delay = next_burst - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_burst = loop.time() + window_s
            # Runs on the loop's next turn, i.e. once the source (and the consumer) had to wait:
            # everything yielded before then belongs to this burst.
            in_burst = True
            loop.call_soon(burst_over)
        yield item
