"""`flush_in_order` against a loopback socket that speaks just enough NATS to record the order in
which the client's commands reach a server (a real nats-server cannot show that order)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import ConnectionClosedError

from tests.waiting import wait_for
from turbine.runtime.transport.nats_flush import flush_in_order

_INFO = {"server_id": "recorder", "version": "2.10.0", "proto": 1, "headers": True, "max_payload": 1 << 20}


class Recorder:
    """Answers every PING with a PONG and records each command's verb in arrival order."""

    def __init__(self) -> None:
        self.verbs: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"INFO " + json.dumps(_INFO).encode() + b"\r\n")
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().decode()
                self.verbs.append(verb)
                if verb == "PING":
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    await rec.start()
    try:
        yield rec
    finally:
        await rec.close()


async def _subscribe_then(rec: Recorder, confirm: Callable[[NatsClient], Awaitable[None]]) -> list[str]:
    nc = NatsClient()
    await nc.connect(f"nats://127.0.0.1:{rec.port}", allow_reconnect=False, connect_timeout=2)
    try:
        handshake = len(rec.verbs)
        await nc.subscribe("a.>", cb=_ignore)
        await confirm(nc)
        return rec.verbs[handshake:]
    finally:
        await nc.close()


async def _ignore(msg: object) -> None:
    pass


@pytest.mark.unit
async def test_the_last_ping_follows_the_subscription(recorder: Recorder) -> None:
    # What the server has seen by the time the call returns: the SUB, then the PING answered last.
    seen = await _subscribe_then(recorder, flush_in_order)
    assert seen[-1] == "PING" and "SUB" in seen[:-1]


@pytest.mark.unit
async def test_a_connection_that_keeps_publishing_does_not_hold_it_up(recorder: Recorder) -> None:
    nc = NatsClient()
    await nc.connect(f"nats://127.0.0.1:{recorder.port}", allow_reconnect=False, connect_timeout=2)
    stop = asyncio.Event()

    async def publish() -> None:
        while not stop.is_set():
            await nc.publish("busy.subject", b"x")
            await asyncio.sleep(0)

    publisher = asyncio.get_running_loop().create_task(publish())
    try:
        await wait_for(lambda: "PUB" in recorder.verbs)  # publishing is under way
        handshake = len(recorder.verbs)
        await nc.subscribe("a.>", cb=_ignore)
        await asyncio.wait_for(flush_in_order(nc), 2.0)
        verbs = recorder.verbs
        last_ping = max(i for i, verb in enumerate(verbs) if verb == "PING")
        assert last_ping >= handshake and verbs.index("SUB") < last_ping
    finally:
        stop.set()
        await publisher
        await nc.close()


@pytest.mark.unit
async def test_nats_py_flush_alone_can_overtake_a_pending_subscription(recorder: Recorder) -> None:
    # Why flush_in_order exists: nats-py's own flush() puts its PING on the wire ahead of the SUB
    # still in its pending buffer, so its PONG says nothing about the subscription.
    seen = await _subscribe_then(recorder, lambda nc: nc.flush())
    assert seen[0] == "PING"


@pytest.mark.unit
async def test_a_closed_connection_fails_instead_of_waiting(recorder: Recorder) -> None:
    nc = NatsClient()
    await nc.connect(f"nats://127.0.0.1:{recorder.port}", allow_reconnect=False, connect_timeout=2)
    await nc.close()
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(flush_in_order(nc, timeout_s=1.0), 5.0)
