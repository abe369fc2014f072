"""The RequestPlane seams.

Payloads are single msgpack-encoded objects (frames embed them without re-encoding).

Server (worker side): `start(handler)` begins accepting and returns the address to publish in the
Instance; every incoming request runs `handler(endpoint, payload)` as its own task, whose yielded
payloads are streamed back in order, then an End (or an Error if the handler raised). A Cancel from
the client, or the connection dropping, cancels that task. `drain()` makes the server refuse new
requests with a retriable "draining" error while running ones finish (see `wait_idle()`);
`stop()` closes everything.

Client (frontend side): `stream(address, endpoint, payload)` is an async iterator of the worker's
payloads, in order, grouped: each item is the list of every payload that had arrived by then (at
least one), so a consumer can handle a burst of token deltas with one write downstream. It raises
`WorkerUnreachable` (retriable) if the worker cannot be reached or the connection drops before the
End, `WorkerDraining` if the worker refused it, `EngineError` for an
engine failure. Leaving the iteration early (break, exception, task cancel, `aclose()`) sends a
Cancel so the worker frees the request. Many streams to one address share one connection.

A handler may also return a `Pushed` instead of a generator: `run(emit)` hands each payload to
`emit` as it is produced, from whatever callback produces it, and returns when the stream is
complete. An engine delivers a token per stream per step, so this spares a task wake-up and a
generator resumption per token. The TCP server writes emitted payloads straight into its
connection's buffer; other servers read a `Pushed` through `pulled`, as a generator.

Some clients (`CallbackClient`) can also `follow(address, endpoint, payload, on_data)`: the same
stream, but each payload is handed to `on_data` as soon as it is read, inside the transport's own
read callback, and the call returns (or raises, as `stream` would) when the stream ends. A
long-lived stream of small messages (a worker's KV events, followed by every frontend process)
then costs no queue and no task wake-up per read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, Self, runtime_checkable

from turbine.errors import EngineError, InvalidRequest, TurbineError, WorkerDraining, WorkerUnreachable
from turbine.runtime.inbox import Inbox
from turbine.runtime.lifecycle import InFlight
from turbine.runtime.transport import framing

Emit = Callable[[bytes], None]


class Pushed:
    """A handler's stream by callback (see the module docstring). `run(emit)` must not return
    before its last `emit`; cancelling the task awaiting it must stop the source."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[Emit], Awaitable[None]]) -> None:
        self.run = run


Handler = Callable[[str, bytes], "AsyncGenerator[bytes, None] | Pushed"]

_DONE = object()


def as_generator(outputs: AsyncGenerator[bytes, None] | Pushed) -> AsyncGenerator[bytes, None]:
    """A handler's output as a generator, whichever form it came in."""
    return pulled(outputs) if isinstance(outputs, Pushed) else outputs


async def pulled(pushed: Pushed) -> AsyncGenerator[bytes, None]:
    """A `Pushed` stream as a generator (for servers that iterate their handlers' output)."""
    inbox: Inbox[object] = Inbox()

    async def run() -> None:
        try:
            await pushed.run(inbox.put_nowait)
        finally:
            inbox.put_nowait(_DONE)

    task = asyncio.ensure_future(run())
    try:
        while True:
            for item in await inbox.take():
                if item is _DONE:
                    await task  # the handler's exception, if it failed
                    return
                yield item  # type: ignore[misc]  # everything but _DONE is an emitted payload
    finally:
        if not task.done():
            task.cancel()


class RequestPlaneServer(Protocol):
    async def start(self, handler: Handler) -> str: ...

    def drain(self) -> None: ...

    @property
    def active_streams(self) -> int: ...

    async def wait_idle(self, timeout_s: float) -> bool: ...

    async def stop(self) -> None: ...


class RequestPlaneClient(Protocol):
    """`async with client:` closes it on exit (see `runtime/lifecycle.py`)."""

    def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncGenerator[list[bytes], None]: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


@runtime_checkable
class CallbackClient(Protocol):
    """A client that can also deliver a stream's payloads by callback (see the module docstring)."""

    async def follow(
        self, address: str, endpoint: str, payload: bytes, on_data: Callable[[bytes], None]
    ) -> None: ...


def error_from_frame(code: str, message: str, address: str) -> TurbineError:
    """Map a worker's Error frame onto the error tree."""
    if code == framing.ERROR_DRAINING:
        return WorkerDraining(f"worker {address} is draining: {message}")
    if code in (framing.ERROR_BAD_REQUEST, framing.ERROR_UNKNOWN_ENDPOINT):
        return InvalidRequest(message)
    if code == framing.ERROR_ENGINE:
        return EngineError(f"worker {address}: {message}")
    return WorkerUnreachable(f"worker {address} failed the stream ({code}): {message}")


def error_to_frame(exc: BaseException) -> tuple[str, str]:
    """The Error frame (code, message) a server sends for a handler's exception."""
    if isinstance(exc, WorkerDraining):
        return framing.ERROR_DRAINING, exc.message
    if isinstance(exc, InvalidRequest):
        return framing.ERROR_BAD_REQUEST, exc.message
    return framing.ERROR_ENGINE, f"{type(exc).__name__}: {exc}"


def take_batch(items: list[Any]) -> tuple[list[bytes], Any]:
    """Of `items` (all a stream's inbox held), the payloads of the leading Data frames, in order,
    and the first non-Data item, which ends the stream (None when there is none yet). Clients yield
    such a batch as one item: a worker's batch step sends many frames at once, and downstream
    (detokenize, one SSE write) is cheaper in bulk."""
    batch: list[bytes] = []
    for item in items:
        if type(item) is not framing.Data:
            return batch, item
        batch.append(bytes(item.payload))
    return batch, None


class StreamTasks(InFlight):
    """`InFlight` for servers that run each stream as a task: `track()` counts a task until it
    ends, and `cancel_all()` cancels what is left. Subclasses check `draining` on new requests."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: set[asyncio.Task[None]] = set()

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        self.enter()
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.leave()

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
