"""The subscriber side every event plane shares: a bounded queue per subscription and the loop that
drains it into the subscriber's async generator.

A plane `push`es each message whose subject matches a subscription's prefix. A slow subscriber's
full queue drops its oldest entry, and counts it, so that a publisher or a socket reader never
waits for a consumer (the `EventPlane` contract in `base.py`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable

from turbine.runtime.events.base import OnLive


class Subscription:
    __slots__ = ("dropped", "on_live", "pending", "prefix", "wake")

    def __init__(self, prefix: str, max_pending: int, on_live: OnLive | None = None) -> None:
        self.prefix = prefix
        self.pending: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=max_pending)
        self.wake = asyncio.Event()
        self.on_live = on_live
        self.dropped = 0

    def push(self, subject: str, payload: bytes) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1  # the deque drops its oldest entry on append
        self.pending.append((subject, payload))
        self.wake.set()

    async def drain(
        self, closed: Callable[[], bool], check: Callable[[], None] | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """Yield what arrives until `closed()`; `check()`, run whenever the queue is empty, may raise
        to end the subscription (a plane whose transport failed). The plane's `close` sets `wake`."""
        while not closed():
            while self.pending:
                yield self.pending.popleft()
            if check is not None:
                check()
            self.wake.clear()
            if not self.pending and not closed():
                await self.wake.wait()
