"""FileStore specifics: the on-disk layout, sharing a directory, garbage collection, cheap polls."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from pathlib import Path

import pytest

from turbine.runtime.discovery import file as file_module
from turbine.runtime.discovery.base import KeyValue, WatchEvent, WatchKind
from turbine.runtime.discovery.file import FileStore, default_file_store_path

pytestmark = pytest.mark.unit

TIMEOUT = 2.0


def test_default_path_is_per_user_under_the_temp_dir() -> None:
    path = default_file_store_path()
    assert path == Path(tempfile.gettempdir()) / f"turbine-{os.getuid()}" / "store"


async def test_creates_private_directories(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    store = FileStore(root)
    for path in (tmp_path / "a", root, root / "keys", root / "leases", root / "tmp"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    await store.close()


def test_refuses_a_world_writable_root(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(PermissionError):
        FileStore(root)


async def test_two_stores_on_one_directory_share_keys_and_watches(tmp_path: Path) -> None:
    a = FileStore(tmp_path, 0.02)
    b = FileStore(tmp_path, 0.02)
    watch = b.watch_prefix("k/")
    try:
        lease = await a.grant_lease(10)
        await a.put("k/1", b"from a", lease)
        assert await b.get("k/1") == b"from a"
        assert await b.get_prefix("k/") == [KeyValue("k/1", b"from a", lease)]
        assert await asyncio.wait_for(anext(watch), TIMEOUT) == WatchEvent(WatchKind.PUT, "k/1", b"from a")
        assert await b.keep_alive(lease)  # any process may keep a lease alive; owners do
        await b.revoke(lease)
        assert await a.get("k/1") is None
        assert await asyncio.wait_for(anext(watch), TIMEOUT) == WatchEvent(WatchKind.DELETE, "k/1", None)
    finally:
        await watch.aclose()
        await a.close()
        await b.close()


async def test_expired_leases_and_their_keys_are_collected(tmp_path: Path) -> None:
    crashed = FileStore(tmp_path)
    lease = await crashed.grant_lease(0.05)
    await crashed.put("w/1", b"x", lease)
    await crashed.put("w/2", b"y")
    (tmp_path / "tmp" / "left-by-a-killed-writer").write_bytes(b"")
    os.utime(tmp_path / "tmp" / "left-by-a-killed-writer", (0, 0))
    await asyncio.sleep(0.1)  # past the lease's TTL, with nobody sweeping: what is tested
    # Expired but not collected: already dead to readers.
    assert await crashed.get("w/1") is None
    assert len(os.listdir(tmp_path / "keys")) == 2

    newcomer = FileStore(tmp_path)
    kept = await newcomer.grant_lease(10)  # granting sweeps
    assert sorted(os.listdir(tmp_path / "leases")) == [f"{kept:016x}"]
    assert os.listdir(tmp_path / "keys") == ["w%2F2"]
    assert os.listdir(tmp_path / "tmp") == []


async def test_a_sweep_spares_a_key_re_put_under_a_live_lease(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    old = await store.grant_lease(0.05)
    await store.put("w/1", b"x", old)
    await asyncio.sleep(0.1)  # past the lease's TTL
    new = await store.grant_lease(10)  # sweeps `old` and w/1
    await store.put("w/1", b"x", new)
    await store.revoke(old)  # a late collector of `old` must not touch the re-put key
    assert await store.get_prefix("w/") == [KeyValue("w/1", b"x", new)]


async def test_idle_polls_read_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trust timestamps at once (fine on the nanosecond filesystems tests run on), so the racy
    # window after the last write does not hide whether idle polls really are cheap.
    monkeypatch.setattr(file_module, "_RACY_NS", 0)
    store = FileStore(tmp_path, 0.01)
    lease = await store.grant_lease(10)
    for i in range(20):
        await store.put(f"k/{i:02}", b"v", lease)
    reads: list[str] = []
    real_read_file = file_module._read_file

    def counting_read_file(path: str) -> tuple[file_module._FileSig, bytes] | None:
        reads.append(path)
        return real_read_file(path)

    monkeypatch.setattr(file_module, "_read_file", counting_read_file)
    watch = store.watch_prefix("k/")
    try:
        for _ in range(20):
            await asyncio.wait_for(anext(watch), TIMEOUT)
        snapshot_reads = len(reads)
        assert snapshot_reads == 21  # 20 keys + their one lease
        pending = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)  # ~20 polls
        assert reads[snapshot_reads:] == []
        await store.put("k/new", b"v", lease)
        event = await asyncio.wait_for(pending, TIMEOUT)
        assert event == WatchEvent(WatchKind.PUT, "k/new", b"v")
        # The put's own check of its lease, then the watch read only the new file (its lease cached).
        assert [Path(p).name for p in reads[snapshot_reads:]] == [f"{lease:016x}", "k%2Fnew"]
    finally:
        await watch.aclose()
        await store.close()


async def test_rejects_keys_that_cannot_be_file_names(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ValueError):
        await store.put("", b"x")
    with pytest.raises(ValueError):
        await store.put("k" * 300, b"x")
