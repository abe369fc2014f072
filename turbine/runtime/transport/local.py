"""The request plane's short cut for workers that run inside the frontend's own process
(`turbine frontend --upstream MODEL=URL`: the upstream sidecar's workers).

Such a worker still starts its ordinary server (TCP, NATS or HTTP) and registers that address, so
other frontends reach it over the network as before. A stream that this process opens to one of
those addresses runs the worker's handler directly instead: no socket write, framing or epoll
wake-up, and no task per stream on the worker side. That round trip through the loopback was a
large share of the time Turbine added in front of an upstream server.

The contract is the network one (see base.py): payloads are yielded in order, draining refuses
new streams with `WorkerDraining`, a handler's exception becomes the error the client would have
decoded from the worker's Error frame (so retries and migration behave the same), and closing the
stream early closes the handler's generator (which closes the upstream request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator

from turbine.errors import WorkerDraining, WorkerUnreachable
from turbine.runtime.lifecycle import Closing, InFlight
from turbine.runtime.transport import framing
from turbine.runtime.transport.base import (
    Handler,
    RequestPlaneClient,
    RequestPlaneServer,
    as_generator,
    error_from_frame,
    error_to_frame,
)

log = logging.getLogger(__name__)


class LocalPlane:
    """This process's workers by address; wraps the process's request-plane client and servers."""

    def __init__(self) -> None:
        self._servers: dict[str, LocalServer] = {}

    def server(self, inner: RequestPlaneServer) -> LocalServer:
        return LocalServer(inner, self)

    def client(self, inner: RequestPlaneClient) -> LocalFirstClient:
        return LocalFirstClient(inner, self)

    def find(self, address: str) -> LocalServer | None:
        return self._servers.get(address)

    def _add(self, address: str, server: LocalServer) -> None:
        self._servers[address] = server

    def _remove(self, address: str) -> None:
        self._servers.pop(address, None)


class LocalServer(InFlight):
    """A worker's server that other frontends reach through `inner`, and this process directly.
    Its own `InFlight` counts the local streams; draining and waiting cover `inner`'s too."""

    def __init__(self, inner: RequestPlaneServer, plane: LocalPlane) -> None:
        super().__init__()
        self._inner = inner
        self._plane = plane
        self._handler: Handler | None = None
        self._address = ""

    async def start(self, handler: Handler) -> str:
        self._handler = handler
        self._address = await self._inner.start(handler)
        self._plane._add(self._address, self)
        return self._address

    def drain(self) -> None:
        super().drain()
        self._inner.drain()

    @property
    def active_streams(self) -> int:
        return self._inner.active_streams + super().active_streams

    async def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        remote_idle = await self._inner.wait_idle(timeout_s)
        local_idle = await super().wait_idle(max(0.0, deadline - time.monotonic()))
        return remote_idle and local_idle

    async def stop(self) -> None:
        self._plane._remove(self._address)
        await self._inner.stop()

    async def serve(self, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        """One stream run in the caller's task, each payload as its own batch."""
        if self.draining:
            raise WorkerDraining(f"worker {self._address} is draining: not accepting new requests")
        handler = self._handler
        assert handler is not None, "start() first"
        with self.hold():
            try:
                async with contextlib.aclosing(as_generator(handler(endpoint, payload))) as outputs:
                    async for out in outputs:
                        yield [out]
            except Exception as exc:
                # As the worker would have sent it in an Error frame, and the client decoded it.
                code, message = error_to_frame(exc)
                if code == framing.ERROR_ENGINE:
                    log.exception("handler failed on a local stream to %s", self._address)
                raise error_from_frame(code, message, self._address) from None


class LocalFirstClient(Closing):
    """The process's request-plane client, short-cut for the addresses of its own workers."""

    def __init__(self, inner: RequestPlaneClient, plane: LocalPlane) -> None:
        self._inner = inner
        self._plane = plane

    def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        server = self._plane.find(address)
        if server is None:
            return self._inner.stream(address, endpoint, payload)
        return server.serve(endpoint, payload)

    def forget(self, address: str) -> None:
        """Passed on to clients that keep connections (TCP, NATS): see `ModelRegistry`."""
        forget = getattr(self._inner, "forget", None)
        if forget is not None:
            forget(address)

    def abandon(self, address: str, error: WorkerUnreachable) -> int:
        """Passed on to clients that can fail a worker's open streams (TCP, NATS)."""
        abandon = getattr(self._inner, "abandon", None)
        return 0 if abandon is None else int(abandon(address, error))

    async def probe(self, address: str, timeout_s: float) -> bool:
        """Passed on for remote workers (TCP); this process's own workers always answer. A plane
        that cannot probe answers after `timeout_s` (a skip as long as one stall timeout)."""
        if self._plane.find(address) is not None:
            return True
        probe = getattr(self._inner, "probe", None)
        if probe is None:
            await asyncio.sleep(timeout_s)
            return True
        return bool(await probe(address, timeout_s))

    async def close(self) -> None:
        await self._inner.close()
