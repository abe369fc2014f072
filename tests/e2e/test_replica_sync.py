"""--router-replica-sync: two frontends over etcd + NATS count each other's routed load."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, DistStack, http, shared_prefix_hit_ratio, wait_instances, wait_until

pytestmark = pytest.mark.e2e

ROUTED = ("--router-mode", "kv", "--event-plane", "nats")


def _active_requests(url: str) -> int:
    """The sum of the router's active requests over every worker, from the frontend's /metrics."""
    _, _, body = http("GET", url + "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "turbine_router_active_requests":
            total += sum(s.value for s in family.samples if s.labels["model"] == MODEL)
    return int(total)


def _long_stream(url: str, i: int, tokens: int = 150) -> str:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = oai.completions.create(
        model=MODEL,
        prompt=f"A long tale number {i}",
        max_tokens=tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _wait_synced(watcher: str, sender: str) -> None:
    """Until `watcher` counts a request that `sender` routes. Replicas subscribe to each other once
    their model appears, and a request routed before that is never counted by the other: probe
    with short streams until one is seen, then let the last one end."""
    tries = 0

    def seen() -> bool:
        nonlocal tries
        tries += 1
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            probe = pool.submit(_long_stream, sender, -tries, 40)
            try:
                wait_until(lambda: _active_requests(watcher) == 1, 2)
                return True
            except AssertionError:
                return False
            finally:
                probe.result()

    wait_until(seen, 30)
    wait_until(lambda: _active_requests(watcher) == 0, 10)


def test_frontends_count_each_others_load(dist_stack: DistStack) -> None:
    _, a = dist_stack.frontend(*ROUTED, "--router-replica-sync")
    _, b = dist_stack.frontend(*ROUTED, "--router-replica-sync")
    _, lone = dist_stack.frontend(*ROUTED)  # the control: no sync, sees only its own load
    dist_stack.worker(
        "--engine", "mocker", "--num-workers", "2", "--speedup-ratio", "1", "--block-size", "16",
        "--event-plane", "nats",
    )  # fmt: skip
    for url in (a, b, lone):
        wait_instances(url, 2)
    _wait_synced(a, b)
    _wait_synced(b, a)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_long_stream, b, i) for i in range(6)]
        # Frontend a routed none of these, yet its router counts all six while they run.
        wait_until(lambda: _active_requests(a) == 6, 10)
        assert _active_requests(b) == 6
        assert _active_requests(lone) == 0
        assert all(s.result() for s in streams)
    wait_until(lambda: _active_requests(a) == 0, 10)

    # Failure test 5 with shared load: the shared-prefix workload split over both frontends hits
    # the cache as well as through one.
    one = shared_prefix_hit_ratio([a], "one")
    both = shared_prefix_hit_ratio([a, b], "both")
    print(f"hit ratio: one frontend {one:.3f}, two synced frontends {both:.3f}")
    assert one > 0.6
    assert both >= 0.9 * one, (one, both)


def test_replica_sync_needs_a_shared_event_plane(dist_stack: DistStack) -> None:
    proc, _ = dist_stack.frontend("--router-mode", "kv", "--router-replica-sync", wait=False)
    assert proc.wait(20) == 2
    assert "--router-replica-sync needs --event-plane nats" in proc.log()
