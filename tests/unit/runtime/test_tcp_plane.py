"""The TCP request plane over real loopback sockets, in one process."""

import asyncio

import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from tests.waiting import wait_for
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
from turbine.runtime.transport.base import CallbackClient
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer

pytestmark = pytest.mark.integration


async def test_many_concurrent_streams_share_one_connection() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        results = await asyncio.gather(*(collect(client, address, "gen", enc(n)) for n in range(50)))
        for n, chunks in enumerate(results):
            assert chunks == [enc(i) for i in range(n)]
        assert len(client._connections) == 1
    finally:
        await client.close()
        await server.stop()


async def test_errors_map_onto_the_error_tree() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        with pytest.raises(EngineError, match="engine exploded"):
            await collect(client, address, "fail", enc(1))
        with pytest.raises(InvalidRequest, match="bad payload"):
            await collect(client, address, "bad", enc(1))
        # The connection survives stream errors.
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]
    finally:
        await client.close()
        await server.stop()


async def test_leaving_early_cancels_at_the_server() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        stream = client.stream(address, "slow", enc(100000))
        async for _chunk in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [enc(100000)]
        assert server.active_streams == 0
    finally:
        await client.close()
        await server.stop()


async def test_unreachable_worker_is_retriable() -> None:
    server = TcpRequestServer()
    address = await server.start(Echo().handler)
    await server.stop()
    client = TcpRequestClient()
    with pytest.raises(WorkerUnreachable) as info:
        await collect(client, address, "gen", enc(1))
    assert info.value.retriable
    await client.close()


async def test_dropped_connection_fails_every_open_stream() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        tasks = [asyncio.create_task(collect(client, address, "slow", enc(100000))) for _ in range(5)]
        await wait_for(lambda: server.active_streams == 5)
        await server.stop()
        for task in tasks:
            with pytest.raises(WorkerUnreachable):
                await task
    finally:
        await client.close()


async def test_draining_server_refuses_new_streams_but_finishes_running_ones() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        running = asyncio.create_task(collect(client, address, "slow", enc(50)))
        await wait_for(lambda: server.active_streams == 1)
        server.drain()
        with pytest.raises(WorkerDraining):
            await collect(client, address, "gen", enc(1))
        assert len(await running) == 50
    finally:
        await client.close()
        await server.stop()


async def test_forget_waits_for_open_streams_to_end() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        running = asyncio.create_task(collect(client, address, "slow", enc(30)))
        await wait_for(lambda: server.active_streams == 1)
        client.forget(address)
        assert len(await running) == 30
        # A new stream opens a fresh connection.
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]
    finally:
        await client.close()
        await server.stop()


async def test_follow_hands_payloads_to_the_callback_in_order() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        assert isinstance(client, CallbackClient)
        got: list[bytes] = []
        await client.follow(address, "gen", enc(300), got.append)
        assert got == [enc(i) for i in range(300)]
        with pytest.raises(EngineError, match="engine exploded"):
            await client.follow(address, "fail", enc(1), got.append)
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]  # the connection lives
        assert client._connections[address].streams == {}
    finally:
        await client.close()
        await server.stop()


async def test_a_failing_callback_ends_the_stream_and_cancels_it_at_the_server() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()

    def refuse(payload: bytes) -> None:
        raise ValueError("cannot take it")

    try:
        with pytest.raises(ValueError, match="cannot take it"):
            await client.follow(address, "slow", enc(100000), refuse)
        for _ in range(200):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [enc(100000)]
    finally:
        await client.close()
        await server.stop()


async def test_follow_fails_when_the_connection_drops() -> None:
    echo = Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        got: list[bytes] = []
        task = asyncio.create_task(client.follow(address, "slow", enc(100000), got.append))
        await wait_for(lambda: got)
        await server.stop()
        with pytest.raises(WorkerUnreachable):
            await task
        assert got
    finally:
        await client.close()
