"""The TCP request plane: one multiplexed connection per (frontend, worker) pair.

Both ends are `asyncio.Protocol`s rather than streams: frames produced in the same event-loop
iteration (many token deltas of a batch step) are coalesced into one socket write, which is most of
the plane's cost at high token rates. asyncio and uvloop set TCP_NODELAY on TCP sockets, so a
lone frame is never held back by Nagle.

With TLS (`--tcp-tls-*`, contexts from tls.py) the same protocols run over asyncio's TLS transport;
the worker's server context may require client certificates (mTLS).

Liveness (heartbeat.py): both ends send a Ping every 0.25 s, the worker also at once on a new
connection. A frontend that hears nothing from a worker for `stall_timeout_s` fails every stream on
that connection with `WorkerStalled` and drops it; a worker that hears nothing from a frontend
(that has shown it sends Pings) for its own `stall_timeout_s` drops the connection, which cancels
the requests it was serving for it and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, cast

import msgspec

from turbine.errors import WorkerStalled, WorkerUnreachable
from turbine.runtime.inbox import Inbox
from turbine.runtime.lifecycle import Closing
from turbine.runtime.transport import framing
from turbine.runtime.transport.base import (
    Handler,
    Pushed,
    StreamTasks,
    error_from_frame,
    error_to_frame,
    take_batch,
)
from turbine.runtime.transport.heartbeat import Heartbeat

log = logging.getLogger(__name__)

_PING = framing.Ping()


class _FrameWriter:
    """Coalesces frames written in one loop iteration into a single transport.write."""

    __slots__ = ("_buf", "_loop", "_paused", "_resumed", "_scheduled", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buf = bytearray()
        self._scheduled = False
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def send(self, frame: framing.Frame) -> None:
        framing.encode_frames_into(self._buf, frame)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._buf and self.transport is not None and not self.transport.is_closing():
            self.transport.write(bytes(self._buf))
        self._buf.clear()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    async def wait_writable(self) -> None:
        """Backpressure: wait while the peer is not reading (transport buffer above its mark)."""
        if self._paused:
            if self._resumed is None:
                self._resumed = self._loop.create_future()
            await self._resumed


# ---------------------------------------------------------------------------------------- server


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: TcpRequestServer) -> None:
        self._server = server
        self._decoder = framing.FrameDecoder()
        self._writer = _FrameWriter(asyncio.get_running_loop())
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._transport: asyncio.Transport | None = None
        self._heartbeat: Heartbeat | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self._transport = cast(asyncio.Transport, transport)
        self._writer.transport = self._transport
        self._server._connections.add(self)
        # A Ping at once: a frontend probing this worker after a stall hears it answer. Armed by the
        # frontend's first Ping (a client that sends none is never judged by its silence).
        self._writer.send(_PING)
        self._heartbeat = Heartbeat(
            lambda: self._writer.send(_PING), self._silent, self._server.stall_timeout_s, armed=False
        )

    def data_received(self, data: bytes) -> None:
        heartbeat = self._heartbeat
        if heartbeat is not None:
            heartbeat.fresh = True
        try:
            frames = self._decoder.feed(data)
        except framing.FrameError as exc:
            log.warning("closing request-plane connection: %s", exc.message)
            assert self._transport is not None
            self._transport.close()
            return
        for frame in frames:
            if type(frame) is framing.Request:
                self._start(frame)
            elif type(frame) is framing.Cancel:
                task = self._tasks.get(frame.stream_id)
                if task is not None:
                    task.cancel()
            elif type(frame) is framing.Ping and heartbeat is not None:
                heartbeat.armed = True

    def _silent(self, silent_s: float) -> None:
        """The frontend went silent (frozen or cut off): stop what it asked for, free its blocks."""
        log.warning(
            "frontend connection silent for %.1f s: closing it and stopping its %d request(s)",
            silent_s,
            len(self._tasks),
        )
        if self._transport is not None:
            self._transport.abort()  # close() would wait to flush to a peer that reads nothing

    def _start(self, frame: framing.Request) -> None:
        sid = frame.stream_id
        if self._server.draining:
            self._writer.send(framing.Error(sid, framing.ERROR_DRAINING, "not accepting new requests"))
            return
        if sid in self._tasks:
            self._writer.send(framing.Error(sid, framing.ERROR_BAD_REQUEST, f"stream {sid} already open"))
            return
        handler = self._server._handler
        assert handler is not None
        task = asyncio.get_running_loop().create_task(self._run(sid, frame.endpoint, bytes(frame.payload)))
        self._tasks[sid] = task
        self._server.track(task)

    async def _run(self, sid: int, endpoint: str, payload: bytes) -> None:
        handler = self._server._handler
        assert handler is not None
        writer = self._writer
        try:
            outputs = handler(endpoint, payload)
            if isinstance(outputs, Pushed):
                # Each payload goes into the connection's buffer from the producer's own callback.
                # No pause here: a producer that cannot wait would otherwise have to buffer itself;
                # the transport's buffer holds what a slow reader has not taken yet, as the engine's
                # per-stream queue did before.
                await outputs.run(lambda out: writer.send(framing.Data(sid, msgspec.Raw(out))))
            else:
                async for out in outputs:
                    writer.send(framing.Data(sid, msgspec.Raw(out)))
                    if writer.paused:  # checked here: awaiting a no-op coroutine per frame is not free
                        await writer.wait_writable()
            writer.send(framing.End(sid))
        except asyncio.CancelledError:
            # Cancelled by the client (Cancel frame) or because the connection closed: nobody is
            # left to tell, and the handler's generator has already been closed by the cancel.
            pass
        except Exception as exc:
            code, message = error_to_frame(exc)
            if code == framing.ERROR_ENGINE:
                log.exception("handler failed on stream %d", sid)
            writer.send(framing.Error(sid, code, message))
        finally:
            self._tasks.pop(sid, None)

    def pause_writing(self) -> None:
        self._writer.pause()

    def resume_writing(self) -> None:
        self._writer.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._writer.resume()
        for task in list(self._tasks.values()):
            task.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpRequestServer(StreamTasks):
    """Worker side of the TCP request plane. Binds loopback by default; TLS with `ssl_context`;
    `stall_timeout_s` (0: never) closes a frontend's connection silent that long."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        stall_timeout_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.stall_timeout_s = stall_timeout_s
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._handler: Handler | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()

    async def start(self, handler: Handler) -> str:
        self._handler = handler
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self._host, self._port, reuse_address=True, ssl=self._ssl
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.cancel_all()
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


