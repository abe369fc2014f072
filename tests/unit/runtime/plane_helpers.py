"""Shared pieces of the request-plane tests: a scripted handler and a collecting client call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import msgspec

from turbine.errors import InvalidRequest
from turbine.runtime.transport.base import Emit, Pushed, RequestPlaneClient


def enc(n: int) -> bytes:
    return msgspec.msgpack.encode(n)


def _fail_if_asked(endpoint: str) -> None:
    if endpoint == "fail":
        raise RuntimeError("engine exploded")
    if endpoint == "bad":
        raise InvalidRequest("bad payload")


class Echo:
    """Endpoint "gen"/"slow": stream 0..n-1 (n = the payload); "fail": engine error; "bad": 400."""

    def __init__(self) -> None:
        self.cancelled: list[bytes] = []
        self.finished: list[bytes] = []

    async def handler(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None]:
        _fail_if_asked(endpoint)
        try:
            for i in range(msgspec.msgpack.decode(payload)):
                yield enc(i)
                # "slow": a handler that takes its time, so a stream is still open when a test acts.
                await asyncio.sleep(0.001 if endpoint == "slow" else 0)
            self.finished.append(payload)
        except asyncio.CancelledError:
            self.cancelled.append(payload)
            raise

    def pushed(self, endpoint: str, payload: bytes) -> Pushed:
        """The same endpoints, as a handler that pushes its payloads (`Pushed`)."""

        async def run(emit: Emit) -> None:
            _fail_if_asked(endpoint)
            try:
                for i in range(msgspec.msgpack.decode(payload)):
                    emit(enc(i))
                    await asyncio.sleep(0.001 if endpoint == "slow" else 0)
                self.finished.append(payload)
            except asyncio.CancelledError:
                self.cancelled.append(payload)
                raise

        return Pushed(run)


async def collect(client: RequestPlaneClient, address: str, endpoint: str, payload: bytes) -> list[bytes]:
    return [chunk async for batch in client.stream(address, endpoint, payload) for chunk in batch]
