"""Failure handling over a real etcd: frozen workers, and etcd itself going away while serving."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.e2e.conftest import (
    MODEL,
    EtcdStack,
    http,
    live_instances,
    shared_prefix_hit_ratio,
    wait_instances,
    wait_until,
)

pytestmark = pytest.mark.e2e

WORKER = ("--engine", "mocker", "--speedup-ratio", "100")


def _complete(url: str) -> None:
    body = json.dumps({"model": MODEL, "prompt": "still serving?", "max_tokens": 3}).encode()
    status, _, raw = http(
        "POST", url + "/v1/completions", body, {"Content-Type": "application/json"}, timeout=10
    )
    assert status == 200, raw


def test_frozen_worker_leaves_routing_and_comes_back_on_sigcont(etcd_stack: EtcdStack) -> None:
    _, url = etcd_stack.frontend()
    frozen = etcd_stack.worker(*WORKER, ttl=2.0)
    etcd_stack.worker(*WORKER, ttl=2.0)
    wait_instances(url, 2)
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_until(lambda: live_instances(url) == 1, 10)
    assert time.monotonic() - stopped_at < 2.0 + 1.0 + 0.5  # TTL + 1 s, plus polling slack
    for _ in range(5):
        _complete(url)  # all on the live worker
    frozen.signal(signal.SIGCONT)
    # Its lease expired while frozen: it grants a new one and registers again, once.
    wait_until(lambda: live_instances(url) == 2, 10)
    time.sleep(0.5)  # room for a second registration to show up: that none does is what is tested
    assert live_instances(url) == 2
    for _ in range(6):
        _complete(url)


def test_etcd_restart_while_serving(etcd_stack: EtcdStack) -> None:
    _, url = etcd_stack.frontend()
    etcd_stack.worker(*WORKER, ttl=2.0)
    doomed = etcd_stack.worker(*WORKER, ttl=2.0)
    wait_instances(url, 2)
    etcd_stack.etcd.stop()
    # Discovery is gone: the frontend keeps serving from the workers it knows.
    for _ in range(5):
        _complete(url)
    doomed.signal(signal.SIGKILL)
    doomed.wait(5)
    etcd_stack.etcd.restart()
    # Back: the dead worker's lease runs out and it leaves; a new worker is discovered.
    etcd_stack.worker(*WORKER, ttl=2.0)
    wait_until(lambda: live_instances(url) == 2, 20)
    time.sleep(3.0)  # past the dead worker's TTL: it must be gone, and nobody counted twice
    assert live_instances(url) == 2
    for _ in range(6):
        _complete(url)


def test_two_frontends_share_the_cache_view(etcd_stack: EtcdStack) -> None:
    _, first = etcd_stack.frontend("--router-mode", "kv")
    _, second = etcd_stack.frontend("--router-mode", "kv")
    etcd_stack.worker(
        "--engine", "mocker", "--num-workers", "4", "--block-size", "16", "--speedup-ratio", "50"
    )
    wait_instances(first, 4)
    wait_instances(second, 4)
    one = shared_prefix_hit_ratio([first], "one")
    both = shared_prefix_hit_ratio([first, second], "both")
    print(f"hit ratio: one frontend {one:.3f}, two frontends {both:.3f}")
    assert one > 0.6
    assert both >= 0.9 * one, (one, both)
