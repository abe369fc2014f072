"""The sidecar with two data-parallel ranks behind one upstream: one engine per rank, each pinned
with vLLM's rank header, each fed the KV events its rank publishes on the endpoint's port + rank."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

import pytest

from tests.unit.engines.upstream import engine_structs as es
from tests.unit.engines.upstream.publisher import TestPublisher
from turbine.engines.upstream.client import DP_RANK_HEADER
from turbine.engines.upstream.sidecar import Sidecar, SidecarSettings, UpstreamSpec, rank_endpoint
from turbine.errors import ConfigError
from turbine.kv.hashing import block_hashes
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files

pytestmark = pytest.mark.integration

TOKENS = list(range(900, 932))


def two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_rank_endpoints() -> None:
    assert rank_endpoint("tcp://h:5557", 0) == "tcp://h:5557"
    assert rank_endpoint("tcp://h:5557", 3) == "tcp://h:5560"
    assert rank_endpoint("ipc:///tmp/x", 0) == "ipc:///tmp/x"
    with pytest.raises(ConfigError):
        rank_endpoint("ipc:///tmp/x", 1)


async def test_one_engine_per_dp_rank_with_its_own_events() -> None:
    port = two_free_ports()
    pubs = [TestPublisher(f"tcp://127.0.0.1:{port + r}") for r in (0, 1)]
    tokenizer = load_model_files(bundled_model_path()).tokenizer
    sidecar = Sidecar(
        [UpstreamSpec("http://127.0.0.1:9/v1", kv_events_endpoint=f"tcp://127.0.0.1:{port}")],
        SidecarSettings(block_size=8, context_length=1024, dp_size=2),
        tokenizer,
    )
    await sidecar.start()
    try:
        engines = [sidecar.engine(i) for i in range(sidecar.size)]
        assert sidecar.size == 2 and engines[0] is sidecar.engine(0)
        assert [e.client.dp_rank for e in engines] == [0, 1]
        assert engines[1].client._headers[DP_RANK_HEADER] == "1"
        assert engines[0].client.base_url == "http://127.0.0.1:9"
        sidecar.follow_kv_events()
        for sub in sidecar.subscribers:
            await asyncio.wait_for(sub.connected.wait(), 10)
        seq = block_hashes(TOKENS, 8).sequence
        deadline = time.monotonic() + 10
        # Publish until both subscriptions are live (ZMQ's slow joiner); stored is idempotent.
        while not (engines[0].kv_dump().block_hashes and engines[1].kv_dump().block_hashes):
            assert time.monotonic() < deadline
            await pubs[0].publish(es.map_batch([es.stored("map", [1, 2], None, TOKENS[:16], 8)], rank=0))
            await pubs[1].publish(es.array_batch([es.stored("array", [3], None, TOKENS[:8], 8)], rank=1))
            await asyncio.sleep(0.05)
        assert sorted(engines[0].kv_dump().block_hashes) == sorted(seq[:2])
        assert engines[1].kv_dump().block_hashes == [seq[0]]
    finally:
        await sidecar.close()
        for pub in pubs:
            with contextlib.suppress(Exception):
                await pub.close()
