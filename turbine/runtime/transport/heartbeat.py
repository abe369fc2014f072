"""Liveness of one request-plane connection: a Ping every interval, and silence past a timeout.

A connection that stays open while its peer is frozen (SIGSTOP, a hung process, a partition that
drops packets without a reset) delivers nothing and never fails; only silence tells. Each end sends
a Ping every `HEARTBEAT_INTERVAL_S`, so a live peer is never silent for long, and calls `on_silent`
once it heard nothing at all (no frame of any kind) for `stall_timeout_s`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# Often enough that a one-second stall timeout still sees several beats; a beat is a 6-byte frame.
HEARTBEAT_INTERVAL_S = 0.25


class Heartbeat:
    """Owned by one connection: `heard()` on every read, `stop()` when the connection closes.
    `armed` False: send beats but never call `on_silent` (until `arm()`), for a peer that has not
    shown it sends beats of its own."""

    __slots__ = ("_handle", "_last", "_loop", "_on_silent", "_send", "_timeout", "armed", "fresh")

    def __init__(
        self,
        send: Callable[[], None],
        on_silent: Callable[[float], None],
        stall_timeout_s: float,
        *,
        armed: bool = True,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._send = send
        self._on_silent = on_silent
        self._timeout = stall_timeout_s
        self.armed = armed
        # Set by the connection on every read; the tick clears it (cheaper than a clock read per read).
        self.fresh = True
        self._last = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(HEARTBEAT_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        if self.fresh:
            self.fresh = False
            self._last = now
        elif self.armed and self._timeout > 0 and now - self._last >= self._timeout:
            self._handle = None
            self._on_silent(now - self._last)
            return
        self._send()
        self._handle = self._loop.call_later(HEARTBEAT_INTERVAL_S, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
