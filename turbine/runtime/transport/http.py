"""The HTTP request plane: a worker serves its endpoints over HTTP/1.1 with chunked streaming.

`POST /{endpoint}`: the request body is a stream of length-prefixed frames (`framing.py`), the
payload (msgpack) as one Data frame and then a Ping every 0.25 s until the response has ended; the
response body is a stream of the same frames as the TCP plane: Data*, then End or Error. A client
that stops reading closes its connection, which cancels the handler on the worker (aiohttp's
handler cancellation), so no Cancel frame is needed. Connections are pooled by aiohttp's client:
the worker ends a response only once the client ended its body (right after reading the End), so
both bodies are complete when the connection goes back to the pool.
For deployments where only HTTP passes between machines; TCP is faster (no per-request HTTP headers).

Liveness, both ways, per request (each response is one stream on its own connection):
- The worker writes a Ping frame into every response every 0.25 s, so a client with
  `stall_timeout_s` treats a response silent that long (its read timeout) as `WorkerStalled`.
- The client keeps its request body open and writes a Ping into it every 0.25 s until it has read
  the End, so a worker with `stall_timeout_s` that hears nothing more on a request's body for that
  long takes its frontend for frozen or cut off: it stops the request (the engine frees its KV
  blocks) and aborts the connection. A frozen frontend's kernel keeps accepting the worker's
  writes until its receive buffer is full, which at a few tokens a second takes minutes, so a
  stalled response write could not tell it in time; the frontend's own beats can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import aiohttp
import msgspec
from aiohttp import web

from turbine.errors import InvalidRequest, WorkerStalled, WorkerUnreachable
from turbine.runtime.lifecycle import Closing, InFlight
from turbine.runtime.transport import framing
from turbine.runtime.transport.base import Handler, as_generator, error_from_frame, error_to_frame
from turbine.runtime.transport.heartbeat import HEARTBEAT_INTERVAL_S

log = logging.getLogger(__name__)

# Any small id: each HTTP response carries exactly one stream.
_SID = 1
_PING = framing.encode_frame(framing.Ping())


async def _beat(resp: web.StreamResponse) -> None:
    """Ping the client while the response streams (each write is one whole chunk, so these never
    split a frame of the handler's)."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)
        await resp.write(_PING)


async def _payload(content: aiohttp.StreamReader) -> bytes:
    """The request's payload: the body's first frame, a Data frame (the Pings after it are read by
    `_watch_frontend`)."""
    decoder = framing.FrameDecoder()
    while True:
        chunk = await content.readany()
        if not chunk:
            raise InvalidRequest("request body ended before its payload frame")
        try:
            frames = decoder.feed(chunk)
        except framing.FrameError as exc:
            raise InvalidRequest(f"bad request body: {exc.message}") from exc
        if frames:
            if type(frames[0]) is not framing.Data:
                raise InvalidRequest("a request body starts with a Data frame")
            return bytes(frames[0].payload)


async def _request_body(payload: bytes, done: asyncio.Event) -> AsyncIterator[bytes]:
    """The client's request body: the payload, then a Ping every interval until `done`."""
    yield framing.encode_frame(framing.Data(_SID, msgspec.Raw(payload)))
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HEARTBEAT_INTERVAL_S):
                await done.wait()
        if not done.is_set():
            yield _PING


