"""A Store in a directory shared by the processes of one machine (no etcd needed).

Layout under `root` (every directory mode 0o700, every file written to `tmp/` then renamed into place,
so a reader sees a whole old or a whole new file, never a torn one):

    leases/{lease_id:016x}   msgpack [ttl, expires_at]: wall-clock (`time.time()`) expiry, because
                             monotonic clocks restart at boot and stale files can outlive a reboot
    keys/{encoded key}       msgpack [value, lease_id | None]
    tmp/                     files being written; leftovers of killed writers are swept after a minute
    lock                     flock'ed around every mutation that must not interleave with another

A key is live iff it has no lease, or its lease file exists and is unexpired. Expiry therefore needs
no writer: a SIGKILLed process's keys die when its lease runs out, whoever looks. A dead lease stays
dead (keep_alive refuses expired leases and ids are random), which makes garbage collection safe:
any process may sweep dead leases and their keys, re-checking each victim under the lock so that a
key re-put with a live lease in the meantime survives.

Keys are percent-encoded into file names (`.` too, so no name is `.`, `..` or hidden), a per-character
mapping, so a key prefix is a file-name prefix.

Watches poll (see `_FileWatch`), so changes between two polls coalesce: a watcher sees the latest
value of a key, not every intermediate one, and a re-put of an identical value is not a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import stat
import tempfile
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

import msgspec

from turbine.runtime.discovery.base import KeyValue, WatchEvent, WatchKind
from turbine.runtime.lifecycle import Closing

log = logging.getLogger(__name__)

# Directory and file timestamps are only trusted to reveal a change once they are this much older than
# the moment we looked: a later write in the same timestamp granule (jiffy-coarse on Linux, 1 s on the
# coarsest filesystems a temp dir lives on) would otherwise leave them unchanged. Cost of a larger
# value: a watcher keeps re-listing the directory for this long after each change.
_RACY_NS = 1_000_000_000
# A watch whose directory holds more entries than this polls in a worker thread, not on the loop.
_INLINE_SCAN_LIMIT = 256
_TMP_MAX_AGE_S = 60.0
_NAME_MAX = 255


class _KeyRecord(msgspec.Struct, array_like=True, frozen=True):
    value: bytes
    lease: int | None


class _LeaseRecord(msgspec.Struct, array_like=True, frozen=True):
    ttl: float
    expires_at: float


_KEY_DECODER = msgspec.msgpack.Decoder(_KeyRecord)
_LEASE_DECODER = msgspec.msgpack.Decoder(_LeaseRecord)


def default_file_store_path() -> Path:
    """The per-user store directory under the temp dir that processes use unless told otherwise."""
    return Path(tempfile.gettempdir()) / f"turbine-{os.getuid()}" / "store"


def _encode_prefix(prefix: str) -> str:
    return quote(prefix, safe="").replace(".", "%2E")


def _encode_key(key: str) -> str:
    if not key:
        raise ValueError("keys must be non-empty")
    name = _encode_prefix(key)
    if len(name) > _NAME_MAX:
        raise ValueError(f"key too long for a file name once encoded ({len(name)} > {_NAME_MAX}): {key!r}")
    return name


def _lease_name(lease_id: int) -> str:
    return f"{lease_id:016x}"


def _parse_lease_name(name: str) -> int | None:
    if len(name) != 16:
        return None
    try:
        return int(name, 16)
    except ValueError:
        return None


def _make_private_dirs(root: Path) -> None:
    # Path.mkdir(parents=True) gives parents the umask's mode; every level we create must be private.
    missing: list[Path] = []
    path = root
    while not path.exists():
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process got there first
            path.mkdir(mode=0o700)
    st = root.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Whoever can write here can announce fake workers to our frontends.
        raise PermissionError(f"{root} must be owned by uid {os.getuid()} and not group/world-writable")
    for sub in ("leases", "keys", "tmp"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)


class FileStore(Closing):
    """A `Store` in directory `root`, shared with every other FileStore on the same directory.

    `put` raises LookupError for a lease that is gone. Watches notice changes within about
    `poll_interval_s`, and lease expiry within `poll_interval_s` of the deadline.
    """

    def __init__(self, root: Path, poll_interval_s: float = 0.1) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self._root = root
        self._poll_interval_s = poll_interval_s
        _make_private_dirs(root)
        self._keys_dir = str(root / "keys")
        self._leases_dir = str(root / "leases")
        self._tmp_dir = str(root / "tmp")
        self._lock_path = str(root / "lock")
        self._closed = False

    @property
    def root(self) -> Path:
        return self._root

    # ---------------------------------------------------------------------------------- leases

    async def grant_lease(self, ttl: float) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        tmp = self._write_tmp(msgspec.msgpack.encode(_LeaseRecord(ttl, time.time() + ttl)))
        try:
            while True:
                lease_id = secrets.randbits(63)
                try:
                    # link, unlike replace, fails if the name exists: the id is ours alone.
                    os.link(tmp, self._lease_path(lease_id))
                    break
                except FileExistsError:
                    continue
        finally:
            _unlink_quietly(tmp)
        # A new process is a natural moment to clear what crashed ones left behind.
        await asyncio.to_thread(self._sweep_quietly)
        return lease_id

    async def keep_alive(self, lease_id: int) -> bool:
        self._check_open()
        path = self._lease_path(lease_id)
        with self._locked():
            lease = _read_lease(path)
            now = time.time()
            if lease is None or now >= lease.expires_at:
                return False
            # Under the lock, so a collector that judged this lease expired cannot be overtaken by
            # a rewrite that would resurrect it without its keys.
            self._replace(msgspec.msgpack.encode(_LeaseRecord(lease.ttl, now + lease.ttl)), path)
        return True

    async def revoke(self, lease_id: int) -> None:
        self._check_open()
        # The lease file goes first: that kills every key of the lease at once for every reader;
        # the sweep then only reclaims the files (and a crash before it leaves nothing live).
        with self._locked():
            _unlink_quietly(self._lease_path(lease_id))
        await asyncio.to_thread(self._sweep_quietly)

    # ------------------------------------------------------------------------------------ keys

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        """Raises LookupError if `lease_id` names a lease that is gone (expired or revoked)."""
        self._check_open()
        path = self._key_path(_encode_key(key))
        tmp = self._write_tmp(msgspec.msgpack.encode(_KeyRecord(bytes(value), lease_id)))
        try:
            with self._locked():
                # Checked under the lock, so no sweep can collect the lease between check and rename.
                if lease_id is not None and not _lease_alive(_read_lease(self._lease_path(lease_id))):
                    raise LookupError(f"lease {lease_id:x} not found (expired or revoked)")
                os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        read = _read_key(self._key_path(_encode_key(key)))
        if read is None:
            return None
        record = read[1]
        if record.lease is not None and not _lease_alive(_read_lease(self._lease_path(record.lease))):
            return None
        return record.value

    async def get_prefix(self, prefix: str) -> list[KeyValue]:
        self._check_open()
        return self._get_prefix(prefix)

    async def delete(self, key: str) -> None:
        self._check_open()
        # No lock: a delete racing a put is last-writer-wins either way.
        _unlink_quietly(self._key_path(_encode_key(key)))

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        watch = _FileWatch(self, prefix)
        # The snapshot reads every matching file: off the loop. (If the consumer goes away while a
        # poll runs in a thread, the thread finishes on its own and its result is dropped.)
        events, _ = await asyncio.to_thread(watch.poll)
        for event in events:
            yield event
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if self._closed:
                return
            if watch.entries > _INLINE_SCAN_LIMIT:
                events, found_dead = await asyncio.to_thread(watch.poll)
            else:
                events, found_dead = watch.poll()
            for event in events:
                yield event
            if found_dead:
                # After delivering: collecting the dead lease's files must not delay the DELETEs.
                await asyncio.to_thread(self._sweep_quietly)

    async def close(self) -> None:
        """Open watches end at their next poll. Files stay: other processes share them."""
        self._closed = True

    # -------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("FileStore is closed")

    def _key_path(self, name: str) -> str:
        return os.path.join(self._keys_dir, name)

    def _lease_path(self, lease_id: int) -> str:
        return os.path.join(self._leases_dir, _lease_name(lease_id))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A fresh descriptor per acquisition: flock excludes other open file descriptions, so this
        # also excludes our own sweep threads and other FileStores in this process. Held for
        # microseconds, and never across an await.
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock; so does the kernel if this process dies

    def _write_tmp(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=self._tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def _replace(self, data: bytes, path: str) -> None:
        tmp = self._write_tmp(data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _get_prefix(self, prefix: str) -> list[KeyValue]:
        encoded = _encode_prefix(prefix)
        leases: dict[int, bool] = {}
        out: list[KeyValue] = []
        for name in _list_dir(self._keys_dir):
            if not name.startswith(encoded):
                continue
            read = _read_key(self._key_path(name))
            if read is None:
                continue
            record = read[1]
            lease = record.lease
            if lease is not None:
                if lease not in leases:
                    leases[lease] = _lease_alive(_read_lease(self._lease_path(lease)))
                if not leases[lease]:
                    continue
            out.append(KeyValue(unquote(name), record.value, lease))
        out.sort()
        return out

    def _sweep_quietly(self) -> None:
        try:
            self._sweep()
        except OSError:
            # Housekeeping only: liveness never depends on files having been collected.
            log.warning("could not garbage-collect the discovery store at %s", self._root, exc_info=True)

    def _sweep(self) -> None:
        """Delete the files of dead leases and their keys. Safe against concurrent sweeps and puts."""
        now = time.time()
        dead: dict[int, bool] = {}

        def is_dead(lease_id: int) -> bool:
            if lease_id not in dead:
                lease = _read_lease(self._lease_path(lease_id))
                # Judged against the sweep's start: a lease dead then is dead forever.
                dead[lease_id] = lease is None or now >= lease.expires_at
            return dead[lease_id]

        for name in _list_dir(self._keys_dir):
            path = self._key_path(name)
            read = _read_key(path)
            if read is None or read[1].lease is None or not is_dead(read[1].lease):
                continue
            with self._locked():
                # Re-read: the key may have been re-put under a live lease since we looked.
                again = _read_key(path)
                if again is not None and again[1].lease == read[1].lease:
                    _unlink_quietly(path)
        for name in _list_dir(self._leases_dir):
            lease_id = _parse_lease_name(name)
            if lease_id is not None and is_dead(lease_id):
                with self._locked():
                    _unlink_quietly(os.path.join(self._leases_dir, name))
        for name in _list_dir(self._tmp_dir):
            path = os.path.join(self._tmp_dir, name)
            with contextlib.suppress(FileNotFoundError):
                if now - os.stat(path).st_mtime > _TMP_MAX_AGE_S:
                    _unlink_quietly(path)


class _FileSig(NamedTuple):
    ino: int
    mtime_ns: int
    size: int


class _Seen(NamedTuple):
    sig: _FileSig
    # Whether `sig` was old enough, when read, that an unchanged sig proves unchanged content.
    trusted: bool
    record: _KeyRecord


class _FileWatch:
    """The state of one watch: what it last saw on disk and what it last told its consumer.

    A poll is cheap when nothing changed: one stat of the keys directory (renames into it move its
    mtime) plus a look at the few leases whose cached expiry has passed. Only then does it list the
    directory, and it reads only files whose (inode, mtime, size) changed. Expiry changes nothing on
    disk, so the watch caches each referenced lease's expiry and re-reads the lease file when that
    moment passes: either it was kept alive (new expiry) or its keys are now DELETEd.
    """

    def __init__(self, store: FileStore, prefix: str) -> None:
        self._store = store
        self._prefix = _encode_prefix(prefix)
        self._dir_sig: tuple[int, int] | None = None
        self._dir_trusted = False
        self._files: dict[str, _Seen] = {}
        self._lease_expiry: dict[int, float] = {}  # leases alive when last read
        self._dead_leases: set[int] = set()
        self._live: dict[str, bytes] = {}  # what the consumer was told, by file name
        self.entries = 0

    def poll(self) -> tuple[list[WatchEvent], bool]:
        """The events since the last poll (the snapshot, the first time), and whether a lease died."""
        now_ns = time.time_ns()
        now = now_ns / 1e9
        found_dead = False
        for lease_id, expires_at in list(self._lease_expiry.items()):
            if expires_at <= now:
                lease = _read_lease(self._store._lease_path(lease_id))
                if lease is not None and now < lease.expires_at:
                    self._lease_expiry[lease_id] = lease.expires_at
                else:
                    del self._lease_expiry[lease_id]
                    self._dead_leases.add(lease_id)
                    found_dead = True
        st = os.stat(self._store._keys_dir)
        dir_sig = (st.st_ino, st.st_mtime_ns)
        if dir_sig != self._dir_sig or not self._dir_trusted:
            self._rescan(now_ns)
            # The stat came before the listing, so a change after the listing moves the mtime —
            # unless it lands in the same timestamp granule, which only a recent mtime allows.
            self._dir_sig = dir_sig
            self._dir_trusted = now_ns - st.st_mtime_ns > _RACY_NS
        elif not found_dead:
            return [], False
        return self._diff(now), found_dead

    def _rescan(self, now_ns: int) -> None:
        store = self._store
        files: dict[str, _Seen] = {}
        entries = 0
        with os.scandir(store._keys_dir) as it:
            for entry in it:
                entries += 1
                name = entry.name
                if not name.startswith(self._prefix):
                    continue
                old = self._files.get(name)
                if old is not None and old.trusted:
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if _FileSig(st.st_ino, st.st_mtime_ns, st.st_size) == old.sig:
                        files[name] = old
                        continue
                read = _read_key(store._key_path(name))
                if read is None:
                    continue
                sig, record = read
                # Files are never modified in place, only replaced, so a changed sig means new
                # content — and an unchanged one too unless a reused inode got the same timestamp.
                files[name] = _Seen(sig, now_ns - sig.mtime_ns > _RACY_NS, record)
        self._files = files
        self.entries = entries
        # Forget leases no file refers to any more, or the caches would grow without bound.
        referenced = {seen.record.lease for seen in files.values() if seen.record.lease is not None}
        self._lease_expiry = {lid: exp for lid, exp in self._lease_expiry.items() if lid in referenced}
        self._dead_leases &= referenced

    def _lease_alive(self, lease_id: int, now: float) -> bool:
        if lease_id in self._dead_leases:
            return False
        if lease_id in self._lease_expiry:  # poll() refreshed every cached expiry that had passed
            return True
        lease = _read_lease(self._store._lease_path(lease_id))
        if lease is None or now >= lease.expires_at:
            self._dead_leases.add(lease_id)
            return False
        self._lease_expiry[lease_id] = lease.expires_at
        return True

    def _diff(self, now: float) -> list[WatchEvent]:
        live: dict[str, bytes] = {}
        for name, seen in self._files.items():
            lease = seen.record.lease
            if lease is None or self._lease_alive(lease, now):
                live[name] = seen.record.value
        events: list[WatchEvent] = []
        for name in sorted(live.keys() | self._live.keys()):
            value = live.get(name)
            if value is None:
                events.append(WatchEvent(WatchKind.DELETE, unquote(name), None))
            elif self._live.get(name) != value:
                events.append(WatchEvent(WatchKind.PUT, unquote(name), value))
        self._live = live
        return events


# ------------------------------------------------------------------------------ file helpers
# Every helper tolerates FileNotFoundError: another process may delete anything at any moment.


def _list_dir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _read_file(path: str) -> tuple[_FileSig, bytes] | None:
    try:
        with open(path, "rb") as f:
            # fstat of the open file, so the signature belongs to exactly the bytes we read.
            st = os.fstat(f.fileno())
            return _FileSig(st.st_ino, st.st_mtime_ns, st.st_size), f.read()
    except FileNotFoundError:
        return None


def _read_key(path: str) -> tuple[_FileSig, _KeyRecord] | None:
    read = _read_file(path)
    if read is None:
        return None
    try:
        return read[0], _KEY_DECODER.decode(read[1])
    except msgspec.DecodeError:
        log.warning("ignoring unreadable discovery key file %s", path)
        return None


def _read_lease(path: str) -> _LeaseRecord | None:
    read = _read_file(path)
    if read is None:
        return None
    try:
        return _LEASE_DECODER.decode(read[1])
    except msgspec.DecodeError:
        # Only ever written whole, so this is not a torn write: treat the lease as gone.
        log.warning("ignoring unreadable discovery lease file %s", path)
        return None


def _lease_alive(lease: _LeaseRecord | None) -> bool:
    return lease is not None and time.time() < lease.expires_at
