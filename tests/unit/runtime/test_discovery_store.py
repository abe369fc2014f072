"""The Store contract, run against every in-tree implementation (memory, file, and etcd).

The etcd store runs against a real etcd (see conftest.py); its TTLs are whole seconds, so the tests
that time a sub-second expiry skip it (tests/unit/runtime/test_etcd_store.py times its expiry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from turbine.runtime.discovery.base import KeyValue, Store, WatchEvent, WatchKind
from turbine.runtime.discovery.etcd import EtcdStore

pytestmark = pytest.mark.unit

TTL = 0.3
# Generous: a watch must report an expiry within TTL + 0.5 s; CI machines can be slow.
EVENT_TIMEOUT = 2.0


def skip_whole_second_ttls(store: Store) -> None:
    if isinstance(store, EtcdStore):
        pytest.skip("etcd lease TTLs are whole seconds; test_etcd_store.py covers its expiry")


def put(key: str, value: bytes) -> WatchEvent:
    return WatchEvent(WatchKind.PUT, key, value)


def delete(key: str) -> WatchEvent:
    return WatchEvent(WatchKind.DELETE, key, None)


class Watch:
    """Steps through a watch with timeouts. A timed-out wait must not cancel `anext`: that would
    throw CancelledError into the generator and end the watch, so the pending call is kept."""

    def __init__(self, it: AsyncIterator[WatchEvent]) -> None:
        # The contract promises aclose(); the Protocol's return type does not show it.
        assert isinstance(it, AsyncGenerator)
        self._it = it
        self._pending: asyncio.Future[WatchEvent] | None = None

    def _next(self) -> asyncio.Future[WatchEvent]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._it))
        return self._pending

    async def next(self) -> WatchEvent:
        pending = self._next()
        done, _ = await asyncio.wait({pending}, timeout=EVENT_TIMEOUT)
        if not done:
            pytest.fail(f"no event within {EVENT_TIMEOUT}s")
        self._pending = None
        return pending.result()

    async def quiet(self, wait_s: float = 0.15) -> None:
        pending = self._next()
        done, _ = await asyncio.wait({pending}, timeout=wait_s)
        if done:
            pytest.fail(f"unexpected event {pending.result()}")

    async def ended(self) -> bool:
        try:
            await self.next()
        except StopAsyncIteration:
            return True
        return False

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.wait({self._pending})
            self._pending = None
        await self._it.aclose()


async def test_put_get_prefix_delete(store: Store) -> None:
    await store.put("a/1", b"one")
    await store.put("a/2", b"two")
    await store.put("b/1", b"other")
    assert await store.get("a/1") == b"one"
    assert await store.get("a/3") is None
    assert await store.get_prefix("a/") == [KeyValue("a/1", b"one", None), KeyValue("a/2", b"two", None)]
    assert [kv.key for kv in await store.get_prefix("")] == ["a/1", "a/2", "b/1"]

    await store.put("a/1", b"uno")
    assert await store.get("a/1") == b"uno"
    await store.delete("a/1")
    await store.delete("a/1")  # deleting a missing key is not an error
    assert await store.get("a/1") is None
    assert await store.get_prefix("a/") == [KeyValue("a/2", b"two", None)]


async def test_prefix_matches_whole_characters_of_odd_keys(store: Store) -> None:
    keys = ["x/a b", "x/a%2Fb", "x/a/b", "x/.", "x/..", "x/é", "x/~_-"]
    for i, key in enumerate(keys):
        await store.put(key, bytes([i]))
    assert [kv.key for kv in await store.get_prefix("x/a/")] == ["x/a/b"]
    assert [kv.key for kv in await store.get_prefix("x/a%")] == ["x/a%2Fb"]
    assert [kv.key for kv in await store.get_prefix("x/.")] == ["x/.", "x/.."]
    assert sorted(kv.key for kv in await store.get_prefix("x/")) == sorted(keys)
    assert await store.get("x/é") == bytes([keys.index("x/é")])


async def test_revoke_removes_only_the_lease_keys(store: Store) -> None:
    lease = await store.grant_lease(10)
    other = await store.grant_lease(10)
    await store.put("w/1", b"a", lease)
    await store.put("w/2", b"b", other)
    await store.put("w/3", b"c")
    await store.revoke(lease)
    assert await store.get_prefix("w/") == [KeyValue("w/2", b"b", other), KeyValue("w/3", b"c", None)]
    assert not await store.keep_alive(lease)
    assert await store.keep_alive(other)
    with pytest.raises(LookupError):
        await store.put("w/4", b"d", lease)
    assert await store.get("w/4") is None


async def test_put_moves_a_key_to_its_new_lease(store: Store) -> None:
    first = await store.grant_lease(10)
    second = await store.grant_lease(10)
    await store.put("k", b"v1", first)
    await store.put("k", b"v2", second)
    await store.revoke(first)
    assert await store.get("k") == b"v2"
    await store.revoke(second)
    assert await store.get("k") is None


async def test_keys_expire_after_ttl_without_keep_alive(store: Store) -> None:
    skip_whole_second_ttls(store)
    lease = await store.grant_lease(TTL)
    await store.put("e/1", b"x", lease)
    await store.put("e/2", b"y")
    assert await store.get("e/1") == b"x"
    await asyncio.sleep(TTL + 0.1)  # past the TTL with no keep-alive: what is tested
    assert await store.get("e/1") is None
    assert await store.get_prefix("e/") == [KeyValue("e/2", b"y", None)]
    assert not await store.keep_alive(lease)
    with pytest.raises(LookupError):
        await store.put("e/3", b"z", lease)


async def test_keep_alive_keeps_keys(store: Store) -> None:
    lease = await store.grant_lease(TTL)
    await store.put("k/1", b"x", lease)
    deadline = time.monotonic() + 2 * TTL
    while time.monotonic() < deadline:
        await asyncio.sleep(TTL / 3)  # a keep-alive's interval
        assert await store.keep_alive(lease)
    assert await store.get("k/1") == b"x"


async def test_watch_yields_snapshot_then_changes_in_order(store: Store) -> None:
    await store.put("s/2", b"two")
    await store.put("s/1", b"one")
    await store.put("t/1", b"outside")
    watch = Watch(store.watch_prefix("s/"))
    try:
        assert [await watch.next(), await watch.next()] == [put("s/1", b"one"), put("s/2", b"two")]
        await watch.quiet()
        # One change at a time: a polling store may coalesce changes made between two polls.
        await store.put("s/3", b"three")
        assert await watch.next() == put("s/3", b"three")
        await store.delete("s/1")
        assert await watch.next() == delete("s/1")
        await store.put("s/2", b"TWO")
        assert await watch.next() == put("s/2", b"TWO")
        await store.put("t/2", b"outside")
        await store.delete("t/1")
        await store.put("s/9", b"marker")
        # Nothing outside the prefix came before the marker.
        assert await watch.next() == put("s/9", b"marker")
    finally:
        await watch.aclose()


async def test_watch_snapshot_skips_dead_keys(store: Store) -> None:
    lease = await store.grant_lease(TTL)
    await store.put("d/1", b"x", lease)
    await store.revoke(lease)
    await store.put("d/2", b"y")
    watch = Watch(store.watch_prefix("d/"))
    try:
        assert await watch.next() == put("d/2", b"y")
        await watch.quiet()
    finally:
        await watch.aclose()


async def test_two_watchers_see_the_same_changes(store: Store) -> None:
    await store.put("m/0", b"0")
    first = Watch(store.watch_prefix("m/"))
    second = Watch(store.watch_prefix("m/"))
    try:
        for watch in (first, second):
            assert await watch.next() == put("m/0", b"0")
        await store.put("m/1", b"1")
        for watch in (first, second):
            assert await watch.next() == put("m/1", b"1")
        await first.aclose()  # closing one watcher leaves the other working
        await store.delete("m/0")
        assert await second.next() == delete("m/0")
    finally:
        await first.aclose()
        await second.aclose()


async def test_watch_sees_expiry_without_anyone_calling_the_store(store: Store) -> None:
    skip_whole_second_ttls(store)
    before_grant = time.monotonic()
    lease = await store.grant_lease(TTL)
    await store.put("x/1", b"alive", lease)
    watch = Watch(store.watch_prefix("x/"))
    try:
        assert await watch.next() == put("x/1", b"alive")
        assert await watch.next() == delete("x/1")
        # Not early (the file store's wall clock and our monotonic one may differ by a hair)...
        assert time.monotonic() - before_grant >= TTL - 0.02
        # ...and not late: the contract promises the DELETE within about TTL + 0.5 s.
        assert time.monotonic() - before_grant <= TTL + 0.5
    finally:
        await watch.aclose()


async def test_watch_sees_revoke(store: Store) -> None:
    lease = await store.grant_lease(10)
    await store.put("r/1", b"a", lease)
    await store.put("r/2", b"b", lease)
    watch = Watch(store.watch_prefix("r/"))
    try:
        assert [await watch.next(), await watch.next()] == [put("r/1", b"a"), put("r/2", b"b")]
        await store.revoke(lease)
        assert {await watch.next(), await watch.next()} == {delete("r/1"), delete("r/2")}
    finally:
        await watch.aclose()


async def test_close_ends_open_watches(store: Store) -> None:
    await store.put("c/1", b"x")
    watch = Watch(store.watch_prefix("c/"))
    assert await watch.next() == put("c/1", b"x")
    await store.close()
    assert await watch.ended()
    with pytest.raises(RuntimeError):
        await store.get("c/1")


async def test_invalid_ttl_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.grant_lease(0)