class HttpRequestServer(InFlight):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, stall_timeout_s: float = 0.0) -> None:
        """`stall_timeout_s` (0: never): a request whose body (the frontend's beats) is silent that
        long is stopped and its connection aborted."""
        super().__init__()
        self._host = host
        self._port = port
        self._stall_timeout_s = stall_timeout_s
        self._handler: Handler | None = None
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[None]] = set()

    async def start(self, handler: Handler) -> str:
        self._handler = handler
        app = web.Application(client_max_size=framing.MAX_FRAME_BYTES)
        app.router.add_post("/{endpoint}", self._serve)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _watch_frontend(self, request: web.Request, serving: asyncio.Task[object]) -> None:
        """Read the frontend's beats; silence past the stall timeout stops `serving`. Returns when
        the body ends (the frontend read the End) or the connection goes."""
        timeout = self._stall_timeout_s or None
        content = request.content
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
            except TimeoutError:
                log.warning(
                    "frontend connection silent for %.1f s: closing it and stopping its request",
                    self._stall_timeout_s,
                )
                serving.cancel()
                if request.transport is not None:
                    request.transport.abort()
                return
            except Exception:
                return  # the connection went: aiohttp cancels the handler
            if not chunk:
                return

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-turbine-frames"})
        await resp.prepare(request)
        if self.draining:
            await resp.write(framing.encode_frame(framing.Error(_SID, framing.ERROR_DRAINING, "draining")))
            return resp
        assert self._handler is not None
        buf = bytearray()
        try:
            async with asyncio.timeout(self._stall_timeout_s or None):
                payload = await _payload(request.content)
        except (InvalidRequest, TimeoutError) as exc:
            bad = exc if isinstance(exc, InvalidRequest) else InvalidRequest("request body timed out")
            code, message = error_to_frame(bad)
            await resp.write(framing.encode_frame(framing.Error(_SID, code, message)))
            return resp
        self.enter()
        loop = asyncio.get_running_loop()
        serving = asyncio.current_task()
        assert serving is not None
        beat = loop.create_task(_beat(resp))
        watch = loop.create_task(self._watch_frontend(request, serving))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)
        try:
            try:
                outputs = as_generator(self._handler(request.match_info["endpoint"], payload))
                async with contextlib.aclosing(outputs) as stream:
                    async for out in stream:
                        framing.encode_frames_into(buf, framing.Data(_SID, msgspec.Raw(out)))
                        await resp.write(bytes(buf))
                        buf.clear()
                framing.encode_frames_into(buf, framing.End(_SID))
            except Exception as exc:  # the worker's failure, reported in-band like on TCP
                code, message = error_to_frame(exc)
                framing.encode_frames_into(buf, framing.Error(_SID, code, message))
            beat.cancel()
            await resp.write(bytes(buf))
        finally:
            beat.cancel()
            self.leave()
        # The frontend ends its body once it has read the last frame. The response ends after
        # that, so that both bodies are complete and the connection goes back to the client's
        # pool (aiohttp's client closes a connection whose request body is still being sent).
        await watch
        await resp.write_eof()
        return resp

    async def stop(self) -> None:
        # Requests still open here are stopped with their connections, also those whose handler
        # is done and wait for the frontend to end its body.
        for watch in list(self._watches):
            watch.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HttpRequestClient(Closing):
    def __init__(self, connect_timeout_s: float = 5.0, stall_timeout_s: float = 0.0) -> None:
        """`stall_timeout_s` (0: never): a response silent that long (its headers included) fails
        with `WorkerStalled`."""
        self._stall_timeout_s = stall_timeout_s
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=stall_timeout_s or None
        )
        self._session: aiohttp.ClientSession | None = None
        self._settling: set[asyncio.Task[None]] = set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout
            )
        return self._session

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        decoder = framing.FrameDecoder()
        done = asyncio.Event()
        resp: aiohttp.ClientResponse | None = None
        settled = False
        try:
            # aiohttp starts its read timeout only once a request body is sent, and this one stays
            # open: the wait for the response's headers is bounded here.
            async with asyncio.timeout(self._stall_timeout_s or None):
                resp = await self._client().post(f"{address}/{endpoint}", data=_request_body(payload, done))
            if resp.status != 200:
                raise WorkerUnreachable(f"worker {address} answered HTTP {resp.status}")
            async for chunk in resp.content.iter_any():
                batch: list[bytes] = []
                for frame in decoder.feed(chunk):
                    if type(frame) is framing.Data:
                        batch.append(bytes(frame.payload))
                        continue
                    if type(frame) is framing.Ping:
                        continue
                    if batch:
                        yield batch
                        batch = []
                    if type(frame) is framing.End or type(frame) is framing.Error:
                        done.set()
                        self._settle(resp)
                        settled = True
                    if type(frame) is framing.End:
                        return
                    if type(frame) is framing.Error:
                        raise error_from_frame(frame.code, frame.message, address)
                if batch:
                    yield batch
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise WorkerStalled(f"worker {address} went silent: {exc!r}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerUnreachable(f"worker {address}: {exc!r}") from exc
        finally:
            done.set()
            if resp is not None and not settled:
                resp.close()
        raise WorkerUnreachable(f"worker {address} ended the stream without End")

    def _settle(self, resp: aiohttp.ClientResponse) -> None:
        """After the last frame: the request body ends, the worker then ends the response, and the
        connection goes back to the pool (in the background: the caller has its answer)."""

        async def settle() -> None:
            try:
                await asyncio.wait_for(resp.read(), self._stall_timeout_s or None)
            except Exception:
                resp.close()
            else:
                resp.release()

        task = asyncio.get_running_loop().create_task(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def close(self) -> None:
        if self._settling:
            # Let finished requests' connections settle first (a fraction of a round trip).
            await asyncio.wait(list(self._settling), timeout=1.0)
        for task in list(self._settling):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
