"""The NATS event plane (`--event-plane nats`): KV events and load metrics through a NATS server.

One connection per process. `publish` appends to a bounded buffer (oldest dropped and counted when
full) that one owned task hands to nats-py in order, so publishing never blocks the engine's loop
and one publisher's messages on one subject keep their order. While the connection is down the
buffer waits for the reconnect instead of filling nats-py's reconnect buffer, whose overflow would
raise.

`subscribe(prefix)` is a NATS wildcard subscription `prefix + ">"` (prefixes end with `.`). nats-py
reconnects forever after the server goes away and re-subscribes; what was published meanwhile is
lost (core NATS keeps nothing), so every subscription's `on_live` runs again once the connection is
back and its subscriptions are confirmed by the server: KV consumers re-dump there, which covers
workers that published nothing since (no later event would reveal the gap).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncGenerator

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from turbine.runtime.events.base import OnLive
from turbine.runtime.events.fanout import Subscription
from turbine.runtime.lifecycle import Connecting, cancel_and_wait
from turbine.runtime.transport.nats_flush import flush_in_order

log = logging.getLogger(__name__)

_FIRST_CONNECT_TIMEOUT_S = 5.0
# Hand this many messages to nats-py between yields to the loop, so a long backlog after a
# reconnect does not stall request handling.
_PUBLISH_SLICE = 256


class NatsEventPlane(Connecting):
    """An EventPlane over the NATS server at `server_url` (see the module docstring)."""

    def __init__(
        self,
        server_url: str = "nats://127.0.0.1:4222",
        *,
        max_buffered: int = 65536,
        max_pending: int = 65536,
        reconnect_wait_s: float = 0.25,
        connect_timeout_s: float = _FIRST_CONNECT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._url = server_url
        self._tls = tls
        self._max_pending = max_pending
        self._reconnect_wait_s = reconnect_wait_s
        self._connect_timeout_s = connect_timeout_s
        self._name = f"turbine-events-{secrets.token_hex(4)}"
        self._outgoing: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=max_buffered)
        self._wake: asyncio.Event | None = None
        self._drained = asyncio.Event()  # set while the flusher has handed everything to nats-py
        self._nc: NatsClient | None = None
        self._starting: asyncio.Lock | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._subs: set[Subscription] = set()
        self._closed = False
        self.dropped = 0
        """Messages published but never handed to NATS (buffer overflow, too large, closed)."""

    # --------------------------------------------------------------------------- connection

    async def start(self) -> None:
        """Connect (bounded: a wrong URL fails here) and start publishing what is buffered.
        Idempotent; `subscribe` calls it too. Reconnects after that are nats-py's, forever."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._nc is not None:
                return
            if self._closed:
                raise RuntimeError("event plane closed")
            self._wake = asyncio.Event()
            nc = NatsClient()
            try:
                await asyncio.wait_for(
                    nc.connect(
                        self._url,
                        name=self._name,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        # nats-py annotates int seconds but sleeps on the value: a fraction works.
                        reconnect_time_wait=self._reconnect_wait_s,  # type: ignore[arg-type]
                        connect_timeout=2,
                        drain_timeout=2,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        error_cb=self._on_error,
                        tls=self._tls,
                    ),
                    self._connect_timeout_s,
                )
            except BaseException:
                # nats-py would retry a first connect forever; a bounded start must not leave it.
                # The close is bounded too: after a failed TLS handshake it never returns.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 1.0)
                raise
            self._nc = nc
            self._flusher = asyncio.get_running_loop().create_task(self._flush(nc), name=self._name)
            if self._outgoing:
                self._wake.set()

    async def _on_disconnected(self) -> None:
        if not self._closed and self._nc is not None:  # not for a first connect that failed
            log.warning("event plane: lost NATS at %s, reconnecting", self._url)

    async def _on_reconnected(self) -> None:
        # nats-py calls this after re-subscribing and a PING round trip: the server has our
        # subscriptions, so a consumer re-syncing now misses nothing from here on.
        log.info("event plane: NATS at %s is back", self._url)
        for sub in list(self._subs):
            if sub.on_live is not None:
                sub.on_live()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("event plane nats: %s", exc)

    # ------------------------------------------------------------------------------ publish

    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            self.dropped += 1
            return
        if len(self._outgoing) == self._outgoing.maxlen:
            self.dropped += 1  # the deque drops its oldest entry on append
        self._outgoing.append((subject, payload))
        self._drained.clear()
        if self._wake is not None:
            self._wake.set()

    async def _flush(self, nc: NatsClient) -> None:
        assert self._wake is not None
        wake, outgoing = self._wake, self._outgoing
        while True:
            if not outgoing:
                self._drained.set()
            await wake.wait()
            wake.clear()
            sent = 0
            while outgoing:
                if not nc.is_connected:
                    if nc.is_closed:
                        return
                    # Keep the backlog ourselves (bounded, oldest dropped) until nats-py is back.
                    await asyncio.sleep(self._reconnect_wait_s / 2)
                    continue
                subject, payload = head = outgoing[0]
                try:
                    await nc.publish(subject, payload)
                except Exception as exc:
                    if not nc.is_connected:
                        continue  # the connection broke under us: retry this one after reconnect
                    # Connected, so the message itself was refused (over max_payload, bad subject).
                    self.dropped += 1
                    log.warning(
                        "event plane: dropped a %d-byte message on %s: %r", len(payload), subject, exc
                    )
                # A publish racing with a full buffer may have dropped the head meanwhile.
                if outgoing and outgoing[0] is head:
                    outgoing.popleft()
                sent += 1
                if sent % _PUBLISH_SLICE == 0:
                    await asyncio.sleep(0)

    # ---------------------------------------------------------------------------- subscribe

    async def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        if prefix and not prefix.endswith("."):
            raise ValueError(f"event plane prefix {prefix!r} must be empty or end with '.'")
        await self.start()
        nc = self._nc
        assert nc is not None
        sub = Subscription(prefix, self._max_pending, on_live)

        async def deliver(msg: Msg) -> None:
            sub.push(msg.subject, msg.data)

        nats_sub = None
        try:
            nats_sub = await nc.subscribe(prefix + ">", cb=deliver)
            # The server has the subscription once a PING written after it is answered.
            await flush_in_order(nc)
            self._subs.add(sub)
            if on_live is not None:
                on_live()
            async for message in sub.drain(lambda: self._closed):
                yield message
        finally:
            self._subs.discard(sub)
            if nats_sub is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nats_sub.unsubscribe()

    # -------------------------------------------------------------------------------- close

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        """End subscriptions, give buffered messages up to `flush_timeout_s` to go out, close."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            sub.wake.set()
        nc = self._nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), flush_timeout_s)
        await cancel_and_wait(self._flusher)
        self._flusher = None
        self.dropped += len(self._outgoing)
        self._outgoing.clear()
        if nc is not None:
            # drain: unsubscribe, flush what nats-py still holds, then close; it refuses while
            # reconnecting, and close alone is enough then.
            try:
                await nc.drain()
            except Exception:
                with contextlib.suppress(Exception):
                    await nc.close()
            self._nc = None
