"""Session affinity through the openai client: x-session-id (or `user`) sticks to one worker; hard
mode rebinds when the worker leaves and waits for it while busy, soft mode moves off a busy worker;
bindings made by one frontend hold on another with --router-replica-sync."""

from __future__ import annotations

import concurrent.futures
import random
import signal

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, DistStack, Stack, http, wait_instances, wait_until

pytestmark = pytest.mark.e2e

MOCKER = ("--engine", "mocker", "--block-size", "16")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _worker(
    oai: openai.OpenAI, session: str | None = None, user: str | None = None, prompt: str = "hi"
) -> str:
    """Send one chat request; the worker it went to (the x-turbine-worker response header)."""
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=2,
        extra_headers={"x-session-id": session} if session else None,
        user=user if user else openai.omit,
    )
    assert raw.parse().choices[0].finish_reason is not None
    return str(raw.headers["x-turbine-worker"])


def test_sessions_stick_to_their_worker_and_rebind_when_it_leaves(stack: Stack) -> None:
    _, url = stack.frontend(
        "--router-session-affinity-ttl-secs", "30", "--router-session-affinity-mode", "hard"
    )
    first = stack.worker(*MOCKER)
    stack.worker(*MOCKER)
    wait_instances(url, 2)
    oai = _client(url)

    sessions = [f"conversation-{i}" for i in range(4)]
    bound = {s: _worker(oai, s) for s in sessions}
    assert len(set(bound.values())) == 2  # round-robin placed the new sessions on both workers
    for _ in range(3):
        for s in sessions:
            assert _worker(oai, s) == bound[s]
            _worker(oai)  # unbound traffic in between moves the round-robin along
    # Without the header, the request's `user` field is the session; with it, the header wins.
    alice = _worker(oai, user="alice")
    assert all(_worker(oai, user="alice") == alice for _ in range(3))
    other = next(s for s in sessions if bound[s] != alice)
    assert _worker(oai, session=other, user="alice") == bound[other]

    # A worker leaves: the hard-bound sessions it held rebind to the survivor and stick there.
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0
    wait_instances(url, 1)
    survivor = _worker(oai)
    assert {s for s in sessions if bound[s] != survivor}  # some sessions lost their worker
    for _ in range(2):
        assert all(_worker(oai, s) == survivor for s in sessions)


def _bindings(url: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "turbine_router_session_bindings":
            return sum(s.value for s in family.samples if s.labels["model"] == MODEL)
    return -1.0


def _prefill_load(url: str, worker: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "turbine_router_active_prefill_tokens":
            for sample in family.samples:
                if sample.labels["worker"] == worker:
                    return sample.value
    return 0.0


def test_soft_affinity_yields_to_load_and_hard_affinity_waits(stack: Stack) -> None:
    routing = ("--router-mode", "least-loaded", "--router-queue-threshold", "0.25")
    affinity = ("--router-session-affinity-ttl-secs", "30", "--router-session-affinity-mode")
    _, soft = stack.frontend(*routing, *affinity, "soft")
    _, hard = stack.frontend(*routing, *affinity, "hard")
    # Two workers whose step budget is 4096 tokens: busy while more than 1024 prompt tokens wait
    # for their first token; a 1500-token prompt keeps one busy for about a second. Each frontend
    # counts only the load it routed, so the two are tried one after the other.
    stack.worker(*MOCKER, "--num-workers", "2", "--speedup-ratio", "0.1", "--max-num-batched-tokens", "4096")
    for url in (soft, hard):
        wait_instances(url, 2)
    for url in (soft, hard):
        oai = _client(url)
        home = _worker(oai, "s")
        rng = random.Random(url)
        long_prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(1500))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(_worker, oai, "s", None, long_prompt)
            wait_until(lambda: _prefill_load(url, home) > 1024, 10)  # noqa: B023 - used at once
            during = _worker(oai, "s")
            assert long.result() == home  # the session's worker was not busy yet
        after = _worker(oai, "s")
        if url == soft:
            assert during != home and after == during  # load overrode the binding, which moved
        else:
            assert during == home and after == home  # waited in the router queue for its worker


def test_bindings_are_shared_between_frontends(dist_stack: DistStack) -> None:
    flags = (
        "--router-session-affinity-ttl-secs", "30", "--router-replica-sync", "--event-plane", "nats",
    )  # fmt: skip
    _, a = dist_stack.frontend(*flags)
    _, b = dist_stack.frontend(*flags)
    dist_stack.worker(*MOCKER, "--num-workers", "4", "--event-plane", "nats")
    wait_instances(a, 4)
    wait_instances(b, 4)
    oa, ob = _client(a), _client(b)
    # Replicas subscribe to each other once their model appears, and a binding made before that
    # never reaches the other: bind probe sessions on a until b has one.
    probes = 0

    def probed() -> bool:
        nonlocal probes
        probes += 1
        _worker(oa, f"probe-{probes}")
        try:
            wait_until(lambda: _bindings(b) >= 1, 2)
            return True
        except AssertionError:
            return False

    wait_until(probed, 30)
    base_a, base_b = _bindings(a), _bindings(b)
    # Each probe moved a's round-robin along: put b's a step (mod 4) away from a's.
    for _ in range(2 if probes % 4 == 1 else 1):
        _worker(ob)
    sessions = [f"shared-{i}" for i in range(4)]
    bound = {s: _worker(oa, s) for s in sessions}
    assert len(set(bound.values())) == 4
    # Bindings travel on the event plane; b adopts them, then routes each session where a bound it.
    wait_until(lambda: _bindings(b) == base_b + 4, 5)
    for _ in range(2):
        assert {s: _worker(ob, s) for s in sessions} == bound
    assert _bindings(a) == base_a + 4
