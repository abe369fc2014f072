"""The HTTP request plane: a worker serves its endpoints over HTTP/1.1 with chunked streaming.

`POST /{endpoint}` carries the request payload (msgpack) as its body; the response body is a stream
of the same length-prefixed frames as the TCP plane (`framing.py`): Data*, then End or Error. A
client that stops reading closes its connection, which cancels the handler on the worker (aiohttp's
handler cancellation), so no Cancel frame is needed. Connections are pooled by aiohttp's client.
For deployments where only HTTP passes between machines; TCP is faster (no per-request HTTP headers).

Liveness: the worker writes a Ping frame into every response every 0.25 s, so a client with
`stall_timeout_s` treats a response silent that long (its read timeout) as `WorkerStalled`. The
other direction has no equivalent on this plane: once a request's body is sent, a live frontend
is silent too, so a worker cannot tell a frozen one (use the TCP plane for that).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import aiohttp
import msgspec
from aiohttp import web

from turbine.errors import WorkerStalled, WorkerUnreachable
from turbine.runtime.transport import framing
from turbine.runtime.transport.base import Handler, as_generator, error_from_frame, error_to_frame
from turbine.runtime.transport.heartbeat import HEARTBEAT_INTERVAL_S

# Any small id: each HTTP response carries exactly one stream.
_SID = 1
_PING = framing.encode_frame(framing.Ping())


async def _beat(resp: web.StreamResponse) -> None:
    """Ping the client while the response streams (each write is one whole chunk, so these never
    split a frame of the handler's)."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)
        await resp.write(_PING)


class HttpRequestServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._handler: Handler | None = None
        self._runner: web.AppRunner | None = None
        self._draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

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

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-turbine-frames"})
        await resp.prepare(request)
        if self._draining:
            await resp.write(framing.encode_frame(framing.Error(_SID, framing.ERROR_DRAINING, "draining")))
            return resp
        assert self._handler is not None
        payload = await request.read()
        self._active += 1
        self._idle.clear()
        buf = bytearray()
        beat = asyncio.get_running_loop().create_task(_beat(resp))
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
            await resp.write_eof()
        finally:
            beat.cancel()
            self._active -= 1
            if not self._active:
                self._idle.set()
        return resp

    def drain(self) -> None:
        self._draining = True

    @property
    def active_streams(self) -> int:
        return self._active

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._active == 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class HttpRequestClient:
    def __init__(self, connect_timeout_s: float = 5.0, stall_timeout_s: float = 0.0) -> None:
        """`stall_timeout_s` (0: never): a response silent that long fails with `WorkerStalled`."""
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=stall_timeout_s or None
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout
            )
        return self._session

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        decoder = framing.FrameDecoder()
        try:
            async with self._client().post(f"{address}/{endpoint}", data=payload) as resp:
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
                        if type(frame) is framing.End:
                            return
                        if type(frame) is framing.Error:
                            raise error_from_frame(frame.code, frame.message, address)
                    if batch:
                        yield batch
        except aiohttp.ServerTimeoutError as exc:
            raise WorkerStalled(f"worker {address} went silent: {exc!r}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise WorkerUnreachable(f"worker {address}: {exc!r}") from exc
        raise WorkerUnreachable(f"worker {address} ended the stream without End")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
