"""LeaseKeeper: keeps one lease alive and re-registers its keys when the lease is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from turbine.runtime.discovery.base import KeyValue, Store
from turbine.runtime.discovery.file import FileStore
from turbine.runtime.discovery.lease import LeaseKeeper
from turbine.runtime.discovery.memory import MemoryStore

pytestmark = pytest.mark.unit

TTL = 0.3
TIMEOUT = 2.0


class Stores:
    """The store the keeper uses and an independent view of the same data (another FileStore on
    the same directory, or the same MemoryStore), standing in for another process."""

    def __init__(self, mine: Store, other: Store) -> None:
        self.mine = mine
        self.other = other


@pytest.fixture(params=["memory", "file"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    if request.param == "memory":
        memory = MemoryStore()
        pair = Stores(memory, memory)
    else:
        pair = Stores(FileStore(tmp_path, 0.02), FileStore(tmp_path, 0.02))
    try:
        yield pair
    finally:
        await pair.mine.close()
        await pair.other.close()


async def test_keeps_keys_alive_past_the_ttl(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(TTL)
    try:
        await keeper.put("svc/a", b"1")
        await asyncio.sleep(3 * TTL)  # time past the TTL is what is tested
        assert await stores.other.get_prefix("svc/") == [KeyValue("svc/a", b"1", keeper.lease_id)]
        assert keeper.regrants == 0
    finally:
        await keeper.revoke()


async def test_revoke_removes_keys_and_stops(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(10)
    lease = keeper.lease_id
    await keeper.put("svc/a", b"1")
    await keeper.put("svc/b", b"2")
    await keeper.delete("svc/b")
    assert await stores.other.get_prefix("svc/") == [KeyValue("svc/a", b"1", lease)]
    await keeper.revoke()
    assert await stores.other.get_prefix("svc/") == []
    assert not await stores.other.keep_alive(lease)
    with pytest.raises(RuntimeError):
        _ = keeper.lease_id
    await keeper.revoke()  # idempotent


async def test_reregisters_after_the_lease_is_revoked_elsewhere(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(TTL)
    try:
        await keeper.put("svc/a", b"1")
        await keeper.put("svc/b", b"2")
        lost = keeper.lease_id
        await stores.other.revoke(lost)
        assert await stores.other.get_prefix("svc/") == []
        await asyncio.wait_for(keeper.wait_for_regrants(1), TIMEOUT)
        assert keeper.lease_id != lost
        assert await stores.other.get_prefix("svc/") == [
            KeyValue("svc/a", b"1", keeper.lease_id),
            KeyValue("svc/b", b"2", keeper.lease_id),
        ]
    finally:
        await keeper.revoke()


async def test_reregisters_after_the_process_froze_past_its_ttl(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(TTL)
    try:
        await keeper.put("svc/a", b"1")
        lost = keeper.lease_id
        # Block the whole event loop, keep-alive task included, like a SIGSTOP or a long GC pause.
        time.sleep(TTL * 1.5)  # noqa: ASYNC251
        await asyncio.wait_for(keeper.wait_for_regrants(1), TIMEOUT)
        assert keeper.lease_id != lost
        assert await stores.other.get("svc/a") == b"1"
        assert not await stores.other.keep_alive(lost)
    finally:
        await keeper.revoke()


async def test_put_on_a_lost_lease_reregisters_at_once(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(10)  # the keep-alive task would not notice for seconds
    try:
        await keeper.put("svc/a", b"1")
        lost = keeper.lease_id
        await stores.other.revoke(lost)
        await keeper.put("svc/b", b"2")
        assert keeper.regrants == 1
        assert await stores.other.get_prefix("svc/") == [
            KeyValue("svc/a", b"1", keeper.lease_id),
            KeyValue("svc/b", b"2", keeper.lease_id),
        ]
    finally:
        await keeper.revoke()


async def test_start_twice_is_an_error(stores: Stores) -> None:
    keeper = LeaseKeeper(stores.mine)
    await keeper.start(10)
    try:
        with pytest.raises(RuntimeError):
            await keeper.start(10)
    finally:
        await keeper.revoke()
