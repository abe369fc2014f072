"""The HTTP request plane over real loopback sockets, in one process (same contract as TCP)."""

import asyncio

import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
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
        await asyncio.sleep(0.02)
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
