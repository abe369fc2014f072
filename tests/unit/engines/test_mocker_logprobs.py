"""The mocker's logprobs: aligned with its tokens, well-formed, and a pure function of seed and token
context (so a migrated stream's logprobs equal an uninterrupted one's); none unless asked for."""

from __future__ import annotations

import asyncio
import math

import msgspec
import pytest

from tests.unit.engines.test_mocker_engine import PROMPT, RecordingSink, started
from turbine.engines.mocker.engine import mock_logprobs
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.unit


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


Stream = tuple[list[int], list[float], list[list[tuple[int, float]]] | None, int]


def req(
    tokens: list[int], max_tokens: int, *, logprobs: int | None, seed: int | None = None
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id="r",
        model="m",
        token_ids=tokens,
        sampling=SamplingOptions(seed=seed, logprobs=logprobs),
        stop=StopConditions(max_tokens),
    )


async def run(sink: RecordingSink, request: PreprocessedRequest) -> Stream:
    """Tokens, logprobs and top lists of one stream, plus how many outputs carried them."""
    engine = await started(sink)
    tokens: list[int] = []
    logprobs: list[float] = []
    top: list[list[tuple[int, float]]] | None = None
    outputs = 0
    async for out in engine.generate(request):
        outputs += 1
        tokens += out.token_ids
        assert (out.logprobs is None) == (request.sampling.logprobs is None or not out.token_ids)
        logprobs += out.logprobs or []
        if out.top_logprobs is not None:
            top = (top or []) + out.top_logprobs
    await engine.stop()
    return tokens, logprobs, top, outputs


@pytest.mark.parametrize("k", [0, 1, 3, 20])
async def test_logprobs_are_aligned_and_well_formed(sink: RecordingSink, k: int) -> None:
    tokens, logprobs, top, _ = await run(sink, req(PROMPT, 24, logprobs=k, seed=9))
    assert len(tokens) == len(logprobs) == 24
    assert all(lp < 0 for lp in logprobs)
    if k == 0:
        assert top is None
        return
    assert top is not None and len(top) == 24
    for token, lp, alternatives in zip(tokens, logprobs, top, strict=True):
        assert len(alternatives) == k
        # Greedy: the sampled token is the most likely one, reported with the same logprob.
        assert alternatives[0] == (token, lp)
        values = [v for _, v in alternatives]
        assert values == sorted(values, reverse=True) and len(set(values)) == k
        assert len({t for t, _ in alternatives}) == k
        assert all(1000 <= t < 32000 for t, _ in alternatives)
        assert sum(math.exp(v) for v in values) < 1.0


async def test_same_request_same_logprobs_other_seed_other_logprobs(sink: RecordingSink) -> None:
    a = await run(sink, req(PROMPT, 16, logprobs=3, seed=1))
    b = await run(sink, req(PROMPT, 16, logprobs=3, seed=1))
    c = await run(sink, req(PROMPT, 16, logprobs=3, seed=2))
    assert a[:3] == b[:3]
    assert a[1] != c[1]


async def test_logprobs_do_not_change_the_tokens(sink: RecordingSink) -> None:
    plain, none_lp, none_top, _ = await run(sink, req(PROMPT, 16, logprobs=None, seed=4))
    with_lp, _, _, _ = await run(sink, req(PROMPT, 16, logprobs=5, seed=4))
    assert plain == with_lp
    assert none_lp == [] and none_top is None


@pytest.mark.parametrize("seed", [None, 42])
async def test_migrated_stream_has_the_same_logprobs(sink: RecordingSink, seed: int | None) -> None:
    full = await run(sink, req(PROMPT, 40, logprobs=4, seed=seed))
    head = await run(sink, req(PROMPT, 13, logprobs=4, seed=seed))
    tail = await run(sink, req(PROMPT + head[0], 40 - 13, logprobs=4, seed=seed))
    assert head[0] + tail[0] == full[0]
    assert head[1] + tail[1] == full[1]
    assert head[2] is not None and tail[2] is not None
    assert head[2] + tail[2] == full[2]


def test_mock_logprobs_is_pure_and_caps_alternatives_at_the_range() -> None:
    assert mock_logprobs(b"ctx", 5, 3, (0, 100)) == mock_logprobs(b"ctx", 5, 3, (0, 100))
    assert mock_logprobs(b"ctx", 5, 3, (0, 100)) != mock_logprobs(b"ctx2", 5, 3, (0, 100))
    lp, top = mock_logprobs(b"ctx", 5, 20, (4, 7))  # only 3 ids exist
    assert top[0] == (5, lp)
    assert sorted(t for t, _ in top) == [4, 5, 6]


def test_engine_output_wire_format_stays_compact_and_compatible() -> None:
    plain = EngineOutput(token_ids=[5], finish_reason=FinishReason.STOP)
    encoded = msgspec.msgpack.encode(plain)
    assert b"logprobs" not in encoded  # omitted when not used: no cost for requests without them
    with_lp = EngineOutput(token_ids=[5], logprobs=[-0.5], top_logprobs=[[(5, -0.5), (6, -1.5)]])
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(with_lp), type=EngineOutput)
    assert decoded == with_lp
    # An output from a peer that predates logprobs decodes with them absent.
    old = msgspec.msgpack.encode({"token_ids": [5]})
    assert msgspec.msgpack.decode(old, type=EngineOutput).logprobs is None
    sampling = SamplingOptions(seed=1)
    assert b"logprobs" not in msgspec.msgpack.encode(sampling)


async def test_coalesced_outputs_keep_logprobs_aligned(sink: RecordingSink) -> None:
    expected = await run(sink, req(PROMPT, 30, logprobs=2, seed=3))
    engine = await started(sink)
    tokens: list[int] = []
    logprobs: list[float] = []
    top: list[list[tuple[int, float]]] = []
    outputs = 0
    async for out in engine.generate(req(PROMPT, 30, logprobs=2, seed=3)):
        outputs += 1
        assert out.logprobs is not None and out.top_logprobs is not None
        assert len(out.logprobs) == len(out.top_logprobs) == len(out.token_ids)
        tokens += out.token_ids
        logprobs += out.logprobs
        top += out.top_logprobs
        await asyncio.sleep(0.01)  # a slow consumer: the engine's steps pile up and are merged
    await engine.stop()
    assert outputs < 30
    assert (tokens, logprobs, top) == expected[:3]
