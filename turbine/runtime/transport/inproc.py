"""In-process request plane: same contract as TCP, no sockets. For unit tests and one-process demos."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncGenerator

from turbine.errors import WorkerDraining, WorkerUnreachable
from turbine.runtime.lifecycle import Closing, InFlight
from turbine.runtime.transport.base import Handler, as_generator


class InprocHub:
    """The 'network': maps addresses to the handlers of started servers. One per test or process."""

    def __init__(self) -> None:
        self.servers: dict[str, InprocServer] = {}
        self._ids = itertools.count(1)

    def next_address(self) -> str:
        return f"inproc-{next(self._ids)}:0"


class InprocServer(InFlight):
    def __init__(self, hub: InprocHub) -> None:
        super().__init__()
        self._hub = hub
        self._handler: Handler | None = None
        self._address = ""

    async def start(self, handler: Handler) -> str:
        self._handler = handler
        self._address = self._hub.next_address()
        self._hub.servers[self._address] = self
        return self._address

    async def stop(self) -> None:
        self._hub.servers.pop(self._address, None)

    async def serve(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        if self.draining:
            raise WorkerDraining(f"worker {self._address} is draining")
        assert self._handler is not None
        with self.hold():
            async with contextlib.aclosing(as_generator(self._handler(endpoint, payload))) as outputs:
                async for out in outputs:
                    yield out


class InprocClient(Closing):
    def __init__(self, hub: InprocHub) -> None:
        self._hub = hub

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]:
        server = self._hub.servers.get(address)
        if server is None:
            raise WorkerUnreachable(f"no in-process worker at {address}")
        async with contextlib.aclosing(server.serve(endpoint, payload)) as outputs:
            async for out in outputs:
                yield [out]

    async def close(self) -> None:
        return None
