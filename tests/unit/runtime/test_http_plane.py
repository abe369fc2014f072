"""The HTTP request plane over real loopback sockets, in one process (same contract as TCP)."""

import asyncio

import pytest

from tests.unit.runtime.test_tcp_plane import _Echo, _enc
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
from turbine.runtime.transport.http import HttpRequestClient, HttpRequestServer

pytestmark = pytest.mark.integration


async def _collect(client: HttpRequestClient, address: str, endpoint: str, payload: bytes) -> list[bytes]:
    return [chunk async for batch in client.stream(address, endpoint, payload) for chunk in batch]


async def test_concurrent_streams_and_error_mapping() -> None:
    echo = _Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        results = await asyncio.gather(*(_collect(client, address, "gen", _enc(n)) for n in range(20)))
        for n, chunks in enumerate(results):
            assert chunks == [_enc(i) for i in range(n)]
        with pytest.raises(EngineError, match="engine exploded"):
            await _collect(client, address, "fail", _enc(1))
        with pytest.raises(InvalidRequest, match="bad payload"):
            await _collect(client, address, "bad", _enc(1))
    finally:
        await client.close()
        await server.stop()


async def test_leaving_early_cancels_at_the_server() -> None:
    echo = _Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        stream = client.stream(address, "slow", _enc(100000))
        async for _batch in stream:
            break
        await stream.aclose()
        for _ in range(300):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [_enc(100000)]
        assert await server.wait_idle(2.0)
    finally:
        await client.close()
        await server.stop()


async def test_unreachable_and_draining() -> None:
    echo = _Echo()
    server = HttpRequestServer()
    address = await server.start(echo.handler)
    client = HttpRequestClient()
    try:
        running = asyncio.create_task(_collect(client, address, "slow", _enc(50)))
        await asyncio.sleep(0.02)
        server.drain()
        with pytest.raises(WorkerDraining):
            await _collect(client, address, "gen", _enc(1))
        assert len(await running) == 50
        await server.stop()
        with pytest.raises(WorkerUnreachable):
            await _collect(client, address, "gen", _enc(1))
    finally:
        await client.close()
        await server.stop()
