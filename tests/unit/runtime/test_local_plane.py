"""The request plane's short cut for a process's own workers (`LocalPlane` over the TCP plane): the
process's streams skip the socket while other processes still reach the worker over TCP; errors,
draining and leaving early behave as over the wire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from turbine.errors import EngineError, InvalidRequest, UpstreamUnavailable, WorkerDraining
from turbine.runtime.transport.local import LocalFirstClient, LocalPlane, LocalServer
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer

pytestmark = pytest.mark.integration


class Handler(Echo):
    """Echo, plus "gone" (an upstream that went away: retriable) and "hold" (two payloads, then
    waits for `release`), noting when a stream's generator was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.closed = 0

    async def handler(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        try:
            if endpoint == "gone":
                raise UpstreamUnavailable("upstream http://x went away")
            if endpoint == "hold":
                yield enc(0)
                yield enc(1)
                await self.release.wait()
                return
            async for out in super().handler(endpoint, payload):
                yield out
        finally:
            self.closed += 1


@dataclass
class Served:
    handler: Handler
    server: LocalServer
    address: str
    client: LocalFirstClient
    """The plane's client (the short cut)."""


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """A worker served through a LocalPlane, and that plane's client."""
    plane = LocalPlane()
    handler = Handler()
    server = plane.server(TcpRequestServer())
    address = await server.start(handler.handler)
    client = plane.client(TcpRequestClient())
    try:
        yield Served(handler, server, address, client)
    finally:
        await client.close()
        await server.stop()


async def test_own_streams_skip_the_socket_and_others_still_use_it() -> None:
    plane = LocalPlane()
    handler = Handler()
    server = plane.server(TcpRequestServer())
    address = await server.start(handler.handler)
    tcp = TcpRequestClient()
    client = plane.client(tcp)
    remote = TcpRequestClient()
    try:
        assert await collect(client, address, "gen", enc(3)) == [enc(0), enc(1), enc(2)]
        assert not tcp._connections  # the plane's client was never asked
        assert await collect(remote, address, "gen", enc(2)) == [enc(0), enc(1)]
        assert len(remote._connections) == 1
    finally:
        await client.close()
        await remote.close()
        await server.stop()
    assert plane.find(address) is None


async def test_errors_map_as_over_the_wire(served: Served) -> None:
    client, address = served.client, served.address
    with pytest.raises(EngineError, match="engine exploded"):
        await collect(client, address, "fail", enc(1))
    with pytest.raises(InvalidRequest, match="bad payload"):
        await collect(client, address, "bad", enc(1))
    with pytest.raises(WorkerDraining, match="went away") as info:
        await collect(client, address, "gone", enc(1))
    assert info.value.retriable  # the frontend tries another worker, or migrates


async def test_draining_counts_waits_for_and_refuses_local_streams(served: Served) -> None:
    client, address, server = served.client, served.address, served.server
    stream = client.stream(address, "hold", b"")
    assert await anext(stream) == [enc(0)]
    assert server.active_streams == 1
    server.drain()
    with pytest.raises(WorkerDraining):
        await collect(client, address, "gen", enc(1))
    assert not await server.wait_idle(0.05)
    served.handler.release.set()
    assert [batch async for batch in stream] == [[enc(1)]]
    assert await server.wait_idle(1.0) and server.active_streams == 0


async def test_leaving_early_closes_the_handlers_generator(served: Served) -> None:
    stream = served.client.stream(served.address, "hold", b"")
    assert await anext(stream) == [enc(0)]
    await stream.aclose()
    assert served.handler.closed == 1 and served.server.active_streams == 0