# ---------------------------------------------------------------------------------------- client

_LOST = object()
_StreamItem = framing.Frame | object


class _Failed:
    """A stream's last item when the client itself ends it: the error to raise (one per stream)."""

    __slots__ = ("kind", "message")

    def __init__(self, kind: type[WorkerUnreachable], message: str) -> None:
        self.kind = kind
        self.message = message


class _Sink(Protocol):
    def put_nowait(self, item: _StreamItem) -> None: ...


class _Handoff:
    """Where `follow` streams go instead of a queue: each Data payload is handed to `on_data` from
    `data_received`; the item that ends the stream (or `on_data`'s exception) resolves `done`."""

    __slots__ = ("_on_data", "done")

    def __init__(self, on_data: Callable[[bytes], None], done: asyncio.Future[_StreamItem]) -> None:
        self._on_data = on_data
        self.done = done

    def put_nowait(self, item: _StreamItem) -> None:
        if self.done.done():
            return
        if type(item) is framing.Data:
            try:
                self._on_data(bytes(item.payload))
            except Exception as exc:
                self.done.set_exception(exc)
        else:
            self.done.set_result(item)


class _ClientConnection(asyncio.Protocol):
    def __init__(self, address: str, stall_timeout_s: float) -> None:
        self.address = address
        self.closed = False
        self.close_when_idle = False
        self.streams: dict[int, _Sink] = {}
        self._next_id = 0
        self._decoder = framing.FrameDecoder()
        self._writer = _FrameWriter(asyncio.get_running_loop())
        self._transport: asyncio.Transport | None = None
        self._stall_timeout_s = stall_timeout_s
        self._heartbeat: Heartbeat | None = None
        # Resolved by the worker's first frame (it sends a Ping on connect): see `probe`.
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self._transport = cast(asyncio.Transport, transport)
        self._writer.transport = self._transport
        # The first Ping goes at the first beat, not now: with a Ping sent at once, the first
        # request over a TLS connection (written together with it) now and then got no answer
        # (the TLS request-plane tests caught it); the cause is not pinned down.
        self._heartbeat = Heartbeat(lambda: self._writer.send(_PING), self._silent, self._stall_timeout_s)

    def data_received(self, data: bytes) -> None:
        heartbeat = self._heartbeat
        if heartbeat is not None:
            heartbeat.fresh = True
        if not self.answered.done():
            self.answered.set_result(None)
        try:
            frames = self._decoder.feed(data)
        except framing.FrameError as exc:
            log.warning("worker %s sent a bad frame: %s", self.address, exc.message)
            assert self._transport is not None
            self._transport.close()
            return
        streams = self.streams
        for frame in frames:
            queue = streams.get(frame.stream_id)  # Pings name stream 0: none
            if queue is not None:
                queue.put_nowait(frame)

    def _silent(self, silent_s: float) -> None:
        log.warning(
            "worker %s silent for %.1f s: failing its %d stream(s)", self.address, silent_s, len(self.streams)
        )
        self.fail(_Failed(WorkerStalled, f"worker {self.address} went silent for {silent_s:.1f} s"))

    def fail(self, failure: _Failed) -> int:
        """End every open stream with `failure` and drop the connection now; the number ended."""
        count = len(self.streams)
        self.closed = True
        for queue in self.streams.values():
            queue.put_nowait(failure)
        if self._transport is not None:
            self._transport.abort()  # close() would wait to flush to a peer that reads nothing
        return count

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._writer.resume()
        for queue in self.streams.values():
            queue.put_nowait(_LOST)

    def pause_writing(self) -> None:
        self._writer.pause()

    def resume_writing(self) -> None:
        self._writer.resume()

    def open_stream(self) -> tuple[int, Inbox[_StreamItem]]:
        inbox: Inbox[_StreamItem] = Inbox()
        return self.open_sink(inbox), inbox

    def open_sink(self, sink: _Sink) -> int:
        self._next_id += 1
        self.streams[self._next_id] = sink
        return self._next_id

    def send(self, frame: framing.Frame) -> None:
        self._writer.send(frame)

    async def wait_writable(self) -> None:
        await self._writer.wait_writable()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class TcpRequestClient(Closing):
    """Frontend side: a pool of one connection per worker address, opened on first use; TLS with
    `ssl_context` (the worker's certificate must name the host of its address)."""

    def __init__(
        self,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        stall_timeout_s: float = 0.0,
    ) -> None:
        """`stall_timeout_s` (0: never): a worker silent that long has its streams failed with
        `WorkerStalled` and its connection dropped."""
        self._connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._ssl = ssl_context
        self._connections: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Future[_ClientConnection]] = {}

    async def _connection(self, address: str) -> _ClientConnection:
        conn = self._connections.get(address)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(address)
        if pending is not None:
            # Another request is already connecting to this worker: share its connection.
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_ClientConnection] = loop.create_future()
        self._connecting[address] = fut
        try:
            host, _, port = address.rpartition(":")
            hostname = host.strip("[]") if self._ssl is not None else None
            _, new_conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ClientConnection(address, self.stall_timeout_s),
                    host,
                    int(port),
                    ssl=self._ssl,
                    server_hostname=hostname,
                ),
                self._connect_timeout_s,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            error = WorkerUnreachable(f"cannot connect to worker {address}: {exc}")
            fut.set_exception(error)
            fut.exception()  # retrieved: waiters that shield it re-raise on their own
            raise error from exc
        finally:
            self._connecting.pop(address, None)
        self._connections[address] = new_conn
        fut.set_result(new_conn)
        return new_conn

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        conn = await self._connection(address)
        sid, inbox = conn.open_stream()
        finished = False
        try:
            conn.send(framing.Request(sid, endpoint, msgspec.Raw(payload)))
            while True:
                batch, last = take_batch(await inbox.take())
                if batch:
                    yield batch
                if last is None:
                    continue
                finished = True
                _raise_unless_end(last, address)
                return
        finally:
            _end_stream(conn, sid, finished)

    async def follow(
        self, address: str, endpoint: str, payload: bytes, on_data: Callable[[bytes], None]
    ) -> None:
        """`stream`, each payload handed to `on_data` as it is read (see `base.CallbackClient`)."""
        conn = await self._connection(address)
        done: asyncio.Future[_StreamItem] = asyncio.get_running_loop().create_future()
        sid = conn.open_sink(_Handoff(on_data, done))
        finished = False
        try:
            conn.send(framing.Request(sid, endpoint, msgspec.Raw(payload)))
            last = await done
            finished = True
            _raise_unless_end(last, address)
        finally:
            _end_stream(conn, sid, finished)

    def forget(self, address: str) -> None:
        """Close the connection to a worker that left discovery, once its open streams have ended
        (a draining worker unregisters first and then finishes what it was streaming)."""
        conn = self._connections.pop(address, None)
        if conn is not None:
            if conn.streams:
                conn.close_when_idle = True
            else:
                conn.close()

    def abandon(self, address: str, error: WorkerUnreachable) -> int:
        """Fail every open stream to `address` with an error like `error` and drop the connection
        (the worker left discovery without draining, or went silent); the number of streams."""
        conn = self._connections.pop(address, None)
        if conn is None or conn.closed:
            return 0
        return conn.fail(_Failed(type(error), error.message))

    async def probe(self, address: str, timeout_s: float) -> bool:
        """Whether the worker at `address` answers on a fresh connection within `timeout_s` (a
        frozen process's kernel still accepts the connection; only the worker's Ping answers)."""
        try:
            conn = await self._connection(address)
        except WorkerUnreachable:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(conn.answered), timeout_s)
        except TimeoutError:
            if self._connections.get(address) is conn:
                self.abandon(address, WorkerStalled(f"worker {address} did not answer a probe"))
            return False
        return True

    async def close(self) -> None:
        for conn in list(self._connections.values()):
            conn.close()
        self._connections.clear()
        # Let the transports finish closing before the loop goes away.
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)


def _raise_unless_end(last: _StreamItem, address: str) -> None:
    """A stream's last item: End is a clean finish; an Error frame or a lost connection raises."""
    if type(last) is framing.End:
        return
    if type(last) is framing.Error:
        raise error_from_frame(last.code, last.message, address)
    if type(last) is _Failed:
        raise last.kind(last.message)
    raise WorkerUnreachable(f"connection to worker {address} was lost mid-stream")


def _end_stream(conn: _ClientConnection, sid: int, finished: bool) -> None:
    """Forget stream `sid`; cancel it at the worker if it did not finish; close a connection that
    was only kept for its streams."""
    conn.streams.pop(sid, None)
    if not finished and not conn.closed:
        conn.send(framing.Cancel(sid))
    if conn.close_when_idle and not conn.streams:
        conn.close()
