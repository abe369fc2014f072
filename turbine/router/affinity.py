"""Session affinity (`--router-session-affinity-ttl-secs`): a session's requests go to one worker.

A session (the `x-session-id` header, else the request's `user` field) is bound to the worker its
first request was routed to. The binding lives `ttl_s` past its last use (each use refreshes it), so
an idle conversation lets go of its worker and a busy one keeps the KV cache it built there.

Modes: `hard` — the bound worker is a constraint: requests wait for it (or get 503) while it is
busy, and only rebind when it leaves discovery. `soft` — a strong preference: a busy bound worker
is passed over and the session rebinds to wherever the router sends it.

Bindings are shared between frontends (`--router-replica-sync`): a replica tells the others
whenever it binds a session anew or to another worker, and again when half the TTL has passed
since it last told them, so a session stays bound everywhere while any replica keeps using it.

Pure; the clock is injected. Expired bindings are swept lazily (a bounded amount per call).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from turbine.choices import AFFINITY_MODES

# Each bind sweeps at most this many expired bindings, so memory follows the live sessions.
_SWEEP = 8


@dataclass(frozen=True)
class AffinitySettings:
    ttl_s: float
    mode: str = "soft"

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {self.ttl_s}")
        if self.mode not in AFFINITY_MODES:
            raise ValueError(f"unknown affinity mode {self.mode!r}")

    @property
    def hard(self) -> bool:
        return self.mode == "hard"


class _Binding:
    __slots__ = ("expires", "told", "worker")

    def __init__(self, worker: int, expires: float, told: float) -> None:
        self.worker = worker
        self.expires = expires
        self.told = told
        """When peers were last told of this binding (-inf: never)."""


class Bound(NamedTuple):
    """The result of `bind`: whether peers must hear of it."""

    worker: int
    announce: bool


class SessionBindings:
    def __init__(self, settings: AffinitySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        # Ordered by last refresh (oldest first), so expired ones are found at the front.
        self._bindings: OrderedDict[str, _Binding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bindings)

    def lookup(self, session: str) -> int | None:
        """The worker `session` is bound to, if the binding is fresh."""
        binding = self._bindings.get(session)
        if binding is None:
            return None
        if binding.expires <= self._clock():
            del self._bindings[session]
            return None
        return binding.worker

    def bind(self, session: str, worker: int) -> Bound:
        """Bind (or rebind, or refresh) `session` to `worker` for another TTL."""
        now = self._clock()
        ttl = self.settings.ttl_s
        binding = self._bindings.pop(session, None)
        if binding is not None and binding.worker == worker and now - binding.told < ttl / 2:
            announce, told = False, binding.told
        else:
            announce, told = True, now
        self._bindings[session] = _Binding(worker, now + ttl, told)
        self._sweep(now)
        return Bound(worker, announce)

    def bind_from_peer(self, session: str, worker: int) -> None:
        """A peer replica bound `session`: adopt it, fresh for a TTL (peers are told nothing back)."""
        now = self._clock()
        self._bindings.pop(session, None)
        self._bindings[session] = _Binding(worker, now + self.settings.ttl_s, now)
        self._sweep(now)

    def remove_worker(self, worker: int) -> None:
        """The worker left: its sessions rebind on their next request."""
        for session in [s for s, b in self._bindings.items() if b.worker == worker]:
            del self._bindings[session]

    def _sweep(self, now: float) -> None:
        for _ in range(_SWEEP):
            if not self._bindings:
                return
            session, oldest = next(iter(self._bindings.items()))
            if oldest.expires > now:
                return
            del self._bindings[session]
