"""The ZeroMQ event plane (`--event-plane zmq`): KV events and load metrics without a broker.

For one frontend and any number of workers. The frontend's plane binds one SUB socket on
`--zmq-event-endpoint` (on its first `subscribe`); every worker process's plane connects a PUB
socket to it (in `start()` or on its first `publish`). ZMQ lets PUB connect and SUB bind, so many
publishers reach the one subscriber, and a subscriber that comes and goes is reconnected to by
libzmq on its own. Only one process can bind an endpoint: several frontends need
`--event-plane nats` (a second one here cannot bind and only follows from routing history).

Messages are two frames, `[subject, payload]`. The SUB socket is subscribed (ZMQ's byte-prefix
topic filter, applied on the publisher's side) to the prefix of every active `subscribe`, and one
reader task hands each message to the subscriptions whose prefix it starts with. Prefixes end with
`.`, so a byte-prefix match is a whole-token match, as on NATS.

`publish` hands the message to libzmq with `NOBLOCK` and never waits: a full send queue
(`max_buffered`, the high-water mark) drops and counts it. The publishing socket is an XPUB with
`XPUB_NODROP`, a PUB that reports a full queue as `EAGAIN` instead of dropping silently (the
subscription notices an XPUB queues for its owner are discarded every so often). One
publisher's messages reach the subscriber in publish order over its one connection.

With `subscribe_endpoint` the SUB socket connects there instead of binding `endpoint`: both sockets
connect to a forwarder (an XSUB bound on `endpoint`, an XPUB on `subscribe_endpoint`), so many
processes publish and subscribe alike (the local channel of `--num-processes`).

Losses are silent on ZMQ: a subscription needs a moment to travel from the SUB socket to every
connected PUB (the "slow joiner"), a PUB drops what it publishes before it has the subscription,
and a connection that breaks loses what was in flight. `on_live` therefore runs once, right after
the socket is bound and subscribed; KV consumers dump every worker then, and a worker whose events
were lost shows an event-id gap with its next batch, which makes them dump it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import zmq
import zmq.asyncio

from turbine.runtime.events.base import OnLive
from turbine.runtime.events.fanout import Subscription
from turbine.runtime.lifecycle import Connecting, cancel_and_wait

log = logging.getLogger(__name__)

# How many publishes apart the XPUB's subscription notices are read and thrown away.
_DISCARD_NOTICES_EVERY = 1024


def _discard_notices(pub: zmq.Socket[bytes]) -> None:
    """Read what the XPUB socket queued about (un)subscriptions; nobody needs it."""
    with contextlib.suppress(zmq.Again):
        while True:
            pub.recv(zmq.NOBLOCK)


class ZmqEventPlane(Connecting):
    """An EventPlane over ZeroMQ at `endpoint` (see the module docstring): subscribing binds it,
    publishing connects to it."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        *,
        max_buffered: int = 65536,
        max_pending: int = 65536,
        subscribe_endpoint: str | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._subscribe_endpoint = subscribe_endpoint
        self._max_buffered = max_buffered
        self._max_pending = max_pending
        self._ipv6 = int(endpoint.startswith("tcp://["))  # libzmq needs it for [::1]-style hosts
        self._ctx = zmq.asyncio.Context()
        # Publishing is synchronous (NOBLOCK), so the XPUB socket is a plain one: no futures.
        self._pub: zmq.Socket[bytes] | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._closed = False
        self._failed: Exception | None = None
        self._published = 0
        self.dropped = 0
        """Messages published but never handed to ZMQ (send queue full, closed, socket error)."""
        self.malformed = 0
        """Received messages that were not two frames with a UTF-8 subject (ignored)."""

    # ------------------------------------------------------------------------------ publish

    async def start(self) -> None:
        """Connect the publishing socket now (a malformed endpoint fails here). Idempotent. Connecting
        never waits for the subscriber: libzmq connects, and reconnects, in the background."""
        self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        if self._closed:
            raise RuntimeError("event plane closed")
        if self._pub is None:
            pub: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.XPUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, self._max_buffered)
            pub.setsockopt(zmq.XPUB_NODROP, 1)
            pub.setsockopt(zmq.IPV6, self._ipv6)
            try:
                pub.connect(self._endpoint)
            except BaseException:
                pub.close(linger=0)
                raise
            self._pub = pub
            log.info("event plane: publishing to zmq %s", self._endpoint)
        return self._pub

    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            self.dropped += 1
            return
        try:
            pub = self._connect()
            pub.send_multipart([subject.encode(), payload], flags=zmq.NOBLOCK)
            self._published += 1
            if self._published % _DISCARD_NOTICES_EVERY == 0:
                _discard_notices(pub)
        except zmq.Again:
            self.dropped += 1  # the high-water mark is reached: never wait for the subscriber
        except zmq.ZMQError as exc:
            self.dropped += 1
            log.warning("event plane: dropped a %d-byte message on %s: %s", len(payload), subject, exc)

    # ---------------------------------------------------------------------------- subscribe

    def _bind(self) -> zmq.asyncio.Socket:
        if self._sub is None:
            sub = self._ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, self._max_pending)
            sub.setsockopt(zmq.IPV6, self._ipv6)
            try:
                if self._subscribe_endpoint is not None:
                    sub.connect(self._subscribe_endpoint)
                else:
                    sub.bind(self._endpoint)
            except zmq.ZMQError as exc:
                sub.close(linger=0)
                raise OSError(
                    f"cannot bind the zmq event endpoint {self._endpoint}: {exc} (one frontend per "
                    "endpoint; several frontends need --event-plane nats)"
                ) from exc
            self._sub = sub
            self._reader = asyncio.get_running_loop().create_task(
                self._read(sub), name=f"zmq-events-{self._endpoint}"
            )
            log.info("event plane: receiving on zmq %s", self._subscribe_endpoint or self._endpoint)
        return self._sub

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        try:
            await self._dispatch(sock)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not expected from a bound SUB socket; end the subscriptions so that their consumers
            # subscribe again (on a fresh socket) instead of waiting forever.
            log.error("event plane: receiving on zmq %s failed: %r", self._endpoint, exc)
            self._failed = exc
            if self._sub is sock:
                self._sub = None
                self._reader = None
            sock.close(linger=0)
            for sub in self._subs:
                sub.wake.set()

    async def _dispatch(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                self.malformed += 1
                continue
            try:
                subject = frames[0].decode()
            except UnicodeDecodeError:
                self.malformed += 1
                continue
            payload = frames[1]
            for sub in self._subs:
                if subject.startswith(sub.prefix):
                    sub.push(subject, payload)

    async def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        if prefix and not prefix.endswith("."):
            raise ValueError(f"event plane prefix {prefix!r} must be empty or end with '.'")
        if self._closed:
            raise RuntimeError("event plane closed")
        sock = self._bind()
        sub = Subscription(prefix, self._max_pending, on_live)
        topic = prefix.encode()
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        self._subs.append(sub)
        try:
            if on_live is not None:
                on_live()

            def check() -> None:
                if sock.closed and not self._closed:
                    raise OSError(f"zmq event socket on {self._endpoint} failed: {self._failed!r}")

            async for message in sub.drain(lambda: self._closed, check):
                yield message
        finally:
            self._subs.remove(sub)
            if not self._closed and not sock.closed:
                # libzmq counts subscriptions per topic: this drops only ours.
                sock.setsockopt(zmq.UNSUBSCRIBE, topic)

    # -------------------------------------------------------------------------------- close

    async def close(self) -> None:
        """End subscriptions and close the sockets at once (linger 0: unsent messages are lost)."""
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            sub.wake.set()
        await cancel_and_wait(self._reader)
        self._reader = None
        for sock in (self._pub, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._sub = None
        # Every socket is closed with linger 0, so terminating the context does not wait.
        self._ctx.term()
