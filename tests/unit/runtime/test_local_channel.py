"""The local channel: planes of several "processes" on one folder hear each other, not themselves."""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from turbine.runtime.events.local_channel import LocalPlane, forget_process, local_plane, prepare_channel

pytestmark = pytest.mark.unit


class _Heard:
    """What one plane hears under `prefix`, collected by a task (the subscription starts with it)."""

    def __init__(self, plane: LocalPlane, prefix: str) -> None:
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.live = asyncio.Event()
        """Set once the subscription is up: what is published from then on is heard."""
        self._task = asyncio.ensure_future(self._collect(plane, prefix))

    async def _collect(self, plane: LocalPlane, prefix: str) -> None:
        async with contextlib.aclosing(plane.subscribe(prefix, self.live.set)) as messages:
            async for message in messages:
                self.messages.put_nowait(message)

    async def next(self, within_s: float = 2.0) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.messages.get(), within_s)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def _planes(directory: Path, count: int) -> AsyncIterator[list[LocalPlane]]:
    prepare_channel(directory)
    planes = [await local_plane(directory) for _ in range(count)]
    try:
        # Every plane has accepted the others' connections and connected back.
        for plane in planes:
            await asyncio.wait_for(_until_connected(plane, count - 1), 5.0)
        yield planes
    finally:
        for plane in planes:
            await plane.close()


async def test_every_plane_hears_every_other_plane_and_not_itself(tmp_path: Path) -> None:
    async with _planes(tmp_path, 3) as (a, b, c):
        heard = [_Heard(p, "ns.m.router.") for p in (a, b, c)]
        for h in heard:
            await h.live.wait()
        a.publish("ns.other.x", b"nobody subscribed to this")
        for i in range(3):
            a.publish("ns.m.router.a", b"%d" % i)
        c.publish("ns.m.router.c", b"from c")
        expected_from_a = [("ns.m.router.a", b"%d" % i) for i in range(3)]
        at_b = [await heard[1].next() for _ in range(4)]
        # In order per sender; senders' messages interleave any way.
        assert [m for m in at_b if m[0].endswith(".a")] == expected_from_a
        assert ("ns.m.router.c", b"from c") in at_b
        assert [await heard[2].next() for _ in range(3)] == expected_from_a
        assert await heard[0].next() == ("ns.m.router.c", b"from c")
        with pytest.raises(TimeoutError):
            await heard[0].next(within_s=0.1)  # neither its own messages nor other prefixes
        assert (a.dropped, b.dropped, c.dropped) == (0, 0, 0)
        for h in heard:
            await h.close()


async def test_a_sibling_that_exits_and_one_that_replaces_it(tmp_path: Path) -> None:
    async with _planes(tmp_path, 2) as (a, b):
        heard = _Heard(a, "ns.")
        await heard.live.wait()
        b.publish("ns.b", b"1")
        assert await heard.next() == ("ns.b", b"1")
        await b.close()
        a.publish("ns.a", b"to nobody")  # the closed sibling is forgotten, not an error
        b2 = await local_plane(tmp_path)
        try:
            b2.publish("ns.b", b"2")
            assert await heard.next() == ("ns.b", b"2")
            assert await asyncio.wait_for(_until_connected(a, 1), 2.0)  # a connected back to it
        finally:
            await b2.close()
            await heard.close()


async def _until_connected(plane: LocalPlane, siblings: int) -> bool:
    while True:
        plane.publish("probe", b"")  # publishing rescans once a sibling has connected; nobody hears it
        if plane.siblings == siblings:
            return True
        await asyncio.sleep(0.01)


async def test_a_burst_arrives_whole_and_in_order_when_read_late(tmp_path: Path) -> None:
    prepare_channel(tmp_path)
    a = LocalPlane(tmp_path, receive_every_s=0.05)
    await a.start()
    b = await local_plane(tmp_path)
    try:
        heard = _Heard(a, "ns.")
        await heard.live.wait()
        payloads = [bytes([i % 256]) * 1000 for i in range(50)]
        for p in payloads:
            b.publish("ns.b", p)
        assert [(await heard.next())[1] for _ in payloads] == payloads
        assert b.dropped == 0
        await heard.close()
    finally:
        await a.close()
        await b.close()


async def test_a_folder_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot listen on the local channel"):
        await local_plane(tmp_path / "missing")


async def test_the_socket_of_a_process_that_died_is_removed(tmp_path: Path) -> None:
    async with _planes(tmp_path, 1):
        sockets = list((tmp_path / "sync").glob("*.sock"))
        assert len(sockets) == 1 and sockets[0].name.startswith(f"{os.getpid()}-")
        forget_process(tmp_path, os.getpid() + 1)  # somebody else's: nothing happens
        assert list((tmp_path / "sync").glob("*.sock")) == sockets
        forget_process(tmp_path, os.getpid())
        assert list((tmp_path / "sync").glob("*.sock")) == []
