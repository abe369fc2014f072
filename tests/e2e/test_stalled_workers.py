"""Stalled processes: a worker frozen with SIGSTOP or cut off by a silent network, a frontend frozen
the same way, a worker that leaves discovery with streams open. Detected by the request plane's
heartbeats (`--request-stall-timeout-s`) or by discovery, moved by `--migration-limit`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import openai
import pytest

from tests.e2e.conftest import MODEL, Proc, Stack, first_tokens, http, metric_sum, wait_instances, wait_until
from tests.e2e.tcp_proxy import FreezableProxy
from turbine.protocol.instance import Instance, instances_prefix
from turbine.protocol.kv_events import KV_EVENTS_ENDPOINT, LoadMetrics, WorkerEvent
from turbine.runtime.discovery.file import FileStore
from turbine.runtime.transport.base import RequestPlaneClient
from turbine.runtime.transport.tcp import TcpRequestClient

pytestmark = pytest.mark.e2e

STALL_S = 1.5
# Heartbeats are checked every 0.25 s, and two cores run every process of the test.
SLACK_S = 2.0
STALL = ("--request-stall-timeout-s", str(STALL_S))
WORKER = ("--engine", "mocker", "--speedup-ratio", "1", "--block-size", "16", *STALL)
# Leases that outlive each test: only the request plane's liveness can tell a frozen worker.
LONG_TTL = 120.0


class Timed(msgspec.Struct):
    text: str
    finish: str | None
    tokens: int
    seconds: float
    first_token_s: float


def _stream(oai: openai.OpenAI, i: int, max_tokens: int = 128, prompt: str | None = None) -> Timed:
    started = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    finish = None
    tokens = -1
    for chunk in oai.completions.create(
        model=MODEL,
        prompt=prompt or f"Tell story number {i} about a lighthouse keeper",
        max_tokens=max_tokens,
        seed=i,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            if first is None and chunk.choices[0].text:
                first = time.monotonic() - started
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    elapsed = time.monotonic() - started
    return Timed("".join(parts), finish, tokens, elapsed, elapsed if first is None else first)


def _metric(url: str, name: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


@pytest.fixture
def frozen() -> Iterator[list[Proc]]:
    """Processes a test stops with SIGSTOP: always continued afterwards, whatever happened."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.signal(signal.SIGCONT)


def _under_load(url: str, freeze: object) -> tuple[list[Timed], list[Timed]]:
    """24 streams of 128 tokens; once all are under way, `freeze()`; right after, 20 short new requests."""
    oai = _client(url)
    with concurrent.futures.ThreadPoolExecutor(44) as pool:
        streams = [pool.submit(_stream, oai, i) for i in range(24)]
        wait_until(lambda: metric_sum(url, "turbine_inflight_requests") == 24, 30)
        freeze()  # type: ignore[operator]
        fresh = [pool.submit(_stream, oai, 100 + i, 8) for i in range(20)]
        return [f.result() for f in streams], [f.result() for f in fresh]


def _check_moved(url: str, results: list[Timed], fresh: list[Timed]) -> None:
    """Every stream completed, none later than the stall timeout plus its normal time (the same
    requests on the surviving worker alone, uninterrupted), with the same text; every new request
    within the stall timeout."""
    assert all(r.finish == "length" and r.tokens == 128 for r in results), results
    assert all(r.finish == "length" and r.tokens == 8 for r in fresh), fresh
    assert max(r.seconds for r in fresh) < STALL_S + SLACK_S, [r.seconds for r in fresh]
    assert _metric(url, "turbine_request_stalls_total") > 0
    assert _metric(url, "turbine_worker_quarantines_total") >= 1
    assert _metric(url, "turbine_quarantined_workers") == 1
    oai = _client(url)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        reference = list(pool.map(lambda i: _stream(oai, i), range(24)))
    assert [r.text for r in results] == [r.text for r in reference]
    normal = max(r.seconds for r in reference)
    assert max(r.seconds for r in results) < normal + STALL_S + SLACK_S, (
        [r.seconds for r in results],
        normal,
    )


def test_a_frozen_workers_streams_move_within_the_stall_timeout(stack: Stack, frozen: list[Proc]) -> None:
    _, url = stack.frontend("--migration-limit", "3", *STALL)
    victim = stack.worker(*WORKER, ttl=LONG_TTL)
    stack.worker(*WORKER, ttl=LONG_TTL)
    wait_instances(url, 2)
    frozen.append(victim)
    results, fresh = _under_load(url, lambda: victim.signal(signal.SIGSTOP))
    _check_moved(url, results, fresh)
    # Continued, it answers the frontend's probe and is routed to again, before its lease ran out.
    victim.signal(signal.SIGCONT)
    wait_until(lambda: _metric(url, "turbine_quarantined_workers") == 0, 10)
    assert "answers again" in stack.procs[0].log()


