"""Logprobs through the whole frontend in one process: an engine without logprobs answers null, and
each of n choices carries its own logprobs, streamed and not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.unit.frontend.harness import MODEL, Harness
from turbine.engines.base import NullEventSink
from turbine.engines.echo import EchoEngine
from turbine.engines.mocker.engine import MockerConfig, MockerEngine

pytestmark = pytest.mark.integration

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 12, "seed": 3}


def _events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]


async def test_engine_without_logprobs_answers_null(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    await h.add_worker(EchoEngine())
    await h.wait_instances(1)
    resp = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["logprobs"] is None
    resp = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hello world", "logprobs": 1, "stream": True}
    )
    events = _events(await resp.read())
    assert events and all(e["choices"][0]["logprobs"] is None for e in events)


async def test_each_choice_has_its_own_logprobs(harness: tuple[Harness, TestClient[Any, Any]]) -> None:
    h, client = harness
    await h.add_worker(
        MockerEngine(MockerConfig(speedup_ratio=1e6, token_id_range=(259, 4096)), 1, NullEventSink())
    )
    await h.wait_instances(1)
    request = {**CHAT, "n": 3, "logprobs": True, "top_logprobs": 1}
    body = await (await client.post("/v1/chat/completions", json=request)).json()
    whole: dict[int, list[dict[str, Any]]] = {}
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert "".join(c["token"] for c in content) == choice["message"]["content"]
        assert all(len(c["top_logprobs"]) == 1 for c in content)
        whole[choice["index"]] = content
    assert len({json.dumps(c) for c in whole.values()}) == 3  # different seeds, different logprobs

    streamed: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}
    raw = await (await client.post("/v1/chat/completions", json={**request, "stream": True})).read()
    for event in _events(raw):
        choice = event["choices"][0]
        if choice["logprobs"] is not None:
            streamed[choice["index"]] += choice["logprobs"]["content"]
    assert streamed == whole
