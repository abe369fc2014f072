"""The TCP request plane's heartbeats, over real loopback sockets: silence past the stall timeout
fails a worker's streams (frontend side) or stops a frontend's requests (worker side); a quiet but
live peer is never cut; `abandon` and `probe`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import msgspec
import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from turbine.errors import WorkerStalled, WorkerUnreachable
from turbine.runtime.transport import framing
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer

pytestmark = pytest.mark.integration

STALL_S = 1.0


async def _silent_server() -> tuple[asyncio.Server, str]:
    """A process that accepts connections and never says anything (as a frozen one does)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"{host}:{port}"


async def _quiet(_: str, payload: bytes) -> AsyncGenerator[bytes, None]:
    """Says nothing for `payload` seconds (a request queued behind others), then one payload."""
    await asyncio.sleep(msgspec.msgpack.decode(payload))
    yield enc(1)


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 10 s")


@pytest.fixture
async def silent() -> AsyncIterator[str]:
    server, address = await _silent_server()
    try:
        yield address
    finally:
        server.close()


async def test_a_silent_worker_fails_the_streams_with_worker_stalled(silent: str) -> None:
    client = TcpRequestClient(stall_timeout_s=STALL_S)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(WorkerStalled, match="went silent"):
                await collect(client, silent, "gen", enc(3))
    finally:
        await client.close()


async def test_a_quiet_live_worker_is_not_cut() -> None:
    server = TcpRequestServer(stall_timeout_s=STALL_S)
    address = await server.start(_quiet)
    client = TcpRequestClient(stall_timeout_s=STALL_S)
    try:
        assert await collect(client, address, "gen", msgspec.msgpack.encode(STALL_S * 1.6)) == [enc(1)]
    finally:
        await client.close()
        await server.stop()


async def test_probe_tells_a_live_worker_from_a_silent_one(silent: str) -> None:
    server = TcpRequestServer()
    address = await server.start(Echo().handler)
    client = TcpRequestClient(stall_timeout_s=STALL_S)
    try:
        assert await client.probe(address, STALL_S)
        assert not await client.probe(silent, STALL_S)
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]  # still usable
    finally:
        await client.close()
        await server.stop()


async def test_abandon_fails_open_streams_and_cancels_them_at_the_worker() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        stream = client.stream(address, "slow", enc(100000))
        await anext(stream)
        assert client.abandon(address, WorkerUnreachable("worker x left discovery")) == 1
        with pytest.raises(WorkerUnreachable, match="left discovery"):
            async for _ in stream:
                pass
        await _until(lambda: bool(echo.cancelled))
        assert client.abandon(address, WorkerUnreachable("again")) == 0
    finally:
        await client.close()
        await server.stop()


async def test_a_worker_stops_the_requests_of_a_frontend_gone_silent() -> None:
    echo = Echo()
    server = TcpRequestServer(stall_timeout_s=STALL_S)
    address = await server.start(echo.handler)
    host, _, port = address.rpartition(":")
    # A frontend that pings once, asks for a long stream, then freezes (never reads nor writes).
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(framing.encode_frame(framing.Ping()))
    writer.write(framing.encode_frame(framing.Request(1, "slow", msgspec.Raw(enc(10**9)))))
    try:
        await _until(lambda: bool(echo.cancelled))
        # The handler sees its cancellation before the server's task for it ends.
        await _until(lambda: server.active_streams == 0)
    finally:
        writer.close()
        await server.stop()


async def test_a_client_that_never_pings_is_not_judged_by_its_silence() -> None:
    server = TcpRequestServer(stall_timeout_s=STALL_S)
    address = await server.start(_quiet)
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        framing.encode_frame(framing.Request(1, "gen", msgspec.Raw(msgspec.msgpack.encode(STALL_S * 1.6))))
    )
    decoder = framing.FrameDecoder()
    frames: list[framing.Frame] = []
    try:
        async with asyncio.timeout(10):
            while not any(type(f) is framing.End for f in frames):
                frames += decoder.feed(await reader.read(4096))
        assert [f for f in frames if type(f) is framing.Data] == [framing.Data(1, msgspec.Raw(enc(1)))]
    finally:
        writer.close()
        await server.stop()
