"""`flush_in_order`: a NATS round trip that covers every command sent before it.

nats-py's `flush()` writes its PING straight to the socket, while a `subscribe()` made just before
only appends the SUB to the client's pending buffer, for its flusher task to write later. The PING
can therefore reach the server ahead of the SUB, the PONG comes back, and `flush()` returns while
the server does not yet have the subscription: messages published in between are lost (seen on a
loaded 2-core machine). Waiting until the pending buffer has been written first restores the
guarantee callers rely on: once this returns, the server has processed everything sent before.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient

_FLUSH_TIMEOUT_S = 10.0


async def flush_in_order(nc: NatsClient, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
    """Write nats-py's pending commands to the socket, then PING and wait for the PONG.
    Raises nats' FlushTimeoutError (or ConnectionClosedError) as `flush()` does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # The flusher task was kicked when the commands were queued; it writes the buffer and then
    # zeroes `pending_data_size`. While disconnected nats-py keeps the buffer for the reconnect,
    # and its own flush() fails as it should, so only wait while connected.
    spins = 0
    while nc.pending_data_size > 0 and nc.is_connected and loop.time() < deadline:
        await asyncio.sleep(0 if spins < 8 else 0.001)
        spins += 1
    remaining = max(deadline - loop.time(), 0.001)
    # nats-py annotates the timeout as int but waits on the value: a float works.
    await nc.flush(timeout=remaining)  # type: ignore[arg-type]
