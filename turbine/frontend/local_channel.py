"""The local channel of `--num-processes`: one machine's frontend processes share their routing load
without a broker.

The supervisor owns a forwarder (`LocalForwarder`): an XSUB socket bound on `ipc://DIR/sync-in` and
an XPUB socket bound on `ipc://DIR/sync-out`, joined by `zmq.proxy` in a thread (libzmq moves the
messages; the supervisor's event loop never sees them). Each child's plane (`local_plane`) publishes
to sync-in and subscribes at sync-out, so every child hears every child, itself included (replica
sync skips its own subject). Replica sync then runs over it exactly as it runs over NATS between
machines. Subscriptions travel upstream through the XSUB, so publishers only send what somebody
subscribed to.

DIR is the supervisor's private temp directory (mode 0700); it also holds `metrics/`, the
prometheus_client multiprocess directory. IPC paths must stay short (libzmq limits them to about
100 bytes), which a directory made by `tempfile.mkdtemp` is.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import zmq

from turbine.runtime.events.zmq import ZmqEventPlane

log = logging.getLogger(__name__)

METRICS_SUBDIR = "metrics"
RECEIVE_EVERY_S = 0.005
"""A child takes its siblings' sync messages at most this often, all that arrived meanwhile at
once: waking for each one cost more CPU than handling it (every child hears every other, so the
messages a child receives grow with N)."""


def channel_endpoints(directory: str | Path) -> tuple[str, str]:
    """(where children publish, where children subscribe)."""
    return f"ipc://{Path(directory) / 'sync-in'}", f"ipc://{Path(directory) / 'sync-out'}"


async def local_plane(directory: str | Path, receive_every_s: float = RECEIVE_EVERY_S) -> ZmqEventPlane:
    """A child's event plane on the supervisor's forwarder in `directory`, its publisher connected
    at once: a PUB drops what it publishes before it has a subscription, so it must not connect
    lazily on the first routing event (the forwarder subscribes to everything at connect)."""
    publish_to, subscribe_at = channel_endpoints(directory)
    plane = ZmqEventPlane(publish_to, subscribe_endpoint=subscribe_at, receive_every_s=receive_every_s)
    await plane.start()
    return plane


class LocalForwarder:
    """The XSUB → XPUB forwarder of one supervisor run. Binds in the constructor (OSError if it
    cannot); `close()` stops it. Owned by the supervisor, used from no other thread."""

    def __init__(self, directory: str | Path) -> None:
        self._ctx = zmq.Context()
        self._inbound, self._outbound = channel_endpoints(directory)
        self._error: BaseException | None = None
        bound = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bound,), name="local-channel", daemon=True)
        self._thread.start()
        bound.wait()
        if self._error is not None:
            self._thread.join()
            self._ctx.term()
            raise OSError(f"cannot bind the local channel in {directory}: {self._error}")

    def _run(self, bound: threading.Event) -> None:
        # Sockets live and die in this thread (ZMQ sockets are not thread-safe).
        xsub = self._ctx.socket(zmq.XSUB)
        xpub = self._ctx.socket(zmq.XPUB)
        try:
            for sock in (xsub, xpub):
                sock.setsockopt(zmq.LINGER, 0)
                # Never block the proxy on a slow child: a full queue drops (heartbeats repair it).
                sock.setsockopt(zmq.SNDHWM, 65536)
                sock.setsockopt(zmq.RCVHWM, 65536)
            try:
                xsub.bind(self._inbound)
                xpub.bind(self._outbound)
            except zmq.ZMQError as exc:
                self._error = exc
                return
            finally:
                bound.set()
            # Subscribe to everything upstream (XSUB sends it to every publisher that connects), so
            # that publishers forward at once, not only after a child's own subscription has
            # travelled to them; the XPUB filters per subscriber.
            xsub.send(b"\x01")
            with contextlib.suppress(zmq.ContextTerminated):
                zmq.proxy(xsub, xpub)
        finally:
            xsub.close(linger=0)
            xpub.close(linger=0)

    def close(self) -> None:
        # Terminating the context makes zmq.proxy raise ContextTerminated; the thread then closes
        # its sockets, which term() waits for.
        self._ctx.term()
        self._thread.join()
