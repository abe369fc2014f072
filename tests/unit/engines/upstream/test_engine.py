"""The upstream engine against a real HTTP server on loopback (vLLM-like and llama-cpp-python-like
modes of `vllm_like.VllmLike`): token and text mode, the auto probe, sampling options, load from
/metrics and in-flight, cancel, an upstream that is down or dies mid-stream, sent-prompt history."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from tests.unit.engines.upstream.publisher import free_endpoint
from tests.unit.engines.upstream.vllm_like import VllmLike, next_token
from turbine.engines.upstream.client import UpstreamClient
from turbine.engines.upstream.engine import UpstreamEngine, UpstreamSettings
from turbine.engines.upstream.params import Mode
from turbine.errors import UpstreamUnavailable
from turbine.kv.hashing import block_hashes
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import load_model_files
from turbine.protocol.kv_events import KvEventBatch, KvStored, LoadMetrics
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.integration

TOKENIZER = load_model_files(bundled_model_path()).tokenizer
PROMPT = list(range(400, 440))  # 40 tokens: two full blocks of 16


class Sink:
    def __init__(self) -> None:
        self.kv: list[KvEventBatch] = []
        self.load: list[LoadMetrics] = []

    def publish_kv_events(self, batch: KvEventBatch) -> None:
        self.kv.append(batch)

    def publish_load(self, metrics: LoadMetrics) -> None:
        self.load.append(metrics)


async def until(cond: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(server: VllmLike, endpoint: str | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(server.app(), handler_cancellation=True)
    await runner.setup()
    host, port = (endpoint or free_endpoint()).removeprefix("tcp://").split(":")
    await web.TCPSite(runner, host, int(port)).start()
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def engine_for(
    url: str, *, mode: str = "auto", poll_s: float = 0.05, guided_decoding: str = "none"
) -> AsyncIterator[tuple[UpstreamEngine, Sink]]:
    sink = Sink()
    async with aiohttp.ClientSession() as session:
        engine = UpstreamEngine(
            UpstreamClient(url, session),
            TOKENIZER,
            UpstreamSettings(
                block_size=16,
                context_length=1024,
                mode=mode,
                poll_interval_s=poll_s,
                guided_decoding=guided_decoding,
            ),
            worker_id=7,
            events=sink,
        )
        await engine.start()
        try:
            yield engine, sink
        finally:
            await engine.stop()


def request(max_tokens: int = 5, **sampling: object) -> PreprocessedRequest:
    stop = StopConditions(max_tokens=max_tokens)
    return PreprocessedRequest("r1", "m", PROMPT, SamplingOptions(**sampling), stop)  # type: ignore[arg-type]


async def collect(engine: UpstreamEngine, req: PreprocessedRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]


def expected_tokens(n: int, prompt: list[int] = PROMPT) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


async def test_token_mode_streams_the_servers_token_ids() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url) as (engine, _):
        assert engine.mode is Mode.TOKEN and engine.healthy
        outs = await collect(engine, request(5, seed=3, temperature=0.5, top_p=0.9, logprobs=1))
        assert [t for o in outs for t in o.token_ids] == expected_tokens(5)
        assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].cached_tokens == 0
        assert outs[0].logprobs == [-0.5]
        assert outs[0].top_logprobs == [[(outs[0].token_ids[0], -0.5), (301, -1.5)]]
        body = server.bodies[-1]
        assert body["prompt"] == PROMPT and body["return_token_ids"] is True
        assert (body["seed"], body["temperature"], body["top_p"], body["logprobs"]) == (3, 0.5, 0.9, 1)
        # The same prompt again: the server reports its cached prefix (two blocks).
        outs = await collect(engine, request(2))
        assert outs[-1].cached_tokens == 32


async def test_stop_options_map_onto_the_servers_fields() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url) as (engine, _):
        req = PreprocessedRequest(
            "r",
            "m",
            PROMPT,
            SamplingOptions(),
            StopConditions(max_tokens=3, min_tokens=2, ignore_eos=True, stop_token_ids=(5, 6)),
            eos_token_ids=(2,),
        )
        await collect(engine, req)
        body = server.bodies[-1]
        assert (body["min_tokens"], body["ignore_eos"], body["stop_token_ids"]) == (2, True, [5, 6])


async def test_text_mode_is_probed_and_text_is_retokenized() -> None:
    server = VllmLike(text_only=True)
    async with serving(server) as url, engine_for(url) as (engine, sink):
        assert engine.mode is Mode.TEXT
        req = PreprocessedRequest(
            "r",
            "m",
            PROMPT,
            SamplingOptions(),
            StopConditions(max_tokens=12, ignore_eos=True, stop_token_ids=(5,)),
            eos_token_ids=(2,),
        )
        outs = await collect(engine, req)
        # The server tokenizes the prompt text itself.
        served = TOKENIZER.encode(
            TOKENIZER.decode(PROMPT, skip_special_tokens=False), add_special_tokens=False
        )
        text = TOKENIZER.decode(expected_tokens(12, list(served.ids)))
        ids = [t for o in outs for t in o.token_ids]
        assert TOKENIZER.decode(ids) == text
        assert outs[-1].finish_reason is FinishReason.LENGTH
        body = server.bodies[-1]
        assert body["prompt"] == TOKENIZER.decode(PROMPT, skip_special_tokens=False)
        assert body["logit_bias"] == {"2": -100} and body["stop"] == [TOKENIZER.decode([5])]
        # No /metrics (404): load is the in-flight count.
        await until(lambda: bool(sink.load) and sink.load[-1].num_running == 0)
        assert sink.load[-1].kv_blocks_used == 0 and engine.engine_load is None


async def test_load_comes_from_metrics_and_in_flight() -> None:
    server = VllmLike(token_delay_s=0.05)
    async with serving(server) as url, engine_for(url) as (engine, sink):
        task = asyncio.create_task(collect(engine, request(40)))
        await until(lambda: bool(sink.load) and sink.load[-1].num_running == 1)
        assert engine.engine_load is not None and engine.engine_load.running == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: server.aborted == 1)  # cancelling closed the upstream request
        await until(lambda: sink.load[-1].num_running == 0)


async def test_prompts_sent_stand_in_for_kv_events() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url) as (engine, sink):
        await collect(engine, request(2))
        want = block_hashes(PROMPT, 16).sequence
        stored = [e for b in sink.kv for e in b.events if isinstance(e, KvStored)]
        assert [b.block_hash for b in stored[0].blocks] == want
        assert [b.event_id for b in sink.kv] == list(range(len(sink.kv)))
        dump = engine.kv_dump()
        assert sorted(dump.block_hashes) == sorted(want) and dump.worker_id == 7


async def test_down_upstream_refuses_then_recovers() -> None:
    endpoint = free_endpoint()
    url = "http://" + endpoint.removeprefix("tcp://")
    async with engine_for(url) as (engine, _):
        assert not engine.healthy
        with pytest.raises(UpstreamUnavailable):
            await collect(engine, request())
        server = VllmLike()
        async with serving(server, endpoint):
            await until(lambda: engine.healthy, within_s=15)  # backoff starts at 0.25 s
            outs = await collect(engine, request(3))
            assert [t for o in outs for t in o.token_ids] == expected_tokens(3)


async def test_upstream_dying_mid_stream_raises_retriable_error() -> None:
    server = VllmLike()
    async with serving(server) as url, engine_for(url, poll_s=5.0) as (engine, _):
        server.die_after_tokens = 2
        got: list[int] = []
        with pytest.raises(UpstreamUnavailable) as info:
            async for out in engine.generate(request(10)):
                got += out.token_ids
        assert info.value.retriable
        assert got == expected_tokens(2)
        assert not engine.healthy  # until the poll loop, woken at once, finds it answering
        await until(lambda: engine.healthy)
