"""Event streams of every API: each chunk written as it comes, and a failure after the headers
ends the stream with the API's error event instead of a status."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from turbine.errors import ServiceUnavailable, TurbineError
from turbine.frontend.sse import send_events

pytestmark = pytest.mark.unit


async def _events(fail: bool, closed: list[bool]) -> AsyncGenerator[bytes, None]:
    try:
        yield b"data: 1\n\n"
        yield b""  # nothing to send for this delta
        yield b"data: 2\n\n"
        if fail:
            raise ServiceUnavailable("worker gone")
        yield b"data: [DONE]\n\n"
    finally:
        closed.append(True)


def _error(exc: TurbineError) -> bytes:
    return f"event: error\ndata: {exc.message}\n\n".encode()


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient[Any, Any], list[bool]]]:
    """A client of one route streaming `_events` (`?fail=1`: failing), and the record of their closes."""
    closed: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        events = _events(request.query.get("fail") == "1", closed)
        return await send_events(request, events, _error, "s-1", {"x-turbine-worker": "a"})

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        yield client, closed


async def test_every_chunk_goes_out_with_the_event_stream_headers(
    served: tuple[TestClient[Any, Any], list[bool]],
) -> None:
    client, closed = served
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["x-turbine-worker"] == "a"
    assert await resp.read() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert closed == [True]


async def test_a_failure_after_the_headers_ends_the_stream_with_the_error_event(
    served: tuple[TestClient[Any, Any], list[bool]], caplog: pytest.LogCaptureFixture
) -> None:
    client, closed = served
    resp = await client.get("/?fail=1")
    assert resp.status == 200
    assert await resp.read() == b"data: 1\n\ndata: 2\n\nevent: error\ndata: worker gone\n\n"
    assert closed == [True]
    assert "stream s-1 failed: worker gone" in caplog.text
