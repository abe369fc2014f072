"""The NATS request plane: the same frames as TCP (`framing.py`), carried by a NATS server.

Subjects:
- Each worker's server subscribes to its own subject `turbine.req.{random hex}`; that subject is the
  address it publishes in its Instance. Requests and Cancels go there.
- Each client has an inbox `turbine.inbox.{client id}`, subscribed once. A Request is published with
  the reply subject `{inbox}.{stream_id}` (stream ids are unique per client); the server keys the
  stream by (inbox, stream_id), so a Cancel (published with the same reply subject) finds it.
- The server publishes the stream's Data/End/Error frames to `{inbox}`, with its own subject as the
  message's reply, so the client knows which worker is alive. Frames produced for one inbox in the
  same event-loop iteration (a batch step's token deltas of every stream of that client) go out as
  one NATS message of several length-prefixed frames.

Detecting a dead worker (NATS itself never says that a peer went away):
- No responders: a Request whose subject has no subscriber gets the server's 503 status on its
  reply subject `{inbox}.{stream_id}` at once → `WorkerUnreachable`.
- Keep-alive: every `heartbeat_s` (0.25 s) a worker sends an empty message (zero frames) to each
  inbox it has open streams for, and one right after accepting a request. A client's watchdog fails
  a stream with `WorkerStalled` when its worker has not been heard from (frames or keep-alive) for
  `stall_timeout_s` (`--request-stall-timeout-s`) since the request or since it was last heard.

Detecting a frozen frontend, the other way: every 0.25 s a client sends an empty message to each
worker it has open streams with (reply subject `{inbox}.0`). A worker that has had such a
keep-alive from an inbox and then hears nothing from it for its `stall_timeout_s` cancels that
inbox's streams (the engine frees their KV blocks). The NATS server's own view of a client's
liveness does not serve here: it notices a frozen client only after its ping interval times its
allowed outstanding pings (minutes by default), and tells other clients only through system
account advisories, which a worker's credentials need not reach.
- The client's or the server's connection to NATS dropping fails (client) or cancels (server)
  every open stream, since core NATS may lose messages while reconnecting; nats-py reconnects on
  its own and re-subscribes, and new streams work again once it has.

Limits: a message is bounded by the NATS server's `max_payload` (1 MiB by default); a request
larger than that is refused as invalid (raise the server's `max_payload` for huge prompts), and the
server splits its output into messages below it. There is no per-stream backpressure beyond the
NATS client's own pending buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from turbine.errors import InvalidRequest, WorkerStalled, WorkerUnreachable
from turbine.runtime.inbox import Inbox
from turbine.runtime.lifecycle import Closing, cancel_and_wait
from turbine.runtime.transport import framing
from turbine.runtime.transport.base import (
    Handler,
    StreamTasks,
    as_generator,
    error_from_frame,
    error_to_frame,
    take_batch,
)
from turbine.runtime.transport.heartbeat import HEARTBEAT_INTERVAL_S
from turbine.runtime.transport.nats_flush import flush_in_order

log = logging.getLogger(__name__)

REQUEST_SUBJECT_PREFIX = "turbine.req."
INBOX_PREFIX = "turbine.inbox."
NO_RESPONDERS = "503"
# A message larger than this is split (frames are never split), well below NATS' 1 MiB default.
_SPLIT_BYTES = 256 * 1024
_FIRST_CONNECT_TIMEOUT_S = 5.0


async def _connect(
    url: str,
    name: str,
    on_disconnect: object | None = None,
    timeout_s: float = _FIRST_CONNECT_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
) -> NatsClient:
    async def disconnected() -> None:
        if callable(on_disconnect):
            on_disconnect()

    async def error(exc: Exception) -> None:
        log.debug("nats %s: %s", name, exc)

    # Reconnect forever once connected: a NATS server restart must not take workers or frontends
    # down with it. nats-py would also retry the first connect forever, so that one is bounded here.
    nc = NatsClient()
    try:
        await asyncio.wait_for(
            nc.connect(
                url,
                name=name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
                disconnected_cb=disconnected,
                error_cb=error,
                tls=tls,
            ),
            timeout_s,
        )
    except BaseException:
        # Bounded: after a failed TLS handshake nats-py's close() never returns.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        raise
    return nc


class _Outbox:
    """Coalesces frames sent in one loop iteration into one NATS message per (subject, reply).

    One task publishes everything, in order, so per-subject ordering holds without locks."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._loop = asyncio.get_running_loop()
        self._bufs: dict[tuple[str, str], list[bytearray]] = {}
        self._ready: list[tuple[str, str, bytes]] = []
        self._wake = asyncio.Event()
        self._scheduled = False
        self._task = self._loop.create_task(self._run())

    def send(self, subject: str, reply: str, frame: framing.Frame | None) -> None:
        """Queue a frame (None: just make sure a message, possibly empty, goes out)."""
        bufs = self._bufs.get((subject, reply))
        if bufs is None:
            bufs = self._bufs[(subject, reply)] = [bytearray()]
        if frame is not None:
            if len(bufs[-1]) > _SPLIT_BYTES:
                bufs.append(bytearray())
            framing.encode_frames_into(bufs[-1], frame)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        ready = self._ready
        for (subject, reply), bufs in self._bufs.items():
            for buf in bufs:
                ready.append((subject, reply, bytes(buf)))
        self._bufs.clear()
        self._wake.set()

    async def _run(self) -> None:
        nc = self._nc
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._ready = self._ready, []
            for subject, reply, data in batch:
                try:
                    await nc.publish(subject, data, reply=reply)
                except Exception as exc:
                    # Disconnected with a full reconnect buffer, or closed: the peers' watchdogs
                    # and disconnect handlers end the affected streams.
                    log.debug("nats publish to %s failed: %s", subject, exc)

    async def close(self) -> None:
        # Let what is queued go out first, then stop the publisher.
        if self._scheduled:
            await asyncio.sleep(0)
        for _ in range(100):
            if not self._ready and not self._wake.is_set():
                break
            await asyncio.sleep(0)
        await cancel_and_wait(self._task)


