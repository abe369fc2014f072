"""The ZeroMQ event plane on loopback: one bound subscriber plane (a frontend), connecting publisher
planes (worker processes), plus the `--event-plane zmq` config.

ZMQ's slow joiner: a publisher drops what it publishes before a subscription has reached it, so
every test first publishes a sync message over and over until it arrives (`sync`), and only then
checks what a following batch delivers. Nothing here sleeps for a fixed time: waits poll with
deadlines of several seconds, and "nothing else arrived" is checked with an end marker published
last (one publisher's messages arrive in order).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
import zmq

from tests.ports import free_port
from turbine.config import FrontendConfig, WorkerConfig, parse_config
from turbine.errors import ConfigError
from turbine.runtime.events.base import EventPlane
from turbine.runtime.events.zmq import ZmqEventPlane
from turbine.runtime.factory import make_event_plane

pytestmark = pytest.mark.integration

WITHIN_S = 10.0


def _endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class Collector:
    """Runs one subscription in a task; `live` counts its on_live calls."""

    def __init__(self, plane: EventPlane, prefix: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.live = 0
        self._gen = plane.subscribe(prefix, self._on_live)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _on_live(self) -> None:
        self.live += 1

    async def _run(self) -> None:
        async with contextlib.aclosing(self._gen) as messages:
            async for item in messages:
                self.got.append(item)

    def subjects(self) -> list[str]:
        return [s for s, _ in self.got if ".sync." not in s]

    def payloads(self, subject: str) -> list[bytes]:
        return [p for s, p in self.got if s == subject]

    async def until(self, predicate: Callable[[Collector], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + WITHIN_S
        while not predicate(self):
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
            assert not self.task.done(), self.task
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def sync(pub: ZmqEventPlane, subject: str, *collectors: Collector) -> None:
    """Publish `subject` until every collector got it: the publisher has their subscriptions."""
    deadline = asyncio.get_running_loop().time() + WITHIN_S
    while not all(any(s == subject for s, _ in c.got) for c in collectors):
        assert asyncio.get_running_loop().time() < deadline, f"{subject} never arrived"
        pub.publish(subject, b"")
        await asyncio.sleep(0.01)


@pytest.fixture
async def endpoint() -> str:
    return _endpoint()


@pytest.fixture
async def planes(endpoint: str) -> AsyncIterator[tuple[ZmqEventPlane, ZmqEventPlane, ZmqEventPlane]]:
    """A subscriber (the frontend) and two publishers (worker processes) on one endpoint."""
    sub, pub1, pub2 = ZmqEventPlane(endpoint), ZmqEventPlane(endpoint), ZmqEventPlane(endpoint)
    await pub1.start()
    try:
        yield sub, pub1, pub2
    finally:
        async with asyncio.timeout(5):
            for plane in (pub1, pub2, sub):
                await plane.close()


async def test_prefix_filtering_and_per_publisher_order(
    planes: tuple[ZmqEventPlane, ZmqEventPlane, ZmqEventPlane],
) -> None:
    sub, pub1, pub2 = planes
    model = Collector(sub, "ns.m.")
    everything = Collector(sub, "ns.")
    await sync(pub1, "ns.m.sync.1", model, everything)
    await sync(pub2, "ns.m.sync.2", model, everything)
    assert model.live == everything.live == 1
    for i in range(300):
        pub1.publish("ns.m.kv_events.1", i.to_bytes(2, "big"))
        pub2.publish("ns.m.kv_events.2", i.to_bytes(2, "big"))
    for pub in (pub1, pub2):
        pub.publish("ns.other.kv_events.1", b"x")
        pub.publish("other.m.kv_events.1", b"y")
        pub.publish("ns.mm.kv_events.1", b"z")  # 'ns.m.' is a token prefix, not a string prefix
        pub.publish("ns.m.load.1", b"load")
    pub1.publish("ns.m.end.1", b"")
    pub2.publish("ns.m.end.2", b"")
    for c in (model, everything):
        await c.until(lambda c: {"ns.m.end.1", "ns.m.end.2"} <= set(c.subjects()), "the end markers")
    batch = [i.to_bytes(2, "big") for i in range(300)]
    for c in (model, everything):
        assert c.payloads("ns.m.kv_events.1") == batch
        assert c.payloads("ns.m.kv_events.2") == batch
        assert c.payloads("ns.m.load.1") == [b"load", b"load"]
    assert all(s.startswith("ns.m.") for s in model.subjects())
    assert len(model.subjects()) == 604
    assert sorted(everything.payloads("ns.other.kv_events.1") + everything.payloads("ns.mm.kv_events.1")) == [
        b"x",
        b"x",
        b"z",
        b"z",
    ]
    assert len(everything.subjects()) == 608  # never other.m.*
    assert pub1.dropped == pub2.dropped == 0
    await model.stop()
    await everything.stop()


async def test_subscriptions_on_one_plane_get_only_their_prefix(
    planes: tuple[ZmqEventPlane, ZmqEventPlane, ZmqEventPlane],
) -> None:
    sub, pub, _ = planes
    a, b, a_too = Collector(sub, "a."), Collector(sub, "b."), Collector(sub, "a.")
    await sync(pub, "a.sync.1", a, a_too)
    await sync(pub, "b.sync.1", b)
    for n in range(3):
        for topic in ("a", "b", "c"):
            pub.publish(f"{topic}.x", f"{topic}{n}".encode())
    pub.publish("a.end", b"")
    pub.publish("b.end", b"")
    for c in (a, b, a_too):
        await c.until(lambda c: c.subjects()[-1:] in (["a.end"], ["b.end"]), "the end marker")
    assert a.got[-4:] == a_too.got[-4:] == [("a.x", b"a0"), ("a.x", b"a1"), ("a.x", b"a2"), ("a.end", b"")]
    assert b.subjects() == ["b.x", "b.x", "b.x", "b.end"]

    # libzmq counts subscriptions per topic: ending one of the two 'a.' subscriptions keeps the
    # other's messages coming.
    await a.stop()
    pub.publish("a.after", b"1")
    await a_too.until(lambda c: "a.after" in c.subjects(), "a message after the other ended")
    await a_too.stop()
    await b.stop()


async def test_publish_before_the_subscriber_exists(endpoint: str) -> None:
    pub = ZmqEventPlane(endpoint)
    for i in range(100):
        pub.publish("ns.m.kv_events.1", bytes([i]))  # nobody bound: never raises nor blocks
    sub = ZmqEventPlane(endpoint)
    try:
        c = Collector(sub, "ns.")
        # libzmq reconnects to the endpoint once it is bound; what was published before is lost.
        await sync(pub, "ns.m.sync.1", c)
        pub.publish("ns.m.kv_events.1", b"now")
        await c.until(lambda c: ("ns.m.kv_events.1", b"now") in c.got, "a message after binding")
        assert c.live == 1
        await c.stop()
    finally:
        async with asyncio.timeout(5):
            await pub.close()
            await sub.close()


async def test_a_full_send_queue_drops_and_counts_without_blocking(endpoint: str) -> None:
    """A subscriber that stops reading: the publisher's queue (high-water mark) fills and publish
    drops instead of waiting. A raw SUB socket stands in for a frontend that stalls."""
    ctx = zmq.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVHWM, 10)
    raw.setsockopt(zmq.SUBSCRIBE, b"s.")
    raw.bind(endpoint)
    pub = ZmqEventPlane(endpoint, max_buffered=10)
    try:
        deadline = asyncio.get_running_loop().time() + WITHIN_S
        while not raw.poll(10):
            assert asyncio.get_running_loop().time() < deadline, "the raw subscriber got nothing"
            pub.publish("s.sync", b"")
        payload = bytes(4096)
        for _ in range(20000):  # ~80 MB: more than the kernel's socket buffers hold
            pub.publish("s.x", payload)
        assert pub.dropped > 0
    finally:
        async with asyncio.timeout(5):
            await pub.close()
        raw.close(linger=0)
        ctx.term()


async def test_malformed_messages_are_ignored(endpoint: str) -> None:
    sub = ZmqEventPlane(endpoint)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(endpoint)
    try:
        c = Collector(sub, "")
        deadline = asyncio.get_running_loop().time() + WITHIN_S
        while not c.got:
            assert asyncio.get_running_loop().time() < deadline, "nothing arrived"
            raw.send_multipart([b"s.sync", b""])
            await asyncio.sleep(0.01)
        raw.send_multipart([b"s.three", b"frames", b"!"])
        raw.send(b"s.one-frame")
        raw.send_multipart([b"\xff\xfe", b"not utf-8"])
        raw.send_multipart([b"s.ok", b"fine"])
        await c.until(lambda c: ("s.ok", b"fine") in c.got, "the good message")
        assert sub.malformed == 3
        assert {s for s, _ in c.got} == {"s.sync", "s.ok"}
        await c.stop()
    finally:
        raw.close(linger=0)
        ctx.term()
        async with asyncio.timeout(5):
            await sub.close()


async def test_close_ends_subscriptions_and_never_hangs(
    planes: tuple[ZmqEventPlane, ZmqEventPlane, ZmqEventPlane],
) -> None:
    sub, pub, _ = planes
    c = Collector(sub, "a.")
    await sync(pub, "a.sync.1", c)
    async with asyncio.timeout(5):
        await sub.close()
        await c.task  # the generator returned: the subscriber's loop ended by itself
    # The publisher's peer is gone; publishing still returns at once, and closing does not wait
    # for anything queued (linger 0).
    for _ in range(1000):
        pub.publish("a.x", bytes(1024))
    async with asyncio.timeout(5):
        await pub.close()
    pub.publish("a.x", b"after close")  # counted, not raised
    assert pub.dropped >= 1
    with pytest.raises(RuntimeError, match="closed"):
        await anext(sub.subscribe("a."))


async def test_one_subscriber_per_endpoint(endpoint: str) -> None:
    first, second = ZmqEventPlane(endpoint), ZmqEventPlane(endpoint)
    try:
        c = Collector(first, "a.")
        await c.until(lambda c: c.live == 1, "the first subscription")
        with pytest.raises(OSError, match="--event-plane nats"):
            await anext(second.subscribe("a."))
        await c.stop()
    finally:
        async with asyncio.timeout(5):
            await first.close()
            await second.close()


async def test_prefix_must_be_token_aligned(endpoint: str) -> None:
    plane = ZmqEventPlane(endpoint)
    with pytest.raises(ValueError, match="end with"):
        await anext(plane.subscribe("ns.m"))
    await plane.close()


# ----------------------------------------------------------------------------------- config


@pytest.mark.unit
async def test_zmq_event_plane_config_flag_env_validation_and_factory() -> None:
    worker = parse_config(WorkerConfig, ["--event-plane", "zmq"], {}, prog="t")
    assert worker.zmq_event_endpoint == "tcp://127.0.0.1:5557"
    plane = make_event_plane(worker)
    assert isinstance(plane, ZmqEventPlane)
    await plane.close()
    env = {"TURBINE_EVENT_PLANE": "zmq", "TURBINE_ZMQ_EVENT_ENDPOINT": "tcp://10.0.0.7:6000"}
    cfg = parse_config(FrontendConfig, [], env, prog="t")
    assert (cfg.event_plane, cfg.zmq_event_endpoint) == ("zmq", "tcp://10.0.0.7:6000")
    cfg = parse_config(FrontendConfig, ["--zmq-event-endpoint", "ipc:///tmp/turbine-events"], env, prog="t")
    assert cfg.zmq_event_endpoint == "ipc:///tmp/turbine-events"
    for ok in ("tcp://*:5557", "tcp://[::1]:5557", "tcp://frontend-0.svc:1"):
        parse_config(FrontendConfig, ["--event-plane", "zmq", "--zmq-event-endpoint", ok], {}, prog="t")
    for bad in ("127.0.0.1:5557", "tcp://host", "tcp://host:0", "tcp://host:70000", "ipc://", "nats://h:1"):
        with pytest.raises(ConfigError, match="zmq-event-endpoint"):
            parse_config(WorkerConfig, ["--event-plane", "zmq", "--zmq-event-endpoint", bad], {}, prog="t")
    # The endpoint is only checked when the zmq plane is used.
    parse_config(WorkerConfig, ["--zmq-event-endpoint", "bad"], {}, prog="t")
    # Replica sync needs every frontend to hear every other: zmq has one subscriber per endpoint.
    with pytest.raises(ConfigError, match="needs --event-plane nats"):
        parse_config(
            FrontendConfig,
            ["--event-plane", "zmq", "--router-mode", "kv", "--router-replica-sync"],
            {},
            prog="t",
        )
