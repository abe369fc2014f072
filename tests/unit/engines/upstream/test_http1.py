"""The sidecar's HTTP/1.1 client (`UpstreamClient.stream_completion` over `http1.py`) against a raw
loopback server that answers each request with scripted bytes, written in pieces that split lines
and chunk headers anywhere: SSE parsing, keep-alive reuse, a stale pooled connection, error
statuses, a body delimited by the close, a stream cut short, and an abandoned stream closing its
connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.waiting import wait_for
from turbine.engines.upstream.client import UpstreamClient
from turbine.errors import UpstreamUnavailable

pytestmark = pytest.mark.integration


@dataclass
class Reply:
    pieces: list[bytes]  # written one by one, with a pause between them
    close: bool = False  # close the connection after it (without saying so in a header)
    hang: bool = False  # keep the connection open after the pieces, sending nothing more


@dataclass
class Scripted:
    replies: list[Reply]
    connections: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode()
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                length = next(
                    int(line.split(":")[1])
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length")
                )
                self.bodies.append(json.loads(await reader.readexactly(length)))
                reply = self.replies.pop(0)
                for piece in reply.pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)  # the pieces arrive apart, as from a real server
                if reply.hang:
                    await reader.read()  # until the client closes
                    self.closed_by_client.set()
                    return
                if reply.close:
                    return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def client_for(server: Scripted, **kwargs: Any) -> AsyncIterator[UpstreamClient]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(f"http://127.0.0.1:{port}/v1", session, **kwargs)
        try:
            yield client
        finally:
            client.close()
            listener.close()


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\r\n\r\n"
        for e in events
    )


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, at = b"", 0
    for size in [*sizes, len(body)]:
        part = body[at : at + size]
        at += len(part)
        if part:
            out += b"%x;ext=1\r\n" % len(part) + part + b"\r\n"
    return out + b"0\r\n\r\n"


def split(data: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS: list[dict[str, Any]] = [
    {"choices": [{"text": "a", "finish_reason": None}]},
    {"choices": [{"text": "b", "finish_reason": "stop"}]},
]


def stream_reply(close: bool = False) -> Reply:
    body = b": ping\r\n\r\n" + sse(*EVENTS, "[DONE]")  # a comment line too (keep-alives)
    # Chunks of 7 and 30 bytes split the `data:` lines; the pieces split the chunk headers.
    wire = HEAD + chunked(body, [7, 30])
    return Reply(split(wire, 5, len(HEAD) + 2, len(HEAD) + 13, len(wire) - 3), close=close)


async def events(client: UpstreamClient) -> list[dict[str, Any]]:
    return [e async for e in client.stream_completion({"model": "m", "prompt": "hi", "stream": True})]


async def test_events_split_anywhere_arrive_whole_and_the_connection_is_kept() -> None:
    server = Scripted([stream_reply(), stream_reply(), stream_reply()])
    async with client_for(server, api_key="k", dp_rank=1) as client:
        for _ in range(3):
            assert await events(client) == EVENTS
    assert server.connections == 1
    head = server.heads[0]
    assert head.startswith("POST /v1/completions HTTP/1.1\r\n")
    assert "Authorization: Bearer k" in head and "X-data-parallel-rank: 1" in head
    assert server.bodies[0] == {"model": "m", "prompt": "hi", "stream": True}


async def test_a_pooled_connection_the_server_closed_is_replaced() -> None:
    # The server drops the connection after each answer (as a keep-alive timeout would).
    server = Scripted([stream_reply(close=True), stream_reply(close=True)])
    async with client_for(server) as client:
        assert await events(client) == EVENTS
        pool = client._pool
        assert pool is not None
        await wait_for(lambda: not any(c.reusable for c in pool._idle))  # the client has seen the close
        assert await events(client) == EVENTS
    assert server.connections == 2


async def test_a_request_the_server_drops_unanswered_on_a_reused_connection_is_sent_again() -> None:
    # The race a keep-alive timeout makes: the server closes just as the request arrives.
    server = Scripted([stream_reply(), Reply([], close=True), stream_reply()])
    async with client_for(server) as client:
        assert await events(client) == EVENTS
        assert await events(client) == EVENTS
    assert server.connections == 2 and len(server.bodies) == 3


async def test_error_statuses() -> None:
    bad = b'{"error": "no such model"}'
    server = Scripted(
        [
            Reply([b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(bad) + bad]),
            Reply([b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"]),
        ]
    )
    async with client_for(server) as client:
        got = await events(client)
        assert got == [{"error": {"message": f"upstream answered 400: {bad.decode()}"}}]
        with pytest.raises(UpstreamUnavailable, match="answered 503: busy"):
            await events(client)
    assert server.connections == 1  # a whole answer leaves the connection usable


async def test_a_body_delimited_by_the_close() -> None:
    wire = b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + sse(*EVENTS, "[DONE]")
    server = Scripted([Reply(split(wire, 60, 90), close=True), stream_reply()])
    async with client_for(server) as client:
        assert await events(client) == EVENTS
        assert await events(client) == EVENTS
    assert server.connections == 2


async def test_a_stream_cut_short_is_retriable() -> None:
    wire = HEAD + chunked(sse(EVENTS[0]), [])[:-5]  # the first event, not the end
    server = Scripted([Reply([wire], close=True)])
    async with client_for(server) as client:
        got: list[dict[str, Any]] = []
        with pytest.raises(UpstreamUnavailable) as info:
            async for event in client.stream_completion({"model": "m", "prompt": "hi"}):
                got.append(event)
        assert info.value.retriable and got == EVENTS[:1]


async def test_leaving_a_stream_early_closes_its_connection() -> None:
    wire = HEAD + b"%x\r\n" % len(sse(EVENTS[0])) + sse(EVENTS[0]) + b"\r\n"
    server = Scripted([Reply([wire], hang=True), stream_reply()])
    async with client_for(server) as client:
        async with contextlib.aclosing(client.stream_completion({"model": "m", "prompt": "hi"})) as stream:
            assert await anext(stream) == EVENTS[0]
        # The server learns the client went away (servers abort the request then).
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        assert await events(client) == EVENTS  # on a new connection
    assert server.connections == 2


async def test_refused_connection_is_retriable() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(f"http://127.0.0.1:{port}", session)
        with pytest.raises(UpstreamUnavailable) as info:
            await events(client)
        assert info.value.retriable
