"""A Store backed by etcd v3, spoken through etcd's JSON gRPC gateway over HTTP (aiohttp).

Why the gateway: it is part of every etcd v3 server (no extra dependency beyond aiohttp), every
message is plain JSON (bytes base64, int64 as strings, zero values omitted), and a watch is one
long-lived streaming POST whose lines we parse ourselves, so revisions, compaction and reconnects
are fully under our control.

Watches: `get prefix` gives the snapshot and its revision R; the watch starts at R+1, so no change
falls between the two and none is seen twice. The watch remembers the last revision it delivered
(advanced by events and by progress notifications) and, when the stream breaks (etcd restarted, a
network blip), re-watches from the next revision after a backoff. If that revision was compacted
meanwhile, or the server's revision is behind ours (a new etcd with an empty data dir), the watch
re-reads the prefix and emits the difference to what its consumer was told as PUT/DELETE events.

Leases: etcd TTLs are whole seconds, so a TTL is rounded up (and etcd may raise it further to its
minimum, 1.5 election timeouts). etcd checks for expired leases about every 500 ms, so keys vanish
within about TTL + 0.5 s.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from turbine.runtime.discovery.base import KeyValue, WatchEvent, WatchKind
from turbine.runtime.lifecycle import Closing

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 3.0
_GRPC_NOT_FOUND = 5


class EtcdError(Exception):
    """etcd answered a request with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix` (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _prefix_range(prefix: str) -> dict[str, str]:
    raw = prefix.encode()
    if not raw:
        return {"key": _b64(b"\0"), "range_end": _b64(b"\0")}
    return {"key": _b64(raw), "range_end": _b64(_prefix_range_end(raw))}


def _revision(msg: dict[str, Any]) -> int:
    return int(msg.get("header", {}).get("revision", 0))


def _kv(raw: dict[str, Any]) -> KeyValue:
    lease = int(raw.get("lease", 0))
    return KeyValue(_unb64(raw.get("key")).decode(), _unb64(raw.get("value")), lease or None)


@dataclass
class _Known:
    value: bytes
    mod_revision: int


class EtcdStore(Closing):
    """A `Store` on the etcd cluster at `endpoints` (comma-separated URLs; the next one is tried
    when one is unreachable). `put` raises LookupError for a lease that is gone. Watches re-connect
    on their own, with a backoff from `retry_delay_s` doubling up to `max_retry_delay_s`."""

    def __init__(
        self,
        endpoints: str = "http://127.0.0.1:2379",
        *,
        retry_delay_s: float = 0.05,
        max_retry_delay_s: float = 1.0,
    ) -> None:
        self._endpoints = [e.strip().rstrip("/") for e in endpoints.split(",") if e.strip()]
        if not self._endpoints:
            raise ValueError("no etcd endpoint given")
        for endpoint in self._endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError(f"etcd endpoint must be an http(s) URL, got {endpoint!r}")
        self._current = 0
        self._retry_delay_s = retry_delay_s
        self._max_retry_delay_s = max_retry_delay_s
        self._session: aiohttp.ClientSession | None = None
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._is_closed = False

    # ---------------------------------------------------------------------------------- leases

    async def grant_lease(self, ttl: float) -> int:
        self._check_open()
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        reply = await self._call("/v3/lease/grant", {"TTL": max(1, math.ceil(ttl))})
        return int(reply["ID"])

    async def keep_alive(self, lease_id: int) -> bool:
        self._check_open()
        reply = await self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        # A streaming call: the one answer is under "result"; a gone lease answers TTL 0 (omitted).
        result = reply.get("result", reply)
        return int(result.get("TTL", 0)) > 0

    async def revoke(self, lease_id: int) -> None:
        self._check_open()
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if e.code != _GRPC_NOT_FOUND:
                raise

    # ------------------------------------------------------------------------------------ keys

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        """Raises LookupError if `lease_id` names a lease that is gone (expired or revoked)."""
        self._check_open()
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(bytes(value))}
        if lease_id is not None:
            body["lease"] = str(lease_id)
        try:
            await self._call("/v3/kv/put", body)
        except EtcdError as e:
            if e.code == _GRPC_NOT_FOUND and lease_id is not None:
                raise LookupError(f"lease {lease_id:x} not found (expired or revoked)") from e
            raise

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        reply = await self._call("/v3/kv/range", {"key": _b64(key.encode())})
        kvs = reply.get("kvs") or []
        return _kv(kvs[0]).value if kvs else None

    async def get_prefix(self, prefix: str) -> list[KeyValue]:
        self._check_open()
        return (await self._range_prefix(prefix))[0]

    async def delete(self, key: str) -> None:
        self._check_open()
        await self._call("/v3/kv/deleterange", {"key": _b64(key.encode())})

    async def watch_prefix(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        # A task feeds the queue so that close() can end every watch, wherever its loop is waiting.
        queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self._watch_loop(prefix, queue), name=f"etcd-watch-{prefix}"
        )
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            if not task.done():
                task.cancel()
                # asyncio.wait rather than awaiting the task: our own cancellation must still propagate.
                await asyncio.wait({task})

    async def close(self) -> None:
        """Ends every open watch and closes the connections. The store is unusable afterwards."""
        if self._is_closed:
            return
        self._is_closed = True
        tasks = list(self._watch_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._is_closed:
            raise RuntimeError("EtcdStore is closed")

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=_CONNECT_TIMEOUT_S),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self._session

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary call; on a connection failure, tries each other endpoint once. A pooled
        connection that the server closed (etcd restarted) is retried once on a new connection
        (every call we make is safe to repeat: a lease granted twice expires unused)."""
        session = self._get_session()
        last: Exception | None = None
        for _ in range(len(self._endpoints) + 1):
            url = self._endpoints[self._current] + path
            try:
                async with session.post(
                    url, json=body, timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
                ) as resp:
                    raw = await resp.read()
            except aiohttp.ServerDisconnectedError as e:
                last = e
                continue
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                last = e
                self._current = (self._current + 1) % len(self._endpoints)
                continue
            msg = _decode(raw, url)
            error = msg.get("error")
            if error is not None or resp.status != 200:
                if isinstance(error, dict):  # streaming calls wrap their error
                    raise EtcdError(int(error.get("grpc_code", 2)), str(error.get("message", error)))
                raise EtcdError(int(msg.get("code", 2)), str(msg.get("message", error or resp.status)))
            return msg
        assert last is not None
        raise last

    async def _range_prefix(self, prefix: str) -> tuple[list[KeyValue], int, dict[str, int]]:
        """The live keys under `prefix` (sorted), the revision they were read at, and each key's
        mod revision."""
        reply = await self._call("/v3/kv/range", _prefix_range(prefix))
        kvs: list[KeyValue] = []
        mods: dict[str, int] = {}
        for raw in reply.get("kvs") or []:
            kv = _kv(raw)
            kvs.append(kv)
            mods[kv.key] = int(raw.get("mod_revision", 0))
        kvs.sort()
        return kvs, _revision(reply), mods

    async def _watch_loop(self, prefix: str, queue: asyncio.Queue[WatchEvent | None]) -> None:
        known: dict[str, _Known] = {}  # what the consumer was told
        revision: int | None = None  # every change up to here has been delivered
        delay = self._retry_delay_s
        try:
            while True:
                try:
                    if revision is None:
                        revision = await self._resync(prefix, known, queue)
                    await self._watch_from(prefix, revision, known, queue)
                except _Resync:
                    # Compacted, or the server went back in time: only a fresh read can tell us.
                    revision = None
                    continue
                except _StreamEnded as e:
                    revision = e.revision
                    if e.healthy:
                        delay = self._retry_delay_s
                    log.info(
                        "etcd watch on %r broke at revision %d (%s); re-watching in %.2fs",
                        prefix,
                        revision,
                        e.__cause__ or e,
                        delay,
                    )
                except (aiohttp.ClientError, TimeoutError, EtcdError) as e:
                    log.info(
                        "etcd watch on %r: cannot read the prefix (%s); retrying in %.2fs", prefix, e, delay
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_retry_delay_s)
        finally:
            queue.put_nowait(None)

    async def _resync(
        self, prefix: str, known: dict[str, _Known], queue: asyncio.Queue[WatchEvent | None]
    ) -> int:
        """Read the prefix and tell the consumer what changed since `known` (at first: everything)."""
        kvs, revision, mods = await self._range_prefix(prefix)
        live = {kv.key: _Known(kv.value, mods[kv.key]) for kv in kvs}
        for key in sorted(known.keys() - live.keys()):
            queue.put_nowait(WatchEvent(WatchKind.DELETE, key, None))
        for key, now in live.items():
            before = known.get(key)
            if before is None or before.mod_revision != now.mod_revision:
                queue.put_nowait(WatchEvent(WatchKind.PUT, key, now.value))
        known.clear()
        known.update(live)
        return revision

    async def _watch_from(
        self, prefix: str, revision: int, known: dict[str, _Known], queue: asyncio.Queue[WatchEvent | None]
    ) -> None:
        """Stream changes after `revision` until the stream breaks (raises `_StreamEnded` with the
        revision reached) or etcd says a fresh read is needed (raises `_Resync`)."""
        create: dict[str, Any] = {
            **_prefix_range(prefix),
            "start_revision": str(revision + 1),
            "progress_notify": True,
        }
        session = self._get_session()
        url = self._endpoints[self._current] + "/v3/watch"
        healthy = False  # the stream was established: the next retry need not back off
        try:
            async with session.post(url, json={"create_request": create}) as resp:
                if resp.status != 200:
                    raise _StreamEnded(revision, healthy, f"HTTP {resp.status}")
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if not line.strip():
                            continue
                        msg = _decode(line, url)
                        if "error" in msg:
                            raise _StreamEnded(revision, healthy, str(msg["error"]))
                        result = msg.get("result", {})
                        if result.get("compact_revision") or result.get("canceled"):
                            log.info("etcd watch on %r: revision %d compacted; re-reading", prefix, revision)
                            raise _Resync
                        if result.get("created"):
                            healthy = True
                            if _revision(result) < revision:
                                log.warning(
                                    "etcd is at revision %d, behind %d (a new cluster?); re-reading",
                                    _revision(result),
                                    revision,
                                )
                                raise _Resync
                            continue
                        events = result.get("events") or []
                        if events:
                            revision = _deliver(events, revision, known, queue)
                        else:
                            # A progress notification: every change up to its revision was delivered.
                            revision = max(revision, _revision(result))
        except (aiohttp.ClientError, TimeoutError, EtcdError) as e:
            if self._current_failed(e):
                self._current = (self._current + 1) % len(self._endpoints)
            raise _StreamEnded(revision, healthy, str(e)) from e
        raise _StreamEnded(revision, healthy, "stream closed")

    @staticmethod
    def _current_failed(error: Exception) -> bool:
        return isinstance(error, aiohttp.ClientConnectorError)


class _StreamEnded(Exception):
    """The watch stream ended after delivering every change up to `revision`."""

    def __init__(self, revision: int, healthy: bool, why: str) -> None:
        super().__init__(why)
        self.revision = revision
        self.healthy = healthy


class _Resync(Exception):
    """The watch cannot continue from its revision: re-read the prefix."""


def _deliver(
    events: list[dict[str, Any]],
    revision: int,
    known: dict[str, _Known],
    queue: asyncio.Queue[WatchEvent | None],
) -> int:
    """Tell the consumer about `events` (one watch response); returns the revision reached."""
    reached = revision
    for event in events:
        raw = event.get("kv", {})
        mod = int(raw.get("mod_revision", 0))
        if mod <= revision:
            continue  # already delivered before a reconnect
        reached = max(reached, mod)
        key = _unb64(raw.get("key")).decode()
        if event.get("type") == "DELETE":
            if known.pop(key, None) is not None:
                queue.put_nowait(WatchEvent(WatchKind.DELETE, key, None))
        else:
            before = known.get(key)
            if before is not None and before.mod_revision >= mod:
                continue
            value = _unb64(raw.get("value"))
            known[key] = _Known(value, mod)
            queue.put_nowait(WatchEvent(WatchKind.PUT, key, value))
    return reached


def _decode(raw: bytes, url: str) -> dict[str, Any]:
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise EtcdError(2, f"unreadable answer from {url}: {raw[:200]!r}") from e
    if not isinstance(msg, dict):
        raise EtcdError(2, f"unexpected answer from {url}: {raw[:200]!r}")
    return msg
