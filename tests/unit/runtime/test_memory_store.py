"""MemoryStore specifics: an injected clock decides expiry; watches clean up after themselves."""

from __future__ import annotations

import asyncio

import pytest

from turbine.runtime.discovery.base import KeyValue, WatchEvent, WatchKind
from turbine.runtime.discovery.memory import MemoryStore

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_injected_clock_decides_expiry() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    try:
        lease = await store.grant_lease(10)
        await store.put("k", b"v", lease)
        clock.now += 9.9
        assert await store.keep_alive(lease)  # deadline is now 1019.9
        clock.now += 9.9
        assert await store.get_prefix("") == [KeyValue("k", b"v", lease)]
        clock.now += 0.1
        assert await store.get("k") is None
        assert not await store.keep_alive(lease)
    finally:
        await store.close()


async def test_an_expiry_found_by_an_operation_reaches_watchers() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    try:
        lease = await store.grant_lease(10)
        await store.put("k", b"v", lease)
        watch = store.watch_prefix("")
        assert await anext(watch) == WatchEvent(WatchKind.PUT, "k", b"v")
        clock.now += 10
        await store.get("other")
        assert await asyncio.wait_for(anext(watch), 1) == WatchEvent(WatchKind.DELETE, "k", None)
        await watch.aclose()
    finally:
        await store.close()


async def test_closed_watches_unsubscribe() -> None:
    store = MemoryStore()
    try:
        watch = store.watch_prefix("")
        await store.put("k", b"v")
        assert await anext(watch) == WatchEvent(WatchKind.PUT, "k", b"v")
        assert len(store._watchers) == 1
        await watch.aclose()
        assert store._watchers == set()
    finally:
        await store.close()


async def test_the_expiry_task_starts_with_the_first_lease_and_stops_on_close() -> None:
    store = MemoryStore()
    await store.put("k", b"v")
    assert store._expiry_task is None
    await store.grant_lease(10)
    task = store._expiry_task
    assert task is not None and not task.done()
    await store.close()
    assert task.cancelled()
