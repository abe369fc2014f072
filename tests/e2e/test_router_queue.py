"""The router queue: overload waits instead of 503, wspt serves short prompts first, bounds and
client disconnects, and its /metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import statistics
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, Stack, http, wait_instances, wait_until

pytestmark = pytest.mark.e2e

# One slow worker (prefill ~0.13 ms per token after the speedup) whose step budget is 2048 tokens;
# at threshold 0.5 one long prompt in flight makes it busy, while dozens of short ones do not.
WORKER = (
    "--engine",
    "mocker",
    "--speedup-ratio",
    "0.5",
    "--max-num-batched-tokens",
    "2048",
    "--block-size",
    "16",
)
LONG, SHORT = 1500, 24


def _queue_metrics(url: str) -> dict[str, float]:
    _, _, body = http("GET", url + "/metrics")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.startswith("turbine_router_queue") and sample.labels.get("model") == MODEL:
                key = sample.name + (f"{{le={sample.labels['le']}}}" if "le" in sample.labels else "")
                out[key] = sample.value
    return out


async def _one(oai: openai.AsyncOpenAI, prompt: list[int]) -> tuple[int, float, str | None]:
    """(prompt length, time to first token, finish reason) of one streamed completion."""
    started = time.perf_counter()
    ttft = -1.0
    finish = None
    stream = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, stream=True, extra_body={"ignore_eos": True}
    )
    async for chunk in stream:
        if ttft < 0:
            ttft = time.perf_counter() - started
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return len(prompt), ttft, finish


async def _burst(url: str, seed: int) -> tuple[list[float], list[float]]:
    """16 long and 48 short prompts (unique, so nothing is cached), arriving interleaved (L S S S
    L ...); returns the TTFTs of the short and the long ones. Every request must finish."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(16):
        prompts.append([rng.randrange(10, 4000) for _ in range(LONG)])
        prompts += [[rng.randrange(10, 4000) for _ in range(SHORT)] for _ in range(3)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(oai, prompt)))
            await asyncio.sleep(0.002)  # arrival order = list order
        results = await asyncio.gather(*tasks)
    assert [finish for _, _, finish in results] == ["length"] * len(prompts), results
    short = [t for n, t, _ in results if n == SHORT]
    long = [t for n, t, _ in results if n == LONG]
    return short, long


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def test_overload_queues_and_wspt_cuts_the_short_requests_tail(stack: Stack) -> None:
    queue = ("--router-mode", "least-loaded", "--router-queue-threshold", "0.5")
    _, fcfs = stack.frontend(*queue, "--router-queue-policy", "fcfs")
    _, wspt = stack.frontend(*queue, "--router-queue-policy", "wspt")
    stack.worker(*WORKER)
    wait_instances(fcfs, 1)
    wait_instances(wspt, 1)

    results = {}
    for name, url in (("fcfs", fcfs), ("wspt", wspt)):
        short, long = asyncio.run(_burst(url, seed=len(name) + ord(name[0])))
        results[name] = (_p99(short), statistics.mean(short), _p99(long))
        metrics = _queue_metrics(url)
        # Requests did wait in the queue (nothing got 503), and it drained.
        assert metrics["turbine_router_queue_length"] == 0
        assert metrics["turbine_router_queue_wait_seconds_count"] == 64
        assert metrics["turbine_router_queue_wait_seconds_bucket{le=0.1}"] < 64
    print("short p99 / short mean / long p99 TTFT (s):", json.dumps(results))
    # Short requests no longer wait behind every earlier long one, only behind the long one in
    # flight when they arrive (measured here: p99 ratio 0.29-0.45, mean ratio 0.31-0.35).
    assert results["wspt"][0] < 0.6 * results["fcfs"][0], results
    assert results["wspt"][1] < 0.5 * results["fcfs"][1], results


def _slow_stream(url: str, prompt: list[int]) -> str | None:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, stream=True))
    return next(
        (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None
    )


def _impatient(url: str, prompt: list[int]) -> str:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
    try:
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    except openai.APITimeoutError:
        return "gave up"
    return "served"


def test_queue_bound_503_and_disconnected_clients_leave_the_queue(stack: Stack) -> None:
    _, url = stack.frontend(
        "--router-mode", "least-loaded", "--router-queue-threshold", "0.5", "--router-max-queued", "2"
    )  # fmt: skip
    # Prefill of the long prompt takes ~3.8 s here: the worker stays busy through the test.
    stack.worker("--engine", "mocker", "--speedup-ratio", "0.05", "--max-num-batched-tokens", "4096")
    wait_instances(url, 1)
    rng = random.Random(5)
    long = [rng.randrange(10, 4000) for _ in range(3000)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        busy = pool.submit(_slow_stream, url, long)
        wait_until(lambda: _queue_metrics(url).get("turbine_router_queue_wait_seconds_count") == 1, 10)
        waiting = [pool.submit(_impatient, url, [11, 12, 13]) for _ in range(2)]
        wait_until(lambda: _queue_metrics(url)["turbine_router_queue_length"] == 2, 5)
        # The queue is full: the next request is refused at once, with Retry-After.
        body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 1}).encode()
        status, headers, raw = http(
            "POST", url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        assert status == 503, raw
        assert headers.get("Retry-After") == "1"
        assert json.loads(raw)["error"]["type"] == "service_unavailable"
        # The two waiting clients give up; their entries leave the queue long before the worker
        # is free, and they are never routed.
        assert [w.result() for w in waiting] == ["gave up", "gave up"]
        wait_until(lambda: _queue_metrics(url)["turbine_router_queue_length"] == 0, 2)
        assert not busy.done()
        assert busy.result() == "length"
    assert _queue_metrics(url)["turbine_router_queue_wait_seconds_count"] == 1
    # The worker is free again: a request is served at once.
    status, _, raw = http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 200, raw