async def _instance_keys(store_path: object) -> list[tuple[str, Instance, int | None]]:
    store = FileStore(store_path)  # type: ignore[arg-type]
    try:
        kvs = await store.get_prefix(instances_prefix("test"))
        return [(kv.key, msgspec.msgpack.decode(kv.value, type=Instance), kv.lease_id) for kv in kvs]
    finally:
        await store.close()


async def _put(store_path: object, key: str, instance: Instance, lease_id: int | None) -> None:
    store = FileStore(store_path)  # type: ignore[arg-type]
    try:
        await store.put(key, msgspec.msgpack.encode(instance), lease_id)
    finally:
        await store.close()


def test_a_worker_behind_a_silent_network_is_treated_as_stalled(stack: Stack) -> None:
    """The worker stays up; the proxy in front of it stops forwarding without closing anything."""
    _, url = stack.frontend("--migration-limit", "3", *STALL)
    stack.worker(*WORKER, ttl=LONG_TTL)
    wait_instances(url, 1)
    ((key, instance, lease),) = asyncio.run(_instance_keys(stack.store))
    stack.worker(*WORKER, ttl=LONG_TTL)
    wait_instances(url, 2)
    host, _, port = instance.address.rpartition(":")
    proxy = FreezableProxy((host, int(port)))
    try:
        # The frontend reaches that worker only through the proxy from now on.
        asyncio.run(_put(stack.store, key, msgspec.structs.replace(instance, address=proxy.address), lease))
        oai = _client(url)
        wait_until(lambda: _stream(oai, 0, 1).finish == "length" and proxy.connections > 0, 10)
        results, fresh = _under_load(url, proxy.freeze)
        _check_moved(url, results, fresh)
        proxy.thaw()
        wait_until(lambda: _metric(url, "turbine_quarantined_workers") == 0, 10)
    finally:
        proxy.close()


def test_a_worker_leaving_discovery_has_its_streams_moved_at_once(stack: Stack, frozen: list[Proc]) -> None:
    """Liveness off: the lease expiring is what tells, and the streams move then (not never)."""
    _, url = stack.frontend("--migration-limit", "3", "--request-stall-timeout-s", "0")
    victim = stack.worker(*WORKER[:6], "--request-stall-timeout-s", "0", ttl=1.0)
    stack.worker(*WORKER[:6], "--request-stall-timeout-s", "0", ttl=1.0)
    wait_instances(url, 2)
    frozen.append(victim)
    oai = _client(url)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_stream, oai, i, 256) for i in range(16)]
        # Every stream has its first token: the victim holds streams under way, not requests in its socket.
        wait_until(lambda: first_tokens(url) == 16, 30)
        victim.signal(signal.SIGSTOP)
        results = [f.result() for f in futures]
    assert all(r.finish == "length" and r.tokens == 256 for r in results), results
    assert _metric(url, "turbine_migrations_total") > 0
    assert _metric(url, "turbine_request_stalls_total") == 0
    assert "left discovery: moving its" in stack.procs[0].log()


