"""The local channel: a forwarder in a temp directory, and planes of several "processes" on it."""

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from turbine.frontend.local_channel import LocalForwarder, local_plane
from turbine.runtime.events.zmq import ZmqEventPlane

pytestmark = pytest.mark.unit

Messages = AsyncGenerator[tuple[str, bytes], None]


async def _heard(publisher: ZmqEventPlane, subject: str, payload: bytes, messages: Messages) -> set[str]:
    """Publish until `messages` yields it: a subscription travels to the publisher through the
    forwarder asynchronously ("slow joiner"), as replica sync's heartbeats cope with. Returns the
    subjects heard meanwhile."""
    seen: set[str] = set()
    nxt: asyncio.Future[tuple[str, bytes]] = asyncio.ensure_future(anext(messages))
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        publisher.publish(subject, payload)
        publisher.publish("ns.other.x", b"nobody subscribed to this")
        await asyncio.wait({nxt}, timeout=0.02)
        while nxt.done():
            got = nxt.result()
            seen.add(got[0])
            if got == (subject, payload):
                return seen
            nxt = asyncio.ensure_future(anext(messages))
            await asyncio.sleep(0)
        assert asyncio.get_running_loop().time() < deadline, f"{subject} never arrived"


async def test_every_plane_hears_every_plane(tmp_path: Path) -> None:
    forwarder = LocalForwarder(tmp_path)
    a, b = await local_plane(tmp_path), await local_plane(tmp_path)
    try:
        async with (
            contextlib.aclosing(a.subscribe("ns.m.router.")) as at_a,
            contextlib.aclosing(b.subscribe("ns.m.router.")) as at_b,
        ):
            assert await _heard(a, "ns.m.router.a", b"from a", at_b) <= {"ns.m.router.a"}
            # a hears b, and itself (replica sync skips its own subject); never other prefixes.
            assert await _heard(b, "ns.m.router.b", b"from b", at_a) <= {"ns.m.router.a", "ns.m.router.b"}
    finally:
        await a.close()
        await b.close()
        forwarder.close()


def test_a_directory_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot bind the local channel"):
        LocalForwarder(tmp_path / "missing")
