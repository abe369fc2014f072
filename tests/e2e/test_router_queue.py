"""The router queue: overload waits instead of 503 under either policy, bounds and client
disconnects, and its /metrics. How the policies compare is benchmarks/router_queue.py's job."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random

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


async def _one(oai: openai.AsyncOpenAI, prompt: list[int]) -> str | None:
    """The finish reason of one streamed completion."""
    finish = None
    stream = await oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=2, stream=True, extra_body={"ignore_eos": True}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return finish


async def _burst(url: str, seed: int) -> None:
    """16 long and 48 short prompts (unique, so nothing is cached), arriving interleaved (L S S S
    L ...). Every request must finish."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(16):
        prompts.append([rng.randrange(10, 4000) for _ in range(LONG)])
        prompts += [[rng.randrange(10, 4000) for _ in range(SHORT)] for _ in range(3)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        results = await asyncio.gather(*(_one(oai, prompt) for prompt in prompts))
    assert results == ["length"] * len(prompts), results


@pytest.mark.parametrize("policy", ["fcfs", "wspt"])
def test_overload_queues_instead_of_refusing(stack: Stack, policy: str) -> None:
    """Both policies hold what the worker cannot take yet and serve all of it (how much sooner
    wspt serves the short prompts is measured by benchmarks/router_queue.py)."""
    _, url = stack.frontend(
        "--router-mode", "least-loaded", "--router-queue-threshold", "0.5", "--router-queue-policy", policy
    )  # fmt: skip
    stack.worker(*WORKER)
    wait_instances(url, 1)
    asyncio.run(_burst(url, seed=len(policy)))
    metrics = _queue_metrics(url)
    # Requests did wait in the queue (nothing got 503), and it drained.
    assert metrics["turbine_router_queue_length"] == 0
    assert metrics["turbine_router_queue_wait_seconds_count"] == 64
    assert metrics["turbine_router_queue_wait_seconds_bucket{le=0.1}"] < 64


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
