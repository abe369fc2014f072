"""The TCP request plane over real loopback sockets, in one process."""

import asyncio
from collections.abc import AsyncGenerator

import msgspec
import pytest

from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer

pytestmark = pytest.mark.integration


def _enc(n: int) -> bytes:
    return msgspec.msgpack.encode(n)


class _Echo:
    def __init__(self) -> None:
        self.cancelled: list[bytes] = []
        self.finished: list[bytes] = []

    async def handler(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        if endpoint == "fail":
            raise RuntimeError("engine exploded")
        if endpoint == "bad":
            raise InvalidRequest("bad payload")
        try:
            for i in range(msgspec.msgpack.decode(payload)):
                yield _enc(i)
                await asyncio.sleep(0.001 if endpoint == "slow" else 0)
            self.finished.append(payload)
        except asyncio.CancelledError:
            self.cancelled.append(payload)
            raise


async def _collect(client: TcpRequestClient, address: str, endpoint: str, payload: bytes) -> list[bytes]:
    return [chunk async for batch in client.stream(address, endpoint, payload) for chunk in batch]


async def test_many_concurrent_streams_share_one_connection() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        results = await asyncio.gather(*(_collect(client, address, "gen", _enc(n)) for n in range(50)))
        for n, chunks in enumerate(results):
            assert chunks == [_enc(i) for i in range(n)]
        assert len(client._connections) == 1
    finally:
        await client.close()
        await server.stop()


async def test_errors_map_onto_the_error_tree() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        with pytest.raises(EngineError, match="engine exploded"):
            await _collect(client, address, "fail", _enc(1))
        with pytest.raises(InvalidRequest, match="bad payload"):
            await _collect(client, address, "bad", _enc(1))
        # The connection survives stream errors.
        assert await _collect(client, address, "gen", _enc(2)) == [_enc(0), _enc(1)]
    finally:
        await client.close()
        await server.stop()


async def test_leaving_early_cancels_at_the_server() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        stream = client.stream(address, "slow", _enc(100000))
        async for _chunk in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if echo.cancelled:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [_enc(100000)]
        assert server.active_streams == 0
    finally:
        await client.close()
        await server.stop()


async def test_unreachable_worker_is_retriable() -> None:
    server = TcpRequestServer()
    address = await server.start(_Echo().handler)
    await server.stop()
    client = TcpRequestClient()
    with pytest.raises(WorkerUnreachable) as info:
        await _collect(client, address, "gen", _enc(1))
    assert info.value.retriable
    await client.close()


async def test_dropped_connection_fails_every_open_stream() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        tasks = [asyncio.create_task(_collect(client, address, "slow", _enc(100000))) for _ in range(5)]
        await asyncio.sleep(0.05)
        await server.stop()
        for task in tasks:
            with pytest.raises(WorkerUnreachable):
                await task
    finally:
        await client.close()


async def test_draining_server_refuses_new_streams_but_finishes_running_ones() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        running = asyncio.create_task(_collect(client, address, "slow", _enc(50)))
        await asyncio.sleep(0.01)
        server.drain()
        with pytest.raises(WorkerDraining):
            await _collect(client, address, "gen", _enc(1))
        assert len(await running) == 50
    finally:
        await client.close()
        await server.stop()


async def test_forget_waits_for_open_streams_to_end() -> None:
    echo = _Echo()
    server = TcpRequestServer()
    address = await server.start(echo.handler)
    client = TcpRequestClient()
    try:
        running = asyncio.create_task(_collect(client, address, "slow", _enc(30)))
        await asyncio.sleep(0.01)
        client.forget(address)
        assert len(await running) == 30
        # A new stream opens a fresh connection.
        assert await _collect(client, address, "gen", _enc(2)) == [_enc(0), _enc(1)]
    finally:
        await client.close()
        await server.stop()
