"""Which requests a router counts on behalf of its peer replicas, and when to stop counting them.

A peer's requests are counted under `"{replica:x}/{request_id}"`, so they never collide with this
replica's own ids. The bookkeeping here decides what to drop: requests a peer's heartbeat no longer
lists (their `Finished` was lost), and every request of a peer that has been silent for
`expiry_s` (its process died; nobody will ever finish them). Pure; the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def peer_key(replica: int, request_id: str) -> str:
    return f"{replica:x}/{request_id}"


class PeerRequests:
    def __init__(self, expiry_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if expiry_s <= 0:
            raise ValueError(f"expiry_s must be positive, got {expiry_s}")
        self._expiry_s = expiry_s
        self._clock = clock
        self._keys: dict[int, set[str]] = {}
        self._last_seen: dict[int, float] = {}

    def seen(self, replica: int) -> None:
        """The replica spoke (any message): it is alive."""
        self._last_seen[replica] = self._clock()
        if replica not in self._keys:
            self._keys[replica] = set()

    def add(self, replica: int, request_id: str) -> str:
        key = f"{replica:x}/{request_id}"  # peer_key, inlined: it runs for every peer request
        keys = self._keys.get(replica)
        if keys is None:
            keys = self._keys[replica] = set()
        keys.add(key)
        return key

    def discard(self, replica: int, request_id: str) -> str:
        key = f"{replica:x}/{request_id}"
        keys = self._keys.get(replica)
        if keys is not None:
            keys.discard(key)
        return key

    def reconcile(self, replica: int, active: Iterable[str]) -> list[str]:
        """The replica's heartbeat lists `active`; returns (and forgets) the keys it no longer has."""
        keys = self._keys.get(replica)
        if not keys:
            return []
        still = {peer_key(replica, rid) for rid in active}
        stale = [k for k in keys if k not in still]
        keys.difference_update(stale)
        return stale

    def expire(self) -> list[str]:
        """Forget replicas silent for `expiry_s`; returns the keys of their requests."""
        deadline = self._clock() - self._expiry_s
        dead = [r for r, t in self._last_seen.items() if t < deadline]
        keys: list[str] = []
        for replica in dead:
            del self._last_seen[replica]
            keys.extend(self._keys.pop(replica, ()))
        return keys

    @property
    def replicas(self) -> list[int]:
        return sorted(self._last_seen)

    def __len__(self) -> int:
        """Peer requests currently counted."""
        return sum(len(k) for k in self._keys.values())
