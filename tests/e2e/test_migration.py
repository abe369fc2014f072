"""Request migration: a worker killed mid-stream; its streams continue on another worker, unbroken."""

from __future__ import annotations

import concurrent.futures
import signal

import openai
import pytest

from tests.e2e.conftest import (
    MODEL,
    DistStack,
    Stack,
    first_tokens,
    http,
    live_instances,
    metric_sum,
    wait_instances,
    wait_until,
)

pytestmark = pytest.mark.e2e

WORKER = ("--engine", "mocker", "--speedup-ratio", "1", "--block-size", "16")
# 64 streams over etcd and NATS that last long enough (a few seconds of simulated steps) to be
# killed mid-way for sure: at full speed the first ones finish before the last ones start.
SLOW_WORKER = ("--engine", "mocker", "--speedup-ratio", "0.2", "--block-size", "16")


def _stream(oai: openai.OpenAI, i: int) -> tuple[str, str | None, int]:
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt=f"Tell story number {i} about a lighthouse keeper",
            max_tokens=60,
            seed=i,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = next(
        (c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None
    )
    usage = chunks[-1].usage
    return text, finish, usage.completion_tokens if usage else -1


def _kill_one_under_load(stack: Stack, streams: int, worker: tuple[str, ...] = WORKER) -> None:
    """Failure test 1: kill -9 one of two workers while `streams` streams run through a frontend
    with --migration-limit 3: none fails, and every text equals an uninterrupted run's."""
    _, url = stack.frontend("--migration-limit", "3")
    victim = stack.worker(*worker, ttl=2.0)
    stack.worker(*worker, ttl=2.0)
    wait_instances(url, 2)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(_stream, oai, i) for i in range(streams)]
        # Every stream is under way, none finished.
        wait_until(lambda: metric_sum(url, "turbine_inflight_requests") == streams, 30)
        victim.signal(signal.SIGKILL)
        results = [f.result() for f in futures]
    assert all(finish == "length" and tokens == 60 for _, finish, tokens in results), results

    _, _, body = http("GET", url + "/metrics")
    migrated = [line for line in body.decode().splitlines() if line.startswith("turbine_migrations_total")]
    assert migrated and float(migrated[0].split()[-1]) > 0

    # The same requests on the surviving worker alone, uninterrupted: the same text.
    wait_until(lambda: live_instances(url) == 1, 15)
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        reference = list(pool.map(lambda i: _stream(oai, i), range(streams)))
    assert [r[0] for r in results] == [r[0] for r in reference]


def test_killed_worker_streams_migrate_and_match_an_uninterrupted_run(stack: Stack) -> None:
    _kill_one_under_load(stack, 16)


def test_killed_worker_under_64_streams_over_etcd_and_nats(dist_stack: DistStack) -> None:
    _kill_one_under_load(dist_stack, 64, SLOW_WORKER)


def test_without_migration_a_killed_worker_fails_its_streams_in_band(stack: Stack) -> None:
    _, url = stack.frontend()
    victim = stack.worker(*WORKER)
    wait_instances(url, 1)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_stream, oai, 1)
        # Under way on the worker (a request killed before it got there is refused, not lost).
        wait_until(lambda: first_tokens(url) == 1, 30)
        victim.signal(signal.SIGKILL)
        with pytest.raises(openai.APIError, match="lost"):
            future.result()