def test_a_request_queued_longer_than_the_stall_timeout_is_not_cut(stack: Stack) -> None:
    """One sequence at a time: the second request waits behind the first for longer than the stall
    timeout, and the heartbeats hold it (no migration allowed, no stall counted)."""
    _, url = stack.frontend(*STALL)
    stack.worker(*WORKER, "--max-num-seqs", "1", ttl=LONG_TTL)
    wait_instances(url, 1)
    oai = _client(url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(_stream, oai, 1, 400)
        wait_until(lambda: first_tokens(url) == 1, 30)  # it holds the one sequence slot
        queued = pool.submit(_stream, oai, 2, 8, "A long prompt " * 300)
        results = [first.result(), queued.result()]
    assert [r.finish for r in results] == ["length", "length"], results
    assert results[1].first_token_s > STALL_S, results  # it really waited that long
    assert _metric(url, "turbine_request_stalls_total") == 0


def follow_load(
    address: str,
    seen: list[LoadMetrics],
    stop: threading.Event,
    client_of: Callable[[], RequestPlaneClient] = TcpRequestClient,
) -> None:
    """The worker's own load metrics, as its kv_events stream reports them (until `stop`), over the
    request plane `client_of` makes a client of."""

    async def main() -> None:
        client = client_of()
        decode = msgspec.msgpack.Decoder(WorkerEvent).decode

        async def read() -> None:
            async for frames in client.stream(address, KV_EVENTS_ENDPOINT, msgspec.msgpack.encode(None)):
                seen.extend(e.load for e in map(decode, frames) if e.load is not None)

        reader = asyncio.get_running_loop().create_task(read())
        await asyncio.to_thread(stop.wait)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()

    asyncio.run(main())


def freeze_a_busy_frontend(
    front: Proc,
    url: str,
    other_url: str,
    worker: Proc,
    seen: list[LoadMetrics],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    """Four long streams through `front`, then SIGSTOP it: within the stall timeout the worker stops
    them and frees their blocks (`seen`: its load, followed), while it serves `other_url` meanwhile."""
    oai = _client(url, timeout=30)
    for i in range(4):
        pool.submit(_stream, oai, i, 5000)  # outcome ignored: its frontend is frozen mid-way
    wait_until(lambda: bool(seen) and seen[-1].num_running == 4, 10)
    busy = seen[-1].kv_blocks_used
    front.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    # Meanwhile the worker serves another frontend.
    assert _stream(_client(other_url), 9, 8).finish == "length"
    wait_until(lambda: seen[-1].num_running + seen[-1].num_waiting == 0, STALL_S + SLACK_S + 5)
    assert time.monotonic() - stopped_at < STALL_S + SLACK_S + 5
    assert busy > 0 and seen[-1].kv_blocks_used == 0, (busy, seen[-1])
    assert "frontend connection silent" in worker.log()


def test_a_frozen_frontends_requests_are_stopped_and_their_blocks_freed(
    stack: Stack, frozen: list[Proc]
) -> None:
    front, url = stack.frontend(*STALL)
    _, other_url = stack.frontend(*STALL)
    worker = stack.worker(*WORKER, ttl=LONG_TTL)
    wait_instances(url, 1)
    wait_instances(other_url, 1)
    ((_, instance, _),) = asyncio.run(_instance_keys(stack.store))
    seen: list[LoadMetrics] = []
    stop = threading.Event()
    follower = threading.Thread(target=follow_load, args=(instance.address, seen, stop))
    follower.start()
    frozen.append(front)
    try:
        pool = concurrent.futures.ThreadPoolExecutor(4)
        freeze_a_busy_frontend(front, url, other_url, worker, seen, pool)
        front.signal(signal.SIGCONT)
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        stop.set()
        follower.join(10)


def test_canaries_take_a_worker_that_stops_answering_out_of_routing(stack: Stack, frozen: list[Proc]) -> None:
    """Heartbeats off: the canaries alone find the frozen (idle) worker, and put it back after."""
    off = ("--request-stall-timeout-s", "0")
    _, url = stack.frontend(*off, "--health-check-interval-s", "0.3", "--health-check-timeout-s", "1")
    victim = stack.worker(*WORKER[:6], *off, ttl=LONG_TTL)
    stack.worker(*WORKER[:6], *off, ttl=LONG_TTL)
    wait_instances(url, 2)
    frozen.append(victim)
    victim.signal(signal.SIGSTOP)
    wait_until(lambda: _metric(url, "turbine_quarantined_workers") == 1, 10)
    assert _metric(url, "turbine_health_check_failures_total") >= 1
    assert "failed a health check" in stack.procs[0].log()
    oai = _client(url, timeout=10)
    # Routing skips it: every request goes to the live worker at once.
    results = [_stream(oai, i, 8) for i in range(6)]
    assert all(r.finish == "length" for r in results)
    assert max(r.seconds for r in results) < 1.0, [r.seconds for r in results]
    victim.signal(signal.SIGCONT)
    wait_until(lambda: _metric(url, "turbine_quarantined_workers") == 0, 10)
    assert "passes health checks again" in stack.procs[0].log()


def test_a_canary_failure_moves_the_streams_of_a_worker_that_produces_nothing(
    stack: Stack, frozen: list[Proc]
) -> None:
    """Heartbeats off again: a busy worker that stops producing gets a canary after a round without
    output; the canary fails, and the streams it held move on."""
    off = ("--request-stall-timeout-s", "0")
    _, url = stack.frontend(
        "--migration-limit", "3", *off, "--health-check-interval-s", "0.5", "--health-check-timeout-s", "1"
    )
    victim = stack.worker(*WORKER[:6], *off, ttl=LONG_TTL)
    stack.worker(*WORKER[:6], *off, ttl=LONG_TTL)
    wait_instances(url, 2)
    frozen.append(victim)
    oai = _client(url)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_stream, oai, i) for i in range(16)]
        # Every stream has its first token: the victim holds streams under way, not requests in its socket.
        wait_until(lambda: first_tokens(url) == 16, 30)
        victim.signal(signal.SIGSTOP)
        results = [f.result() for f in futures]
    assert all(r.finish == "length" and r.tokens == 128 for r in results), results
    assert _metric(url, "turbine_health_check_failures_total") >= 1
    assert _metric(url, "turbine_migrations_total") > 0
    assert "produced nothing for" in stack.procs[0].log()
