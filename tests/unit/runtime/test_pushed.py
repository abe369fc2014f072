"""Handlers that push their payloads (`Pushed`): natively on the TCP server, through `pulled` on the
others; the stream, its errors and its cancellation behave as with a generator handler."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.unit.runtime.plane_helpers import Echo, collect, enc
from turbine.errors import EngineError, InvalidRequest
from turbine.runtime.transport.base import Emit, Pushed, RequestPlaneClient, RequestPlaneServer, pulled
from turbine.runtime.transport.http import HttpRequestClient, HttpRequestServer
from turbine.runtime.transport.tcp import TcpRequestClient, TcpRequestServer

pytestmark = pytest.mark.integration

Plane = tuple[RequestPlaneServer, RequestPlaneClient, str, Echo]


@pytest.fixture(params=["tcp", "http"])
async def plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    echo = Echo()
    server: RequestPlaneServer
    client: RequestPlaneClient
    if request.param == "tcp":
        server, client = TcpRequestServer(), TcpRequestClient()
    else:
        server, client = HttpRequestServer(), HttpRequestClient()
    address = await server.start(echo.pushed)
    try:
        yield server, client, address, echo
    finally:
        await client.close()
        await server.stop()


async def test_pushed_streams_arrive_whole_and_in_order(plane: Plane) -> None:
    _, client, address, echo = plane
    results = await asyncio.gather(*(collect(client, address, "gen", enc(n)) for n in range(20)))
    for n, chunks in enumerate(results):
        assert chunks == [enc(i) for i in range(n)]
    assert len(echo.finished) == 20


async def test_pushed_errors_map_onto_the_error_tree(plane: Plane) -> None:
    _, client, address, _ = plane
    with pytest.raises(EngineError, match="engine exploded"):
        await collect(client, address, "fail", enc(1))
    with pytest.raises(InvalidRequest, match="bad payload"):
        await collect(client, address, "bad", enc(1))
    assert await collect(client, address, "gen", enc(2)) == [enc(0), enc(1)]


async def test_leaving_a_pushed_stream_early_cancels_its_source(plane: Plane) -> None:
    server, client, address, echo = plane
    stream = client.stream(address, "slow", enc(100000))
    async for _batch in stream:
        break
    await stream.aclose()
    for _ in range(300):
        if echo.cancelled and server.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert echo.cancelled == [enc(100000)]
    assert server.active_streams == 0


def _source(items: list[bytes], then: Callable[[], Awaitable[None]] | None = None) -> Pushed:
    async def run(emit: Emit) -> None:
        for item in items:
            emit(item)
            await asyncio.sleep(0)
        if then is not None:
            await then()

    return Pushed(run)


async def test_pulled_yields_what_was_emitted_then_raises_what_the_source_raised() -> None:
    assert [x async for x in pulled(_source([b"a", b"b", b"c"]))] == [b"a", b"b", b"c"]

    async def boom() -> None:
        raise RuntimeError("late failure")

    got: list[bytes] = []
    with pytest.raises(RuntimeError, match="late failure"):
        async for x in pulled(_source([b"a"], boom)):
            got.append(x)
    assert got == [b"a"]


async def test_closing_pulled_early_cancels_the_source() -> None:
    cancelled = asyncio.Event()

    async def run(emit: Emit) -> None:
        try:
            emit(b"a")
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    gen = pulled(Pushed(run))
    assert await gen.__anext__() == b"a"
    await gen.aclose()
    await asyncio.wait_for(cancelled.wait(), 2)
