"""EtcdStore against a real etcd: lease expiry, revoke, and watches and leases across restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.etcd_server import EtcdServer
from tests.unit.runtime.test_discovery_store import Watch, delete, put
from turbine.runtime.discovery.base import KeyValue
from turbine.runtime.discovery.etcd import EtcdStore
from turbine.runtime.discovery.lease import LeaseKeeper

pytestmark = [pytest.mark.integration, pytest.mark.timeout(15)]

TIMEOUT = 5.0


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    impl = EtcdStore(etcd_server.endpoint)
    try:
        yield impl
    finally:
        await impl.close()


async def eventually_gone(store: EtcdStore, key: str, within_s: float) -> float:
    start = time.monotonic()
    while await store.get(key) is not None:
        assert time.monotonic() - start < within_s, f"{key} still there after {within_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_lease_expiry_without_keep_alive_removes_keys(store: EtcdStore) -> None:
    # etcd TTLs are whole seconds; 0.3 rounds up to 1 (the test server's minimum is 1 s too).
    lease = await store.grant_lease(0.3)
    await store.put("e/1", b"x", lease)
    await store.put("e/2", b"y")
    watch = Watch(store.watch_prefix("e/"))
    try:
        assert {await watch.next(), await watch.next()} == {put("e/1", b"x"), put("e/2", b"y")}
        start = time.monotonic()
        assert await watch.next() == delete("e/1")
        # etcd revokes expired leases on a 500 ms tick.
        assert 0.9 <= time.monotonic() - start <= 2.0
    finally:
        await watch.aclose()
    assert await store.get_prefix("e/") == [KeyValue("e/2", b"y", None)]
    assert not await store.keep_alive(lease)
    with pytest.raises(LookupError):
        await store.put("e/3", b"z", lease)


async def test_keep_alive_outlives_the_ttl(store: EtcdStore) -> None:
    lease = await store.grant_lease(1)
    await store.put("k/1", b"x", lease)
    for _ in range(6):
        await asyncio.sleep(0.3)  # six keep-alives span more than the TTL
        assert await store.keep_alive(lease)
    assert await store.get_prefix("k/") == [KeyValue("k/1", b"x", lease)]


async def test_revoke_deletes_keys_and_twice_is_harmless(store: EtcdStore) -> None:
    lease = await store.grant_lease(10)
    await store.put("r/1", b"a", lease)
    await store.revoke(lease)
    await store.revoke(lease)
    assert await store.get("r/1") is None
    assert not await store.keep_alive(lease)


async def test_watch_continues_across_an_etcd_restart(store: EtcdStore, etcd_server: EtcdServer) -> None:
    await store.put("w/a", b"1")
    await store.put("w/gone", b"2")
    watch = Watch(store.watch_prefix("w/"))
    other = EtcdStore(etcd_server.endpoint)
    try:
        assert [await watch.next(), await watch.next()] == [put("w/a", b"1"), put("w/gone", b"2")]
        etcd_server.stop()
        await asyncio.sleep(0.3)  # the watcher notices and retries while etcd is down
        etcd_server.start()
        # Changes made before the watcher is back are delivered once it re-watches, exactly once.
        await other.delete("w/gone")
        await other.put("w/b", b"3")
        assert await watch.next() == delete("w/gone")
        assert await watch.next() == put("w/b", b"3")
        await other.put("w/a", b"4")
        assert await watch.next() == put("w/a", b"4")
        await watch.quiet(0.3)
    finally:
        await watch.aclose()
        await other.close()


async def test_watch_resyncs_when_its_revision_was_compacted(etcd_server: EtcdServer) -> None:
    # A long first backoff keeps the watcher away while we change and compact the history.
    store = EtcdStore(etcd_server.endpoint, retry_delay_s=1.5, max_retry_delay_s=1.5)
    other = EtcdStore(etcd_server.endpoint)
    await other.put("c/keep", b"1")
    await other.put("c/del", b"2")
    await other.put("c/same", b"3")
    watch = Watch(store.watch_prefix("c/"))
    try:
        assert len({await watch.next() for _ in range(3)}) == 3
        etcd_server.restart()
        await other.delete("c/del")
        await other.put("c/new", b"4")
        await other.put("c/keep", b"5")
        await other.put("c/keep", b"6")
        await other.delete("c/new")
        await other.put("c/new2", b"7")
        revision = await _current_revision(other)
        await other._call("/v3/kv/compaction", {"revision": str(revision)})
        # Only the difference, as of now: intermediate values are gone with the compacted history.
        got = {await watch.next() for _ in range(3)}
        assert got == {delete("c/del"), put("c/keep", b"6"), put("c/new2", b"7")}
        await watch.quiet(0.3)
        await other.put("c/after", b"8")
        assert await watch.next() == put("c/after", b"8")
    finally:
        await watch.aclose()
        await store.close()
        await other.close()


async def test_watch_resyncs_with_a_new_empty_etcd(store: EtcdStore, etcd_server: EtcdServer) -> None:
    await store.put("n/1", b"a")
    await store.put("n/2", b"b")
    watch = Watch(store.watch_prefix("n/"))
    try:
        assert [await watch.next(), await watch.next()] == [put("n/1", b"a"), put("n/2", b"b")]
        etcd_server.restart(wipe=True)  # revisions start over: the watcher must not wait for ours
        assert {await watch.next(), await watch.next()} == {delete("n/1"), delete("n/2")}
        await store.put("n/3", b"c")
        assert await watch.next() == put("n/3", b"c")
    finally:
        await watch.aclose()


async def test_lease_survives_a_restart(store: EtcdStore, etcd_server: EtcdServer) -> None:
    keeper = LeaseKeeper(store)
    await keeper.start(1)
    try:
        await keeper.put("svc/a", b"1")
        etcd_server.restart()
        await asyncio.sleep(1.5)  # past the TTL: the lease must outlive the restart
        assert await store.get_prefix("svc/") == [KeyValue("svc/a", b"1", keeper.lease_id)]
        assert keeper.regrants == 0
    finally:
        await keeper.revoke()


async def test_lease_keeper_reregisters_when_the_restart_lost_its_lease(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    keeper = LeaseKeeper(store)
    await keeper.start(1)
    try:
        await keeper.put("svc/a", b"1")
        first = keeper.lease_id
        etcd_server.restart(wipe=True)
        await asyncio.wait_for(keeper.wait_for_regrants(1), TIMEOUT)
        assert keeper.lease_id != first
        assert await store.get_prefix("svc/") == [KeyValue("svc/a", b"1", keeper.lease_id)]
    finally:
        await keeper.revoke()
    assert await store.get_prefix("svc/") == []


async def test_unreachable_etcd_raises(etcd_server: EtcdServer) -> None:
    etcd_server.stop()
    store = EtcdStore(etcd_server.endpoint)
    try:
        with pytest.raises(OSError):
            await store.get("x")
    finally:
        await store.close()


async def _current_revision(store: EtcdStore) -> int:
    reply = await store._call("/v3/kv/range", {"key": "eA=="})
    return int(reply["header"]["revision"])
