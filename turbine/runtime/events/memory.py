"""In-process event plane: per-subscriber bounded deques, woken through an asyncio.Event."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from turbine.runtime.events.base import OnLive
from turbine.runtime.events.fanout import Subscription
from turbine.runtime.lifecycle import Closing


class MemoryEventPlane(Closing):
    def __init__(self, max_pending: int = 65536) -> None:
        self._max_pending = max_pending
        self._subs: list[Subscription] = []
        self._closed = False

    def publish(self, subject: str, payload: bytes) -> None:
        for sub in self._subs:
            if subject.startswith(sub.prefix):
                sub.push(subject, payload)

    async def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        sub = Subscription(prefix, self._max_pending)
        self._subs.append(sub)
        # In one process nothing is ever lost after this point, so it is live once, right away.
        if on_live is not None:
            on_live()
        try:
            async for message in sub.drain(lambda: self._closed):
                yield message
        finally:
            self._subs.remove(sub)

    async def close(self) -> None:
        self._closed = True
        for sub in self._subs:
            sub.wake.set()
