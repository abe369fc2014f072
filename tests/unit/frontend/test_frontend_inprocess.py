"""The whole frontend in one process: memory discovery, in-process request plane, real engines,
real HTTP through aiohttp's test server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.unit.frontend.harness import MODEL, Harness
from turbine.engines.base import NullEventSink
from turbine.engines.echo import EchoEngine
from turbine.engines.mocker.engine import MockerConfig, MockerEngine

pytestmark = pytest.mark.integration


async def test_echo_round_trip_and_usage(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    await h.add_worker(EchoEngine())
    await h.wait_instances(1)
    resp = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hello world", "max_tokens": 50}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["text"] == "hello world"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == body["usage"]["prompt_tokens"]


async def test_utf8_split_across_tokens_streams_whole_characters(
    harness: tuple[Harness, TestClient[Any, Any]],
) -> None:
    h, client = harness
    await h.add_worker(EchoEngine())
    await h.wait_instances(1)
    text = "naïve café 🚀 日本語"
    resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": text, "stream": True})
    assert resp.status == 200
    raw = (await resp.read()).decode()
    import json

    pieces = [
        json.loads(line[6:])["choices"][0]["text"] for line in raw.split("\n") if line.startswith("data: {")
    ]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert raw.rstrip().endswith("data: [DONE]")


async def test_client_disconnect_cancels_at_the_engine(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    engine = MockerEngine(MockerConfig(speedup_ratio=1.0, token_id_range=(300, 4000)), 0, NullEventSink())
    worker = await h.add_worker(engine)
    await h.wait_instances(1)
    resp = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "go on", "max_tokens": 5000, "ignore_eos": True, "stream": True},
    )
    await resp.content.readline()
    resp.close()
    for _ in range(300):
        if engine.load_metrics().num_running == 0 and engine.load_metrics().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.01)
    metrics = engine.load_metrics()
    assert metrics.num_running == 0 and metrics.kv_blocks_used == 0
    assert worker._server.active_streams == 0


async def test_draining_worker_requests_go_elsewhere(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    first = await h.add_worker(EchoEngine())
    await h.add_worker(EchoEngine())
    await h.wait_instances(2)
    first._server.drain()  # refuses new streams; discovery still lists it
    for _ in range(6):
        resp = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x y", "max_tokens": 5})
        assert resp.status == 200
        assert resp.headers["x-turbine-worker"] != f"{first.instance_id:x}"


async def test_engine_error_is_reported_not_hung(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    # A cache of two 64-token blocks cannot hold a 300-token prompt: the engine fails the request.
    engine = MockerEngine(
        MockerConfig(num_gpu_blocks=2, speedup_ratio=1e6, token_id_range=(300, 4000)), 0, NullEventSink()
    )
    await h.add_worker(engine)
    await h.wait_instances(1)
    resp = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "word " * 300, "max_tokens": 5}
    )
    assert resp.status >= 400
    body = await resp.json()
    assert "error" in body and body["error"]["message"]
