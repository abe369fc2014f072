"""The HTTP request plane over real loopback sockets, in one process (same contract as TCP)."""

import asyncio
from collections.abc import AsyncGenerator

import msgspec
import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from tests.waiting import wait_for
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerStalled, WorkerUnreachable
from turbine.runtime.transport import framing
from turbine.runtime.transport.http import HttpRequestClient, HttpRequestServer

pytestmark = pytest.mark.integration


async def test_concurrent_streams_and_error_mapping() -> None:
    echo = Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        results = await asyncio.gather(*(collect(client, address, "gen", enc(n)) for n in range(20)))
        for n, chunks in enumerate(results):
            assert chunks == [enc(i) for i in range(n)]
        with pytest.raises(EngineError, match="engine exploded"):
            await collect(client, address, "fail", enc(1))
        with pytest.raises(InvalidRequest, match="bad payload"):
            await collect(client, address, "bad", enc(1))
    finally:
        await client.close()
        await server.stop()


async def test_leaving_early_cancels_at_the_server() -> None:
    echo = Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        stream = client.stream(address, "slow", enc(100000))
        async for _batch in stream:
            break
        await stream.aclose()
        for _ in range(300):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [enc(100000)]
        assert await server.wait_idle(2.0)
    finally:
        await client.close()
        await server.stop()


async def test_unreachable_and_draining() -> None:
    echo = Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        running = asyncio.create_task(collect(client, address, "slow", enc(50)))
        await wait_for(lambda: server.active_streams == 1)
        server.drain()
        with pytest.raises(WorkerDraining):
            await collect(client, address, "gen", enc(1))
        assert len(await running) == 50
        await server.stop()
        with pytest.raises(WorkerUnreachable):
            await collect(client, address, "gen", enc(1))
    finally:
        await client.close()
        await server.stop()


async def _silent_frontend(address: str, payload: bytes) -> asyncio.StreamWriter:
    """A frontend that sends its request's payload frame and then freezes: the body stays open,
    no beats follow, nothing is read."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    frame = framing.encode_frame(framing.Data(1, msgspec.Raw(payload)))
    head = f"POST /slow HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(head.encode() + f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
    await writer.drain()
    return writer


async def test_a_silent_frontends_request_is_stopped_after_the_stall_timeout() -> None:
    echo = Echo()
    server = HttpRequestServer(stall_timeout_s=1.0)
    address = await server.start(echo.handler)
    client = HttpRequestClient(stall_timeout_s=1.0)
    writer = await _silent_frontend(address, enc(10**7))
    try:
        for _ in range(1000):
            if server.active_streams:
                break
            await asyncio.sleep(0.01)
        assert server.active_streams == 1
        # A live client is served meanwhile.
        assert await collect(client, address, "gen", enc(3)) == [enc(i) for i in range(3)]
        assert await server.wait_idle(10.0)
        assert echo.cancelled == [enc(10**7)]
    finally:
        writer.close()
        await client.close()
        await server.stop()


async def test_a_live_client_is_not_cut_by_a_request_that_outlasts_the_stall_timeout() -> None:
    """The client's beats hold a request whose handler says nothing for longer than the timeout."""
    stopped: list[bytes] = []

    async def quiet(endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        try:
            await asyncio.sleep(1.6)  # silent for longer than the stall timeout: what is tested
            yield payload
        except asyncio.CancelledError:
            stopped.append(payload)
            raise

    server = HttpRequestServer(stall_timeout_s=1.0)
    address = await server.start(quiet)
    client = HttpRequestClient(stall_timeout_s=1.0)
    try:
        assert await collect(client, address, "quiet", enc(7)) == [enc(7)]
        assert stopped == []
    finally:
        await client.close()
        await server.stop()


async def test_a_worker_that_accepts_and_never_answers_is_stalled() -> None:
    """A frozen worker's kernel still accepts the connection; the request body stays open, so the
    wait for the response's headers is what the stall timeout bounds."""
    accepted: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    mute_server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = mute_server.sockets[0].getsockname()[1]
    client = HttpRequestClient(stall_timeout_s=1.0)
    try:
        with pytest.raises(WorkerStalled):
            await collect(client, f"http://127.0.0.1:{port}", "gen", enc(1))
        assert accepted
    finally:
        await client.close()
        for writer in accepted:
            writer.close()
        mute_server.close()
        await mute_server.wait_closed()
