"""MockerEngine end to end, in process: determinism, stop rules, caching, cancellation, timing."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from tests.waiting import wait_for
from turbine.engines.base import Engine, EngineCapacity
from turbine.engines.mocker.engine import MockerConfig, MockerEngine
from turbine.engines.mocker.timing import StepShape, TimingModel
from turbine.protocol.kv_events import KvCleared, KvEventBatch, KvRemoved, KvStored, LoadMetrics
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput, FinishReason

pytestmark = pytest.mark.unit

FAST = 1e6


class RecordingSink:
    def __init__(self) -> None:
        self.batches: list[KvEventBatch] = []
        self.loads: list[LoadMetrics] = []
        self.load_times: list[float] = []

    def publish_kv_events(self, batch: KvEventBatch) -> None:
        self.batches.append(batch)

    def publish_load(self, metrics: LoadMetrics) -> None:
        self.loads.append(metrics)
        self.load_times.append(time.monotonic())


def req(
    tokens: list[int],
    max_tokens: int = 16,
    *,
    seed: int | None = None,
    rid: str = "r",
    min_tokens: int = 0,
    ignore_eos: bool = False,
    stop_token_ids: tuple[int, ...] = (),
    eos: tuple[int, ...] = (),
) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=rid,
        model="m",
        token_ids=tokens,
        sampling=SamplingOptions(seed=seed),
        stop=StopConditions(max_tokens, min_tokens, ignore_eos, stop_token_ids),
        eos_token_ids=eos,
    )


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


async def started(sink: RecordingSink, **kw: object) -> MockerEngine:
    cfg: dict[str, object] = {"speedup_ratio": FAST, "num_gpu_blocks": 256, "block_size": 16}
    cfg.update(kw)
    engine = MockerEngine(MockerConfig(**cfg), worker_id=7, events=sink)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def collect(stream: AsyncIterator[EngineOutput]) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    last = EngineOutput()
    async for out in stream:
        tokens += out.token_ids
        last = out
    return tokens, last


PROMPT = list(range(100, 200))  # 100 tokens: 6 full blocks of 16 + 4


async def test_conforms_and_reports_capacity(sink: RecordingSink) -> None:
    engine: Engine = await started(sink)
    assert engine.capacity() == EngineCapacity(16, 256, 256, 8192)
    await engine.stop()


async def test_deterministic_tokens_and_length_finish(sink: RecordingSink) -> None:
    engine = await started(sink)
    a, last = await collect(engine.generate(req(PROMPT, 20)))
    b, _ = await collect(engine.generate(req(PROMPT, 20)))
    c, _ = await collect(engine.generate(req([*PROMPT[:-1], 5], 20)))
    d, _ = await collect(engine.generate(req(PROMPT, 20, seed=3)))
    await engine.stop()
    assert len(a) == 20 and last.finish_reason == FinishReason.LENGTH
    assert a == b
    assert a != c and a != d
    assert all(1000 <= t < 32000 for t in a)


@pytest.mark.parametrize("seed", [None, 42])
async def test_migration_continues_with_the_same_tokens(sink: RecordingSink, seed: int | None) -> None:
    engine = await started(sink)
    full, _ = await collect(engine.generate(req(PROMPT, 40, seed=seed)))
    head, _ = await collect(engine.generate(req(PROMPT, 13, seed=seed)))
    tail, last = await collect(engine.generate(req(PROMPT + head, 40 - 13, seed=seed)))
    await engine.stop()
    assert head == full[:13]
    assert head + tail == full
    assert last.finish_reason == FinishReason.LENGTH


async def test_min_tokens_and_eos(sink: RecordingSink) -> None:
    engine = await started(sink, eos_probability=1.0)
    toks, last = await collect(engine.generate(req(PROMPT, 10, min_tokens=4, eos=(2,))))
    assert len(toks) == 4 and last.finish_reason == FinishReason.STOP
    toks, last = await collect(engine.generate(req(PROMPT, 10, ignore_eos=True, eos=(2,))))
    assert len(toks) == 10 and last.finish_reason == FinishReason.LENGTH
    toks, last = await collect(engine.generate(req(PROMPT, 10)))
    assert toks == [] and last.finish_reason == FinishReason.STOP
    await engine.stop()


async def test_stop_token_ids_end_without_emitting(sink: RecordingSink) -> None:
    engine = await started(sink)
    full, _ = await collect(engine.generate(req(PROMPT, 10)))
    stop_at = full[5]
    assert stop_at not in full[:5]
    toks, last = await collect(engine.generate(req(PROMPT, 10, stop_token_ids=(stop_at,))))
    assert toks == full[:5] and last.finish_reason == FinishReason.STOP
    # Under min_tokens the stop token is never produced: the model picks another token.
    toks, _ = await collect(engine.generate(req(PROMPT, 10, min_tokens=10, stop_token_ids=(stop_at,))))
    assert len(toks) == 10 and stop_at not in toks
    await engine.stop()


async def test_second_identical_prompt_reports_cached_full_blocks(sink: RecordingSink) -> None:
    engine = await started(sink)
    _, first = await collect(engine.generate(req(PROMPT, 4)))
    _, second = await collect(engine.generate(req(PROMPT, 4)))
    await engine.stop()
    assert first.cached_tokens == 0
    assert second.cached_tokens == 96  # 6 full blocks of 16
    ids = [b.event_id for b in sink.batches]
    assert ids == list(range(len(ids)))
    assert all(b.worker_id == 7 for b in sink.batches)
    stored = [e for b in sink.batches for e in b.events if isinstance(e, KvStored)]
    assert stored[0].parent_hash is None


async def test_prompt_bigger_than_cache_errors(sink: RecordingSink) -> None:
    engine = await started(sink, num_gpu_blocks=4)
    toks, last = await asyncio.wait_for(collect(engine.generate(req(list(range(65)), 4))), 2)
    assert toks == [] and last.finish_reason == FinishReason.ERROR and last.error
    await engine.stop()


async def test_cancellation_frees_blocks(sink: RecordingSink) -> None:
    engine = await started(sink, speedup_ratio=100.0)
    stream = engine.generate(req(PROMPT, 10_000))
    out = await stream.__anext__()
    assert out.token_ids
    assert engine.blocks.num_used_blocks > 0
    await stream.aclose()
    assert engine.blocks.num_used_blocks == 0
    assert not engine.scheduler.has_work

    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(req(PROMPT, 10_000, rid="t")):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    assert engine.blocks.num_used_blocks > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.blocks.num_used_blocks == 0
    await engine.stop()


async def test_many_concurrent_streams_and_load_metrics(sink: RecordingSink) -> None:
    engine = await started(sink, max_num_seqs=4, load_publish_interval_s=0.0)
    prompts = [[i] * 40 for i in range(10)]
    results = await asyncio.gather(*(collect(engine.generate(req(p, 8))) for p in prompts))
    await engine.stop()
    assert all(len(t) == 8 and last.finish_reason == FinishReason.LENGTH for t, last in results)
    assert max(m.num_running for m in sink.loads) == 4
    assert max(m.num_waiting for m in sink.loads) > 0
    assert sink.loads[-1].kv_blocks_used == 0 and sink.loads[-1].num_running == 0


async def test_idle_loop_does_not_spin(sink: RecordingSink) -> None:
    engine = await started(sink)
    await collect(engine.generate(req(PROMPT, 4)))
    cpu0 = time.process_time()
    await asyncio.sleep(0.2)  # an idle stretch: the CPU it costs is what is tested
    assert time.process_time() - cpu0 < 0.05
    await engine.stop()


async def test_uncached_prefill_is_visibly_slower_than_cached(
    sink: RecordingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The steps' simulated times, as the engine asked the timing model for them: exact, where the
    # wall clock of a busy machine is not.
    steps: list[float] = []
    timed = TimingModel.step_seconds

    def recorded(self: TimingModel, shape: StepShape, speedup_ratio: float = 1.0) -> float:
        seconds = timed(self, shape, speedup_ratio)
        steps.append(seconds)
        return seconds

    monkeypatch.setattr(TimingModel, "step_seconds", recorded)
    engine = await started(sink, speedup_ratio=1.0, block_size=64, num_gpu_blocks=64)
    prompt = list(range(2000))
    await collect(engine.generate(req(prompt, 1)))
    cold = sum(steps)
    steps.clear()
    _, last = await collect(engine.generate(req(prompt, 1)))
    warm = sum(steps)
    await engine.stop()
    assert last.cached_tokens == 1984
    assert cold > 0.08  # 2,000 uncached tokens
    assert warm < cold / 2  # 16 uncached tokens


async def test_stop_ends_open_streams(sink: RecordingSink) -> None:
    engine = await started(sink, speedup_ratio=1.0)
    task = asyncio.create_task(collect(engine.generate(req(PROMPT, 10_000))))
    await wait_for(lambda: engine.load_metrics().num_running == 1)
    await engine.stop()
    _, last = await asyncio.wait_for(task, 1)
    assert last.finish_reason == FinishReason.CANCELLED


async def test_events_replay_to_the_engine_cache_under_eviction_and_preemption(sink: RecordingSink) -> None:
    roomy = await started(RecordingSink())
    tight = await started(sink, num_gpu_blocks=16, max_num_seqs=8)
    prompts = [[i] * 24 + list(range(16)) for i in range(10)]  # 2 full blocks + 8 tokens each
    expected = [await collect(roomy.generate(req(p, 60))) for p in prompts]
    got = await asyncio.gather(*(collect(tight.generate(req(p, 60))) for p in prompts))
    await roomy.stop()
    # Preemption and recompute must not change a single token.
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert tight.blocks.num_used_blocks == 0

    assert [b.event_id for b in sink.batches] == list(range(len(sink.batches)))
    cached: set[int] = set()
    removed = 0
    for batch in sink.batches:
        for ev in batch.events:
            if isinstance(ev, KvStored):
                # A router inserts under the parent, so the parent must be known at that moment.
                assert ev.parent_hash is None or ev.parent_hash in cached
                for blk in ev.blocks:
                    assert blk.block_hash not in cached
                    cached.add(blk.block_hash)
            elif isinstance(ev, KvRemoved):
                removed += len(ev.block_hashes)
                assert set(ev.block_hashes) <= cached
                cached -= set(ev.block_hashes)
            else:
                assert isinstance(ev, KvCleared)
                cached.clear()
    assert removed > 0
    assert len(cached) == tight.blocks.num_cached_blocks
    assert all(tight.blocks.is_cached(h) for h in cached)

    assert tight.reset_prefix_cache()
    assert sink.batches[-1].events == [KvCleared()]
    assert tight.blocks.num_cached_blocks == 0
    await tight.stop()


async def test_load_metrics_rate_limited_with_idle_heartbeat(sink: RecordingSink) -> None:
    engine = await started(sink, speedup_ratio=1.0, load_publish_interval_s=0.04)
    await collect(engine.generate(req(PROMPT, 20)))  # ~150 ms of simulated steps
    busy = len(sink.loads)
    await wait_for(lambda: len(sink.loads) > busy)  # heartbeats while idle
    await engine.stop()
    gaps = [b - a for a, b in itertools.pairwise(sink.load_times)]
    assert busy >= 3
    assert min(gaps) >= 0.039
    assert len(sink.loads) > busy  # heartbeats while idle
    assert sink.loads[-1] == LoadMetrics(7, 0, 256, 0, 0)


def test_running_context_hash_equals_hashing_the_whole_context() -> None:
    """The executor's per-sequence hash state gives what one-shot XXH3 of `_context` gives, across
    block boundaries, a recompute at the same position, and a fresh executor (migration)."""
    import xxhash

    from turbine.engines.core.scheduler import Seq
    from turbine.engines.mocker.engine import _context, _MockExecutor

    ex = _MockExecutor(MockerConfig(block_size=4))
    seq = Seq(seq_id=7, tokens=[5, 6, 7], prompt_len=3, max_tokens=20, seed=3, block_size=4)
    for step in range(13):
        p = len(seq.tokens)
        expected = xxhash.xxh3_64_intdigest(_context(seq, p))
        assert ex._digest(seq, p) == expected
        assert ex._digest(seq, p) == expected  # asked again (a recomputed step): same state
        assert _MockExecutor(MockerConfig(block_size=4))._digest(seq, p) == expected
        seq.append(100 + step)
    ex.release(seq)
    assert not ex._ctx


async def test_pushed_outputs_equal_pulled_ones_one_per_step(sink: RecordingSink) -> None:
    engine = await started(sink)
    try:
        prompt = list(range(40))
        pulled, last = await collect(engine.generate(req(prompt, 24, seed=5)))
        outs: list[EngineOutput] = []
        await engine.generate_into(req(prompt, 24, seed=5), outs.append)
        assert [t for o in outs for t in o.token_ids] == pulled
        assert all(len(o.token_ids) == 1 for o in outs)  # pushed: nothing coalesced
        assert outs[-1].finish_reason == last.finish_reason == FinishReason.LENGTH
        assert outs[-1].cached_tokens == 32  # the first run's two full prompt blocks
    finally:
        await engine.stop()


async def test_a_failing_sink_ends_only_its_own_request(sink: RecordingSink) -> None:
    engine = await started(sink)
    try:
        seen: list[EngineOutput] = []

        def bad(out: EngineOutput) -> None:
            seen.append(out)
            if len(seen) == 3:
                raise ValueError("client gone")

        other = asyncio.create_task(collect(engine.generate(req(list(range(20)), 40, rid="b"))))
        with pytest.raises(ValueError, match="client gone"):
            await engine.generate_into(req(list(range(100, 130)), 40, rid="a"), bad)
        tokens, last = await other
        assert len(tokens) == 40 and last.finish_reason == FinishReason.LENGTH
        assert len(seen) == 3
        assert engine.blocks.num_used_blocks == 0  # the failed request's blocks are free
    finally:
        await engine.stop()


async def test_cancelling_a_pushed_request_frees_its_blocks(sink: RecordingSink) -> None:
    engine = await started(sink, speedup_ratio=1.0)  # real step times: the request is mid-flight
    try:
        outs: list[EngineOutput] = []
        task = asyncio.create_task(engine.generate_into(req(list(range(64)), 500), outs.append))
        for _ in range(500):
            if outs:
                break
            await asyncio.sleep(0.01)
        assert outs and engine.blocks.num_used_blocks > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.blocks.num_used_blocks == 0
        assert not engine.scheduler.has_work
    finally:
        await engine.stop()
