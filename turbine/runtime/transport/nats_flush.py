"""`flush_in_order`: a NATS round trip that covers every command sent before it.

nats-py's `flush()` writes its PING straight to the socket, while a `subscribe()` made just before
only appends the SUB to the client's pending buffer, for its flusher task to write later. The PING
can therefore reach the server ahead of the SUB, the PONG comes back, and `flush()` returns while
the server does not yet have the subscription: messages published in between are lost (seen on a
loaded 2-core machine).

Two flushes fix that with nats-py's public API. The SUB's append kicked the flusher task before the
first PING was written, so the flusher is scheduled on the event loop before that PING's PONG can be
read (a reply needs a later turn of the loop; if the flusher waits on a full socket buffer, the PING
sits in that buffer behind it). By the time the first `flush()` returns, the SUB is on the socket, and
the second PING follows it: its PONG means the server has processed everything sent before the
call. Waiting for the pending buffer to empty instead would stall behind a connection that keeps
publishing.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient

_FLUSH_TIMEOUT_S = 10.0


async def flush_in_order(nc: NatsClient, timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
    """PING round trips until one covers every command queued before the call.
    Raises nats' FlushTimeoutError (or ConnectionClosedError) as `flush()` does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for _ in range(2):
        # nats-py annotates the timeout as int but waits on the value: a float works.
        await nc.flush(timeout=max(deadline - loop.time(), 0.001))  # type: ignore[arg-type]
