"""KV events over NATS (`--event-plane nats`) with real processes, and a nats-server restart.

Two frontends share three mocker workers. Frontend A routes each prefix group's first request;
frontend B then routes the group's second one. B never routed that prefix, so its router can only
know where it is cached from the KV events that reached it over NATS (or a dump): B choosing A's
worker with a nonzero overlap proves the event plane works, before and after the restart.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances
from tests.nats_server import NatsServer

pytestmark = pytest.mark.e2e

BLOCK = 16
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
# The pipeline skips a worker that failed a request for 2 s; wait that out before asserting placement.
QUARANTINE_S = 2.2


class Client:
    """Completions against one frontend; remembers when a request last failed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.last_failure = float("-inf")

    def complete(self, prompt: str) -> tuple[str, int] | None:
        """(worker, overlap blocks), or None if the request failed (NATS still coming back)."""
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
        try:
            status, headers, _ = http(
                "POST", self.url + "/v1/completions", body, {"Content-Type": "application/json"}, timeout=10
            )
        except OSError:
            status, headers = 0, {}
        if status != 200:
            self.last_failure = time.monotonic()
            return None
        return headers["x-turbine-worker"], int(headers["x-turbine-overlap-blocks"])


def _prefix(rng: random.Random, group: str) -> str:
    return f"[group {group}] " + " ".join(rng.choice(WORDS) for _ in range(150))


def _settle(*clients: Client) -> None:
    wait = max(c.last_failure for c in clients) + QUARANTINE_S - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def _learned_over_nats(a: Client, b: Client, prefix: str) -> str | None:
    """A routes the prefix first; B, which never routed it, then picks A's worker from events: that
    worker, or None. B's request adds to B's own history, so a try that came too early (the event
    still on its way) is not repeated: the caller tries a new prefix."""
    first = a.complete(prefix + " first")
    if first is None:
        return None
    time.sleep(0.2)  # the stored event is on its way from the worker to B through NATS
    second = b.complete(prefix + " second")
    return first[0] if second is not None and second[0] == first[0] and second[1] >= 8 else None


def test_kv_routing_recovers_after_a_nats_restart(stack: Stack, nats_server: NatsServer) -> None:
    plane = ("--request-plane", "nats", "--event-plane", "nats", "--nats-server", nats_server.url)
    _, url_a = stack.frontend("--router-mode", "kv", *plane)
    _, url_b = stack.frontend("--router-mode", "kv", *plane)
    stack.worker(
        "--engine",
        "mocker",
        "--num-workers",
        "3",
        "--block-size",
        str(BLOCK),
        "--speedup-ratio",
        "50",
        *plane,
    )
    wait_instances(url_a, 3)
    wait_instances(url_b, 3)
    a, b = Client(url_a), Client(url_b)
    rng = random.Random(3)

    # Before the restart: B learns every group's holder from the events.
    holders: dict[str, str] = {}
    tries = 0
    deadline = time.monotonic() + 15
    while len(holders) < 3:
        assert time.monotonic() < deadline, f"B learned {len(holders)} of 3 groups in {tries} tries"
        prefix = _prefix(rng, f"old-{tries}")
        tries += 1
        holder = _learned_over_nats(a, b, prefix)
        if holder is not None:
            holders[prefix] = holder
    assert len(set(holders.values())) >= 2  # spread by load, so landing on the holder is not luck

    nats_server.restart()  # same port: every process reconnects to the same URL
    restarted = time.monotonic()

    # Requests succeed again (both frontends' request planes reconnect), then, once no worker is
    # quarantined for a failure during the outage, a new group's events reach B again.
    deadline = restarted + 15
    while a.complete("ping a") is None or b.complete("ping b") is None:
        assert time.monotonic() < deadline, "requests still failing after the NATS restart"
        time.sleep(0.1)
    _settle(a, b)
    probes = 0
    while not _learned_over_nats(a, b, _prefix(rng, f"new-{probes}")):
        probes += 1
        assert time.monotonic() < deadline, "KV events never reached frontend B after the NATS restart"
        _settle(a, b)
    assert time.monotonic() - restarted < 10

    # What B knew before the restart still routes each old group to its holder.
    _settle(a, b)
    for prefix, holder in holders.items():
        again = b.complete(prefix + " after the restart")
        assert again is not None and again == (holder, again[1]) and again[1] >= 8, (holder, again)
