"""Free loopback ports for the servers tests start, safe under pytest-xdist.

Asking the kernel for port 0 hands out a port of the ephemeral range, which every outgoing
connection of every process on the machine draws from too, and which a parallel test worker may be
handed as well between our close and the server's bind. Ports here come from below the ephemeral
range, from a slice of their own per xdist worker, each checked free before it is handed out.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

_LOW, _HIGH = 20_000, 32_000  # below Linux's default ephemeral range (32768-60999)
_SLICE = 1_000


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    start = _LOW + (index * _SLICE) % (_HIGH - _LOW)
    return range(start, start + _SLICE)


_ports = _slice()
_next = itertools.cycle(random.Random(os.getpid()).sample(list(_ports), len(_ports)))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port no server listens on now, not handed out by this process before (until the slice
    wraps round)."""
    for port in itertools.islice(_next, len(_ports)):
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {_ports.start}-{_ports.stop - 1}")