class _Connected:
    """The NATS connection and outbox of a server or client, and how they close."""

    _nc: NatsClient | None = None
    _outbox: _Outbox | None = None

    async def _disconnect(self) -> None:
        """Close the outbox (what it queued goes out first), then the connection."""
        if self._outbox is not None:
            await self._outbox.close()
            self._outbox = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None


# ---------------------------------------------------------------------------------------- server


class NatsRequestServer(StreamTasks, _Connected):
    """Worker side: subscribes to its own subject on the NATS server at `server_url`."""

    def __init__(
        self,
        server_url: str = "nats://127.0.0.1:4222",
        heartbeat_s: float = HEARTBEAT_INTERVAL_S,
        *,
        stall_timeout_s: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`stall_timeout_s` (0: never): the streams of a client that sent keep-alives and then is
        silent that long are cancelled."""
        super().__init__()
        self._url = server_url
        self._tls = tls
        self._heartbeat_s = heartbeat_s
        self._handler: Handler | None = None
        self._nc = None
        self._outbox = None
        self._subject = REQUEST_SUBJECT_PREFIX + secrets.token_hex(8)
        self._streams: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stall_timeout_s = stall_timeout_s
        # Per client inbox: when it was last heard from, and whether it sends keep-alives.
        self._heard: dict[str, float] = {}
        self._beating: set[str] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self, handler: Handler) -> str:
        self._handler = handler
        self._nc = await _connect(
            self._url, f"turbine-worker-{self._subject}", self._on_disconnect, tls=self._tls
        )
        self._outbox = _Outbox(self._nc)
        await self._nc.subscribe(self._subject, cb=self._on_msg)
        # The subscription must reach the NATS server before the address is published.
        await flush_in_order(self._nc)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        return self._subject

    def _on_disconnect(self) -> None:
        # Replies may have been lost while disconnected: the clients fail these streams anyway.
        for task in list(self._streams.values()):
            task.cancel()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            inboxes = {inbox for inbox, _ in self._streams}
            if self._outbox is not None:
                for inbox in inboxes:
                    self._outbox.send(inbox, self._subject, None)
            self._stop_silent(inboxes)

    def _stop_silent(self, inboxes: set[str]) -> None:
        """Cancel the streams of clients that went silent (frozen, cut off); forget idle ones."""
        now = asyncio.get_running_loop().time()
        timeout = self._stall_timeout_s
        for inbox in list(self._heard):
            if inbox not in inboxes:
                del self._heard[inbox]
                self._beating.discard(inbox)
                continue
            silent_s = now - self._heard[inbox]
            if timeout <= 0 or inbox not in self._beating or silent_s < timeout:
                continue
            tasks = [task for (owner, _), task in self._streams.items() if owner == inbox]
            log.warning(
                "frontend connection silent for %.1f s: stopping its %d request(s)", silent_s, len(tasks)
            )
            for task in tasks:
                task.cancel()
            del self._heard[inbox]
            self._beating.discard(inbox)

    async def _on_msg(self, msg: Msg) -> None:
        inbox, _, _ = msg.reply.rpartition(".")
        if not inbox.startswith(INBOX_PREFIX):
            log.warning("dropping a request-plane message without a valid reply subject")
            return
        self._heard[inbox] = asyncio.get_running_loop().time()
        if not msg.data:
            self._beating.add(inbox)  # a client's keep-alive
            return
        try:
            frames = framing.FrameDecoder().feed(msg.data)
        except framing.FrameError as exc:
            log.warning("dropping a bad request-plane message: %s", exc.message)
            return
        for frame in frames:
            if type(frame) is framing.Request:
                self._start(inbox, frame)
            elif type(frame) is framing.Cancel:
                task = self._streams.get((inbox, frame.stream_id))
                if task is not None:
                    task.cancel()

    def _start(self, inbox: str, frame: framing.Request) -> None:
        outbox = self._outbox
        assert outbox is not None
        sid = frame.stream_id
        if self.draining:
            outbox.send(inbox, self._subject, framing.Error(sid, framing.ERROR_DRAINING, "not accepting"))
            return
        key = (inbox, sid)
        if key in self._streams:
            message = f"stream {sid} already open"
            outbox.send(inbox, self._subject, framing.Error(sid, framing.ERROR_BAD_REQUEST, message))
            return
        # Tell the client at once that this worker is alive and working on it.
        outbox.send(inbox, self._subject, None)
        task = asyncio.get_running_loop().create_task(self._run(key, frame.endpoint, bytes(frame.payload)))
        self._streams[key] = task
        self.track(task)

    async def _run(self, key: tuple[str, int], endpoint: str, payload: bytes) -> None:
        handler = self._handler
        outbox = self._outbox
        assert handler is not None and outbox is not None
        inbox, sid = key
        me = self._subject
        try:
            async for out in as_generator(handler(endpoint, payload)):
                outbox.send(inbox, me, framing.Data(sid, msgspec.Raw(out)))
            outbox.send(inbox, me, framing.End(sid))
        except asyncio.CancelledError:
            pass  # cancelled by the client, or the NATS connection dropped: nobody to tell
        except Exception as exc:
            code, message = error_to_frame(exc)
            if code == framing.ERROR_ENGINE:
                log.exception("handler failed on stream %d", sid)
            outbox.send(inbox, me, framing.Error(sid, code, message))
        finally:
            self._streams.pop(key, None)

    async def stop(self) -> None:
        await self.cancel_all()
        await cancel_and_wait(self._heartbeat)
        self._heartbeat = None
        await self._disconnect()


# ---------------------------------------------------------------------------------------- client

_LOST = object()
_NO_RESPONDERS = object()
_STALE = object()
_LEFT = object()
_StreamItem = framing.Frame | object


@dataclass
class _Stream:
    address: str
    started: float
    inbox: Inbox[_StreamItem] = field(default_factory=Inbox)


class NatsRequestClient(_Connected, Closing):
    """Frontend side: one NATS connection and one inbox for every stream to every worker."""

    def __init__(
        self,
        server_url: str = "nats://127.0.0.1:4222",
        *,
        stall_timeout_s: float = 0.0,
        connect_timeout_s: float = _FIRST_CONNECT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._url = server_url
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._inbox = INBOX_PREFIX + secrets.token_hex(8)
        self._nc = None
        self._outbox = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._heard: dict[str, float] = {}
        self._next_id = 0
        self._decoder = framing.FrameDecoder()

    async def _connection(self) -> tuple[NatsClient, _Outbox]:
        if self._nc is not None and self._outbox is not None:
            return self._nc, self._outbox
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is None or self._outbox is None:
                try:
                    name = f"turbine-frontend-{self._inbox}"
                    nc = await _connect(
                        self._url, name, self._on_disconnect, self._connect_timeout_s, self._tls
                    )
                except Exception as exc:
                    raise WorkerUnreachable(f"cannot connect to NATS at {self._url}: {exc}") from exc
                await nc.subscribe(self._inbox, cb=self._on_frames)
                await nc.subscribe(self._inbox + ".*", cb=self._on_status)
                await flush_in_order(nc)
                self._outbox = _Outbox(nc)
                self._watchdog = asyncio.get_running_loop().create_task(self._watch())
                self._nc = nc
            assert self._nc is not None and self._outbox is not None
            return self._nc, self._outbox

    def _on_disconnect(self) -> None:
        for stream in self._streams.values():
            stream.inbox.put_nowait(_LOST)

    async def _on_frames(self, msg: Msg) -> None:
        if msg.reply:
            self._heard[msg.reply] = asyncio.get_running_loop().time()
        if not msg.data:
            return  # keep-alive
        try:
            frames = self._decoder.feed(msg.data)
        except framing.FrameError as exc:
            log.warning("worker %s sent a bad frame: %s", msg.reply, exc.message)
            self._decoder = framing.FrameDecoder()
            return
        streams = self._streams
        for frame in frames:
            stream = streams.get(frame.stream_id)
            if stream is not None:
                stream.inbox.put_nowait(frame)

    async def _on_status(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status") == NO_RESPONDERS:
            with contextlib.suppress(ValueError):
                stream = self._streams.get(int(msg.subject.rpartition(".")[2]))
                if stream is not None:
                    stream.inbox.put_nowait(_NO_RESPONDERS)

    async def _watch(self) -> None:
        """Send keep-alives to the workers this client has streams with, and fail streams whose
        worker went silent (no frame, no keep-alive) for the stall timeout."""
        loop = asyncio.get_running_loop()
        timeout = self._stall_timeout_s
        interval = min(HEARTBEAT_INTERVAL_S, timeout / 4) if timeout > 0 else HEARTBEAT_INTERVAL_S
        keep_alive = f"{self._inbox}.0"  # stream ids start at 1
        while True:
            await asyncio.sleep(interval)
            if self._outbox is not None:
                for address in {stream.address for stream in self._streams.values()}:
                    self._outbox.send(address, keep_alive, None)
            if timeout <= 0:
                continue
            now = loop.time()
            for stream in self._streams.values():
                heard = max(self._heard.get(stream.address, float("-inf")), stream.started)
                if now - heard > timeout:
                    stream.inbox.put_nowait(_STALE)

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        nc, outbox = await self._connection()
        if not nc.is_connected:
            raise WorkerUnreachable(f"not connected to NATS at {self._url}")
        request = framing.Request(self._next_id + 1, endpoint, msgspec.Raw(payload))
        if len(payload) + 64 > nc.max_payload:
            raise InvalidRequest(f"request of {len(payload)} bytes exceeds NATS max_payload {nc.max_payload}")
        self._next_id += 1
        sid = self._next_id
        reply = f"{self._inbox}.{sid}"
        stream = _Stream(address, asyncio.get_running_loop().time())
        self._streams[sid] = stream
        inbox = stream.inbox
        finished = False
        try:
            outbox.send(address, reply, request)
            while True:
                batch, last = take_batch(await inbox.take())
                if batch:
                    yield batch
                if last is None:
                    continue
                finished = True
                if type(last) is framing.End:
                    return
                if type(last) is framing.Error:
                    raise error_from_frame(last.code, last.message, address)
                if last is _NO_RESPONDERS:
                    raise WorkerUnreachable(f"worker {address} has no subscriber on NATS")
                if last is _STALE:
                    finished = False  # maybe only slow: tell it to stop anyway
                    raise WorkerStalled(f"worker {address} went silent")
                if last is _LEFT:
                    finished = False
                    raise WorkerUnreachable(f"worker {address} left discovery")
                raise WorkerUnreachable(f"lost the NATS connection while streaming from {address}")
        finally:
            self._streams.pop(sid, None)
            if not finished and self._outbox is not None:
                self._outbox.send(address, reply, framing.Cancel(sid))

    def forget(self, address: str) -> None:
        """A worker left discovery: stop tracking when it was last heard from (once its open
        streams have ended: a draining worker unregisters first and then finishes them)."""
        if not any(stream.address == address for stream in self._streams.values()):
            self._heard.pop(address, None)

    def abandon(self, address: str, error: WorkerUnreachable) -> int:
        """A worker left discovery without draining: fail its open streams now (they raise
        "left discovery"; `error` names the kind for planes that keep it)."""
        count = 0
        for stream in self._streams.values():
            if stream.address == address:
                stream.inbox.put_nowait(_LEFT)
                count += 1
        self.forget(address)
        return count

    async def close(self) -> None:
        await cancel_and_wait(self._watchdog)
        self._watchdog = None
        await self._disconnect()
