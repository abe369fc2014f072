"""The local channel of `--num-processes`: one machine's frontend processes share their routing load
without a broker, and without a thread between them.

Each child's plane (`LocalPlane`) listens on a Unix SOCK_SEQPACKET socket `DIR/sync/{id}.sock` and
connects one socket to every sibling it finds there: `publish` sends the message once per sibling
(a child does not hear its own messages). SEQPACKET keeps message boundaries and sends each message
whole or not at all, so a sibling too slow to keep up (its unread messages fill the sender's 4 MiB
send buffer) loses whole messages, counted in `dropped`, never the stream; replica sync's heartbeat
then drops the requests whose `finished` was lost. Replica sync runs over it exactly as it runs over
NATS between machines.

Why not a ZMQ forwarder (XSUB/XPUB in the supervisor, as before): each message then crossed the
sender's ZMQ I/O thread, the forwarder's two threads and every receiver's I/O thread, about ten
context switches per message, and with every child hearing every other that cost grows with the
square of the processes. Here a message is one `send` per sibling, and only the
receiving event loop ever wakes for it, at most once per `receive_every_s` while messages keep
coming: it then reads everything that arrived meanwhile, and waits on its sockets again only once
the channel is quiet.

Siblings are found by listing `DIR/sync` when the plane starts, then at most every `rescan_s` and
soon after a new sibling connects (so a restarted child is heard from and heard within about a
second). A child removes its socket when it stops; the supervisor removes a dead child's.

DIR is the supervisor's private temp directory (mode 0700); it also holds `metrics/`, the
prometheus_client multiprocess directory. Socket paths must stay short (about 100 bytes), which a
directory made by `tempfile.mkdtemp` keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import AsyncGenerator
from pathlib import Path

from turbine.runtime.events.base import OnLive
from turbine.runtime.events.fanout import Subscription

log = logging.getLogger(__name__)

SYNC_SUBDIR = "sync"
RECEIVE_EVERY_S = 0.005
MAX_PENDING = 65536
"""Messages a subscriber may fall behind before its oldest are dropped."""
RESCAN_S = 1.0
MAX_MESSAGE = 1 << 17
"""Larger messages are dropped (a socket's send buffer, ~200 KiB at the least, must hold one)."""
SEND_BUFFER = 4 << 20
_SUBJECT_LEN = struct.Struct(">H")


def prepare_channel(directory: str | Path) -> None:
    """Make the channel's socket folder in the supervisor's `directory` (before any child starts)."""
    (Path(directory) / SYNC_SUBDIR).mkdir(mode=0o700, exist_ok=True)


def forget_process(directory: str | Path, pid: int) -> None:
    """Remove the sockets of a child `pid` that has exited (killed, it could not remove them)."""
    for path in (Path(directory) / SYNC_SUBDIR).glob(f"{pid}-*.sock"):
        with contextlib.suppress(OSError):
            path.unlink()


async def local_plane(directory: str | Path, receive_every_s: float = RECEIVE_EVERY_S) -> LocalPlane:
    """A child's plane on the channel in `directory`, listening and connected to its siblings."""
    plane = LocalPlane(directory, receive_every_s=receive_every_s)
    await plane.start()
    return plane


class LocalPlane:
    """An EventPlane between the processes of one machine (see the module docstring)."""

    def __init__(
        self, directory: str | Path, *, receive_every_s: float = RECEIVE_EVERY_S, rescan_s: float = RESCAN_S
    ) -> None:
        self._dir = Path(directory) / SYNC_SUBDIR
        self._path = self._dir / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self._receive_every_s = receive_every_s
        self._rescan_s = rescan_s
        self._listener: socket.socket | None = None
        self._outgoing: dict[str, socket.socket] = {}
        self._incoming: list[socket.socket] = []
        self._next_scan = 0.0
        self._subs: list[Subscription] = []
        self._activity = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._buffer = bytearray(MAX_MESSAGE + 1024)
        self._closed = False
        self.dropped = 0
        """Messages not handed to a sibling (its socket full, it went away, or too large)."""

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.setblocking(False)
            listener.bind(str(self._path))
            listener.listen(256)
        except OSError as exc:
            listener.close()
            raise OSError(f"cannot listen on the local channel in {self._dir}: {exc}") from exc
        self._listener = listener
        loop = asyncio.get_running_loop()
        loop.add_reader(listener.fileno(), self._accept)
        self._reader = loop.create_task(self._receive(), name=f"local-channel-{self._path.name}")
        self._rescan()

    @property
    def siblings(self) -> int:
        """Siblings this plane publishes to."""
        return len(self._outgoing)

    # ------------------------------------------------------------------------------ publish

    def publish(self, subject: str, payload: bytes) -> None:
        if self._closed:
            self.dropped += 1
            return
        if time.monotonic() >= self._next_scan:
            self._rescan()
        raw = subject.encode()
        message = b"".join((_SUBJECT_LEN.pack(len(raw)), raw, payload))
        if len(message) > MAX_MESSAGE:
            self.dropped += len(self._outgoing)
            log.warning("local channel: dropped a %d-byte message on %s (too large)", len(message), subject)
            return
        for path, sock in list(self._outgoing.items()):
            try:
                sock.send(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:
                self.dropped += 1  # the sibling is behind: never wait for it
            except OSError:
                self.dropped += 1  # it went away; a restarted one is found by the next scan
                sock.close()
                del self._outgoing[path]

    def _rescan(self) -> None:
        """Connect to siblings not connected yet (a connect to a listening Unix socket completes at
        once); forget the ones whose socket is gone."""
        self._next_scan = time.monotonic() + self._rescan_s
        try:
            paths = {str(p) for p in self._dir.glob("*.sock")} - {str(self._path)}
        except OSError:
            return
        for path in [p for p in self._outgoing if p not in paths]:
            self._outgoing.pop(path).close()
        for path in paths - self._outgoing.keys():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.setblocking(False)
            # What a sibling has not read yet counts against this socket's send buffer: room for
            # a sibling's stall of a good fraction of a second (the kernel caps it at wmem_max).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            try:
                sock.connect(path)
            except OSError:
                sock.close()  # a dead child's socket, or a busy one: tried again at the next scan
                continue
            self._outgoing[path] = sock

    # ---------------------------------------------------------------------------- subscribe

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("local channel: accept failed: %s", exc)
                break
            sock.setblocking(False)
            self._incoming.append(sock)
            # A sibling that just connected is likely new: connect back to it soon.
            self._next_scan = min(self._next_scan, time.monotonic() + 0.05)
        self._activity.set()

    def _drain(self) -> int:
        """Read every message waiting on every incoming socket; returns how many."""
        got = 0
        buffer = self._buffer
        for sock in list(self._incoming):
            while True:
                try:
                    n = sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    n = 0
                if n == 0:  # the sibling closed it (exited)
                    sock.close()
                    self._incoming.remove(sock)
                    break
                got += 1
                self._deliver(bytes(buffer[:n]))
        return got

    def _deliver(self, message: bytes) -> None:
        (length,) = _SUBJECT_LEN.unpack_from(message)
        subject = message[2 : 2 + length].decode()
        payload = message[2 + length :]
        for sub in self._subs:
            if subject.startswith(sub.prefix):
                sub.push(subject, payload)

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._drain():
                await asyncio.sleep(self._receive_every_s)
                continue
            # Quiet: wait on the sockets until something arrives (or a sibling connects).
            self._activity.clear()
            watched = list(self._incoming)
            for sock in watched:
                loop.add_reader(sock.fileno(), self._activity.set)
            try:
                await self._activity.wait()
            finally:
                for sock in watched:
                    with contextlib.suppress(ValueError, OSError):
                        loop.remove_reader(sock.fileno())

    async def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        if prefix and not prefix.endswith("."):
            raise ValueError(f"event plane prefix {prefix!r} must be empty or end with '.'")
        if self._closed:
            raise RuntimeError("event plane closed")
        sub = Subscription(prefix, MAX_PENDING)
        self._subs.append(sub)
        try:
            if on_live is not None:
                on_live()
            async for message in sub.drain(lambda: self._closed):
                yield message
        finally:
            self._subs.remove(sub)

    # -------------------------------------------------------------------------------- close

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            sub.wake.set()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                self._path.unlink()
        for sock in [*self._outgoing.values(), *self._incoming]:
            sock.close()
        self._outgoing.clear()
        self._incoming.clear()
