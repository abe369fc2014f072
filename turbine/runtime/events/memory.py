"""In-process event plane: per-subscriber bounded deques, woken through an asyncio.Event."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator

from turbine.runtime.events.base import OnLive


class _Subscription:
    __slots__ = ("dropped", "pending", "prefix", "wake")

    def __init__(self, prefix: str, max_pending: int) -> None:
        self.prefix = prefix
        self.pending: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=max_pending)
        self.wake = asyncio.Event()
        self.dropped = 0


class MemoryEventPlane:
    def __init__(self, max_pending: int = 65536) -> None:
        self._max_pending = max_pending
        self._subs: list[_Subscription] = []
        self._closed = False

    def publish(self, subject: str, payload: bytes) -> None:
        for sub in self._subs:
            if subject.startswith(sub.prefix):
                if len(sub.pending) == self._max_pending:
                    sub.dropped += 1
                sub.pending.append((subject, payload))
                sub.wake.set()

    async def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        sub = _Subscription(prefix, self._max_pending)
        self._subs.append(sub)
        # In one process nothing is ever lost after this point, so it is live once, right away.
        if on_live is not None:
            on_live()
        try:
            while not self._closed:
                while sub.pending:
                    yield sub.pending.popleft()
                sub.wake.clear()
                if not sub.pending:
                    await sub.wake.wait()
        finally:
            self._subs.remove(sub)

    async def close(self) -> None:
        self._closed = True
        for sub in self._subs:
            sub.wake.set()
