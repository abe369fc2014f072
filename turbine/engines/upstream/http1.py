"""A small HTTP/1.1 client for the sidecar's hot path: streamed POSTs to one upstream server.

aiohttp's client was a large share of the time the sidecar added per request (its request
object, timers, per-line `readline` futures); the upstream is one known server on a trusted
network, so a plain protocol does: keep-alive connections kept per server (TCP_NODELAY on, so
a request is never held back by Nagle), one write per request, and a response parser that hands
over the body as it arrives (chunked, Content-Length, or until close).

A connection goes back to the pool only after its response was read to the end; one abandoned
mid-body (the client went away) is closed, which is how servers learn to abort the request. A
request whose reused connection turns out closed before any answer (the server's keep-alive
timeout raced us) is sent once more on a new connection. The slow, rare calls (model info,
/metrics, the probe) stay on aiohttp.

The pool knows the requests in flight: `silence()` says how long none of them heard a byte from
the server, and `abort_busy()` cuts them all (a hung server, found by the engine's stall check).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator
from typing import cast

CONNECT_TIMEOUT_S = 10.0
_MAX_HEAD = 64 << 10


class HttpError(OSError):
    """The connection failed, or the server broke the protocol."""


class Response:
    """Status, headers (lower-case names) and the body as it arrives."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done, self._error = True, error
            self._wake()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (boundaries are the network's, not the server's events)."""
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    @property
    def complete(self) -> bool:
        """The whole body arrived without error."""
        return self._done and self._error is None and not self._chunks


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.received = False  # any byte of an answer to the current request
        self.fresh = True  # a byte (or a new request) since the pool's last `silence()` look
        self._buf = bytearray()
        self._state = "idle"  # idle | head | chunk-size | chunk-data | chunk-end | trailer | length | close
        self._left = 0
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self._state == "idle"
        self._head = asyncio.get_running_loop().create_future()
        self._state, self.received, self.fresh = "head", False, True
        self.transport.write(data)
        return self._head

    def data_received(self, data: bytes) -> None:
        self.received = self.fresh = True
        self._buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(HttpError(f"malformed HTTP response: {exc}"))
            self.abort()

    def _parse(self) -> None:
        buf = self._buf
        while buf:
            state = self._state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("header section too long")
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                version, status = lines[0].split(" ", 2)[:2]
                code = int(status)
                if 100 <= code < 200:
                    continue  # an interim answer: the real one follows
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                conn = headers.get("connection", "").lower()
                self.keep_alive = (version == "HTTP/1.1" and conn != "close") or conn == "keep-alive"
                self._response = response = Response(code, headers)
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    self._state = "chunk-size"
                elif "content-length" in headers:
                    self._left = int(headers["content-length"])
                    self._state = "length"
                elif code in (204, 304):
                    self._left, self._state = 0, "length"
                else:
                    self._state, self.keep_alive = "close", False
                if self._head is not None and not self._head.done():
                    self._head.set_result(response)
                if self._state == "length" and not self._left:
                    self._end()
            elif state == "chunk-size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                self._left, self._state = size, "chunk-data" if size else "trailer"
            elif state == "chunk-data" or state == "length":
                take = bytes(buf[: self._left])
                del buf[: len(take)]
                self._left -= len(take)
                assert self._response is not None
                self._response._feed(take)
                if not self._left:
                    if state == "length":
                        self._end()
                    else:
                        self._state = "chunk-end"
            elif state == "chunk-end":
                if len(buf) < 2:
                    return
                del buf[:2]
                self._state = "chunk-size"
            elif state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:  # the empty line after the (usually absent) trailers
                    self._end()
            elif state == "close":
                assert self._response is not None
                self._response._feed(bytes(buf))
                buf.clear()
            else:  # bytes nobody asked for: the connection cannot be trusted
                raise ValueError("data after the response")

    def _end(self) -> None:
        self._state = "idle"
        if self._response is not None:
            self._response._finish()
            self._response = None

    def _fail(self, error: BaseException) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._response is not None:
            self._response._finish(error)
            self._response = None

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == "close" and self._response is not None:
            self._end()  # a body delimited by the close
        else:
            self._fail(HttpError(f"connection closed: {exc}" if exc else "connection closed by the server"))

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self._state == "idle"

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Http1Pool:
    """Keep-alive connections to one server (`host`, `port`); streams may run concurrently."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()  # sent a request, not yet released
        self._heard_at = 0.0

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except TimeoutError:
            raise HttpError(f"connecting to {self.host}:{self.port} timed out") from None
        return conn

    async def request(self, head: bytes, body: bytes) -> tuple[Response, _Connection]:
        """Send one request (`head`: request line and headers, up to the blank line); the
        response once its headers arrived, and the connection to `release` when done with it."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.reusable:
                continue
            self._busy.add(conn)
            try:
                return await conn.send(head + body), conn
            except HttpError:
                self._busy.discard(conn)
                if conn.received:
                    raise  # the server answered something: not a stale connection
                conn.abort()  # closed by the server while idle: try the next, or a new one
            except BaseException:
                self._busy.discard(conn)
                conn.abort()
                raise
        conn = await self._connect()
        self._busy.add(conn)
        try:
            return await conn.send(head + body), conn
        except BaseException:
            self._busy.discard(conn)
            conn.abort()
            raise

    def release(self, conn: _Connection, response: Response) -> None:
        """Pool the connection if its response was read to the end, else close it (which tells
        the server to stop working on the request)."""
        self._busy.discard(conn)
        if response.complete and conn.reusable:
            self._idle.append(conn)
        else:
            conn.abort()

    def silence(self, now: float) -> float:
        """Seconds since a request in flight last heard from the server (0 when none is)."""
        heard = not self._busy
        for conn in self._busy:
            if conn.fresh:
                heard, conn.fresh = True, False
        if heard:
            self._heard_at = now
        return now - self._heard_at

    def abort_busy(self) -> int:
        """Cut every request in flight (their responses fail); how many there were."""
        busy = list(self._busy)
        self._busy.clear()
        for conn in busy:
            conn.abort()
        return len(busy)

    def close(self) -> None:
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
