"""Real processes on loopback: a file-discovery directory per test, frontends and workers as
subprocesses started with the same commands users type, stopped (and killed if need be) afterwards."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_server import EtcdServer
from tests.nats_server import NatsServer
from tests.ports import free_port as free_port

MODEL = "turbine-tiny"


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP call (for bodies no client library would send); `context` for https:// URLs."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


class Proc:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


class Stack:
    """Processes sharing one file-discovery directory and namespace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.procs: list[Proc] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("TURBINE_HTTP_PORT", None)

    def _start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv, self.root / f"{name}-{len(self.procs)}.log", self.env)
        self.procs.append(proc)
        return proc

    def common(self) -> list[str]:
        return ["--discovery-backend", "file", "--file-store-path", str(self.store), "--namespace", "test"]

    def frontend(
        self, *args: str, wait: bool = True, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[Proc, str]:
        """Start a frontend; with `ssl_context` (it serves TLS) the URL is https:// and the wait for
        /live goes through that client context."""
        port = free_port()
        proc = self._start(
            "frontend",
            [sys.executable, "-m", "turbine.frontend", "--http-port", str(port), *self.common(), *args],
        )
        url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        if wait:
            wait_until(lambda: http("GET", url + "/live", timeout=1, context=ssl_context)[0] == 200, 20, proc)
        return proc, url

    def worker(self, *args: str, ttl: float = 10.0) -> Proc:
        return self._start(
            "worker",
            [sys.executable, "-m", "turbine.worker", *self.common(), "--lease-ttl-s", str(ttl), *args],
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


TINY = "tiny-llama"
SMALL_KV = ("--kv-cache-memory-bytes", str(256 << 20))
"""A CPU torch worker's KV cache for tests: thousands of tokens of SmolLM2, where the default (1 GiB)
is memory each worker would zero at start for nothing."""


def tiny_torch_worker(stack: Stack, model_dir: Path, *extra: str, ttl: float = 10.0) -> Proc:
    """A torch worker serving the tiny random Llama (`tiny_llama_dir`) on the CPU as `TINY`.

    float32: greedy texts compared across batches, workers and migrations must not hinge on bf16
    rounding."""
    return stack.worker(
        "--engine", "torch", "--model-path", str(model_dir), "--model-name", TINY, "--device", "cpu",
        "--dtype", "float32", "--block-size", "16", "--kv-cache-memory-bytes", str(64 << 20),
        *extra, ttl=ttl,
    )  # fmt: skip


class StreamProgress:
    """Thread-safe count of the deltas each of several concurrent streams has received."""

    def __init__(self) -> None:
        self.received = collections.Counter[int]()
        self._lock = threading.Lock()

    def counter(self, stream: int) -> Callable[[], None]:
        def seen() -> None:
            with self._lock:
                self.received[stream] += 1

        return seen

    def all_past(self, streams: int, deltas: int) -> bool:
        """Every one of `streams` streams has received at least `deltas` deltas."""
        with self._lock:
            return len(self.received) == streams and min(self.received.values()) >= deltas


def wait_until(predicate: Any, timeout: float, proc: Proc | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        time.sleep(interval)
    detail = f"\n{proc.name} log:\n{proc.log()}" if proc is not None else ""
    raise AssertionError(f"condition not met within {timeout}s{detail}")


def live_instances(url: str, model: str = MODEL) -> int:
    status, _, body = http("GET", url + "/health", timeout=2)
    if status not in (200, 503):  # 503: up, but no worker serves any model yet
        return -1
    count: int = json.loads(body)["models"].get(model, 0)
    return count


def wait_instances(url: str, count: int, timeout: float = 20.0, model: str = MODEL) -> None:
    wait_until(lambda: live_instances(url, model) == count, timeout)


def metric_sum(url: str, name: str, model: str = MODEL) -> float:
    """The sum of the samples called `name` for `model` on a frontend's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, _, body = http("GET", url + "/metrics", timeout=5)
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name and sample.labels.get("model") == model
    )


def first_tokens(url: str, model: str = MODEL) -> int:
    """Requests of `model` a frontend has had a first token for: a stream counted here is under way."""
    return int(metric_sum(url, "turbine_time_to_first_token_seconds_count", model))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.stop()


# ------------------------------------------------ stacks over real etcd (and NATS) from tests/conftest.py


class EtcdStack(Stack):
    def __init__(self, root: Path, etcd: EtcdServer) -> None:
        super().__init__(root)
        self.etcd = etcd

    def common(self) -> list[str]:
        return ["--discovery-backend", "etcd", "--etcd-endpoints", self.etcd.endpoint, "--namespace", "test"]


class DistStack(Stack):
    """Frontends and workers over etcd discovery and the NATS request plane."""

    def __init__(self, root: Path, etcd: EtcdServer, nats: NatsServer) -> None:
        super().__init__(root)
        self.etcd = etcd
        self.nats = nats

    def common(self) -> list[str]:
        return [
            "--discovery-backend",
            "etcd",
            "--etcd-endpoints",
            self.etcd.endpoint,
            "--request-plane",
            "nats",
            "--nats-server",
            self.nats.url,
            "--namespace",
            "test",
        ]


@pytest.fixture
def etcd_stack(tmp_path: Path, etcd_server: EtcdServer) -> Iterator[EtcdStack]:
    stack = EtcdStack(tmp_path, etcd_server)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def dist_stack(tmp_path: Path, etcd_server: EtcdServer, nats_server: NatsServer) -> Iterator[DistStack]:
    """etcd discovery and the NATS request plane, the way users run several machines."""
    stack = DistStack(tmp_path, etcd_server, nats_server)
    try:
        yield stack
    finally:
        stack.stop()


def shared_prefix_hit_ratio(urls: list[str], salt: str) -> float:
    """Prompt-cache hit ratio of 48 requests in 8 shared-prefix groups, spread over `urls` in turn."""
    rng = random.Random(salt)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    prefixes = [f"[{salt} {g}] " + " ".join(rng.choice(words) for _ in range(120)) for g in range(8)]
    bodies = [(urls[i % len(urls)], f"{prefixes[i % 8]} question {i}") for i in range(48)]

    def one(job: tuple[str, str]) -> tuple[int, int]:
        url, prompt = job
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
        status, _, raw = http("POST", url + "/v1/completions", body, {"Content-Type": "application/json"})
        assert status == 200, raw
        usage = json.loads(raw)["usage"]
        return usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, bodies))
    return sum(c for c, _ in results) / sum(p for _, p in results)
