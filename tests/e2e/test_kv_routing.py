"""KV-aware routing through the real frontend and 4 mocker workers (one process, file discovery)."""

from __future__ import annotations

import collections
import itertools
import json
import random
import re

import pytest

from tests.e2e.conftest import MODEL, Stack, http, wait_instances, wait_until

pytestmark = pytest.mark.e2e

BLOCK = 16
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]


def _prefix(rng: random.Random, group: int) -> str:
    return f"[group {group}] " + " ".join(rng.choice(WORDS) for _ in range(150))


def _complete(url: str, prompt: str) -> tuple[int, str, int, int, int]:
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 3}).encode()
    status, headers, raw = http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 200, raw
    usage = json.loads(raw)["usage"]
    return (
        status,
        headers["x-turbine-worker"],
        int(headers["x-turbine-overlap-blocks"]),
        usage["prompt_tokens_details"]["cached_tokens"],
        usage["prompt_tokens"],
    )


def _workers(stack: Stack) -> None:
    stack.worker(
        "--engine", "mocker", "--num-workers", "4", "--block-size", str(BLOCK), "--speedup-ratio", "20"
    )


@pytest.mark.parametrize("events", [True, False], ids=["kv-events", "approximate"])
def test_every_request_after_the_first_lands_on_a_worker_holding_its_prefix(
    stack: Stack, events: bool
) -> None:
    args = ["--router-mode", "kv", "--active-decode-blocks-threshold", "0.9"]
    if not events:
        args.append("--no-kv-events")
    _, url = stack.frontend(*args)
    _workers(stack)
    wait_instances(url, 4)
    rng = random.Random(5)
    prefixes = [_prefix(rng, g) for g in range(6)]
    owner: dict[int, str] = {}
    for round_ in range(4):
        for group, prefix in enumerate(prefixes):
            _, worker, overlap, cached, prompt_tokens = _complete(url, f"{prefix} question {round_}-{group}")
            if round_ == 0:
                owner[group] = worker
                continue
            # The prefix is ~150 words: well over one block is shared with the group's earlier requests.
            assert worker == owner[group], (group, round_)
            assert overlap >= 8
            assert cached >= overlap * BLOCK - BLOCK
            assert cached < prompt_tokens
    # Six groups spread over four workers: cache affinity did not pile them onto one.
    assert max(collections.Counter(owner.values()).values()) <= 2


def test_a_frontend_started_later_learns_the_workers_caches(stack: Stack) -> None:
    _, first = stack.frontend("--router-mode", "kv")
    _workers(stack)
    wait_instances(first, 4)
    rng = random.Random(9)
    prefixes = [_prefix(rng, g) for g in range(4)]
    owners = {g: _complete(first, f"{p} warm")[1] for g, p in enumerate(prefixes)}
    # A second frontend joins now: it never saw these events and re-syncs from the workers' dumps.
    proc, second = stack.frontend("--router-mode", "kv")
    wait_instances(second, 4)
    # Its event followers fetch each worker's dump as soon as the worker appears.
    loaded = re.compile(r"worker ([0-9a-f]+): KV cache state loaded from its dump")
    wait_until(lambda: len(set(loaded.findall(proc.log()))) == 4, 20, proc)
    for group, prefix in enumerate(prefixes):
        _, worker, overlap, cached, _ = _complete(second, f"{prefix} later")
        assert worker == owners[group]
        assert overlap >= 8 and cached > 0


def test_block_size_mismatch_is_a_loud_warning(stack: Stack) -> None:
    frontend, url = stack.frontend("--router-mode", "kv", "--kv-cache-block-size", "32")
    _workers(stack)
    wait_instances(url, 4)
    _complete(url, "hello there")
    assert "KV ROUTING IS DEGRADED" in frontend.log()


def test_all_workers_busy_is_503_with_retry_after(stack: Stack) -> None:
    _, url = stack.frontend("--router-mode", "kv", "--active-prefill-tokens-threshold", "1")
    stack.worker("--engine", "mocker", "--block-size", str(BLOCK), "--speedup-ratio", "0.5")
    wait_instances(url, 1)
    import concurrent.futures

    body = json.dumps({"model": MODEL, "prompt": "word " * 1500, "max_tokens": 2}).encode()

    def post() -> tuple[int, dict[str, str], bytes]:
        return http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post(), range(4)))
    statuses = sorted(r[0] for r in results)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    busy = next(r for r in results if r[0] == 503)
    assert busy[1]["Retry-After"] == "1"
    assert "busy" in json.loads(busy[2])["error"]["message"]


@pytest.mark.parametrize("mode", ["least-loaded", "power-of-two"])
def test_load_based_modes_use_every_worker(stack: Stack, mode: str) -> None:
    _, url = stack.frontend("--router-mode", mode)
    _workers(stack)
    wait_instances(url, 4)
    # One request at a time: every worker is idle when one is routed, so both modes pick at random
    # among the 4. With 12 requests, 2 or fewer distinct workers happened about once in 700 runs
    # (and did, in CI); with 40 it is about 6 · 2^-40.
    seen = {_complete(url, f"hello {i}")[1] for i in range(40)}
    assert len(seen) >= 3


def _burst_starts(interval_ms: str, stack: Stack) -> list[float]:
    """Start a frontend and a worker paced at `interval_ms`, keep the worker busy for ~2.5 s through
    the frontend, and return when each burst of its `kv_events` stream (frames read within 30 ms of
    each other) began, as read by a follower of our own over the request plane."""
    import asyncio
    import threading

    import msgspec

    from turbine.protocol.instance import Instance, instances_prefix
    from turbine.protocol.kv_events import KV_EVENTS_ENDPOINT
    from turbine.runtime.discovery.file import FileStore
    from turbine.runtime.transport.tcp import TcpRequestClient

    _, url = stack.frontend()
    stack.worker(
        "--engine", "mocker", "--block-size", str(BLOCK), "--speedup-ratio", "1000",
        "--kv-events-interval-ms", interval_ms,
    )  # fmt: skip
    wait_instances(url, 1)
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            _complete(url, _prefix(rng, seed))

    async def follow() -> list[float]:
        store = FileStore(stack.store)
        (kv,) = await store.get_prefix(instances_prefix("test"))
        await store.close()
        instance = msgspec.msgpack.decode(kv.value, type=Instance)
        client = TcpRequestClient()
        arrivals: list[float] = []
        loop = asyncio.get_running_loop()

        async def read() -> None:
            stream = client.stream(instance.address, KV_EVENTS_ENDPOINT, msgspec.msgpack.encode(None))
            async for frames in stream:
                arrivals.extend(loop.time() for _ in frames)

        reader = loop.create_task(read())
        await asyncio.sleep(0.3)  # a head start for the reader (bursts it misses only shorten the sample)
        threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        await asyncio.sleep(2.5)  # the stretch of steady load whose event stream is measured
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await client.close()
        return arrivals

    arrivals = asyncio.run(follow())
    return [t for i, t in enumerate(arrivals) if i == 0 or t - arrivals[i - 1] > 0.03]


def test_kv_events_interval_paces_a_busy_workers_event_stream(stack: Stack) -> None:
    """`--kv-events-interval-ms`: while a worker's events keep coming, each follower gets them in
    bursts at least that far apart. With 0 the frames come as often as the engine steps, never
    30 ms apart here: a single burst."""
    starts = _burst_starts("400", stack)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 4, starts  # ~2.5 s of steady events
    # Bursts go out 400 ms apart; the margin is for this reader's own scheduling delays.
    assert min(gaps) >= 0.3, gaps


def test_a_bad_kv_events_interval_is_refused_in_one_line(stack: Stack) -> None:
    worker = stack.worker("--engine", "mocker", "--kv-events-interval-ms", "-1")
    assert worker.wait(30) == 2
    assert "--kv-events-interval-ms -1.0 is out of range: must be within [0, 1000]" in worker.log()
