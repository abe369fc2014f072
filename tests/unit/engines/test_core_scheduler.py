"""The mocker scheduler: batching limits, chunked prefill, preemption, stop conditions."""

from __future__ import annotations

import itertools

import pytest

from turbine.engines.core.block_manager import BlockManager
from turbine.engines.core.scheduler import Sampled, Scheduler, SchedulerConfig, Seq, SeqStatus, Update
from turbine.engines.mocker.timing import StepShape, TimingModel, attention_pairs

pytestmark = pytest.mark.unit

BS = 4
_ids = itertools.count()


def seq(prompt_len: int, max_tokens: int = 4, start: int = 0, **kw: object) -> Seq:
    tokens = list(range(start, start + prompt_len))
    return Seq(next(_ids), tokens, len(tokens), max_tokens, block_size=BS, **kw)  # type: ignore[arg-type]


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 32) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget), BlockManager(num_blocks, BS))


def step(s: Scheduler, token: int = 7, eos: bool = False) -> tuple[list[tuple[int, int]], list[Update]]:
    plan = s.schedule()
    work = [(c.seq.seq_id, c.num_new_tokens) for c in plan.chunks]
    return work, plan.finished + s.complete(plan, lambda _: Sampled(token, eos))


def test_respects_max_num_seqs() -> None:
    s = make(max_num_seqs=2, budget=1000)
    seqs = [seq(5, start=100 * i) for i in range(4)]
    for q in seqs:
        s.add(q)
    work, _ = step(s)
    assert [w[0] for w in work] == [seqs[0].seq_id, seqs[1].seq_id]
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_token_budget_chunks_long_prefill() -> None:
    s = make(budget=8)
    long, short = seq(20, max_tokens=2), seq(3, start=500)
    s.add(long)
    s.add(short)
    work, updates = step(s)
    assert work == [(long.seq_id, 8)]  # whole budget; short waits (no budget left)
    assert updates == []
    work, _ = step(s)
    assert work == [(long.seq_id, 8)]
    work, updates = step(s)
    # Last 4 prompt tokens of `long`, then `short` gets the 3 it needs plus 1 spare token unused.
    assert work == [(long.seq_id, 4), (short.seq_id, 3)]
    assert [(u.seq.seq_id, u.token_id) for u in updates] == [(long.seq_id, 7), (short.seq_id, 7)]
    work, _ = step(s)
    assert work == [(long.seq_id, 1), (short.seq_id, 1)]  # both decoding


def test_every_plan_stays_within_limits() -> None:
    s = make(num_blocks=40, max_num_seqs=3, budget=10)
    for i in range(10):
        s.add(seq(3 + 5 * i % 17, max_tokens=5, start=1000 * i))
    for _ in range(200):
        if not s.has_work:
            break
        plan = s.schedule()
        assert len(plan.chunks) <= 3
        assert sum(c.num_new_tokens for c in plan.chunks) <= 10
        s.complete(plan, lambda _: Sampled(7, False))
    assert not s.has_work
    assert s.blocks.num_used_blocks == 0


def test_cached_prefix_is_skipped_and_one_token_always_computed() -> None:
    s = make(budget=100)
    a = seq(8, max_tokens=1)
    s.add(a)
    step(s)
    assert a.status == SeqStatus.FINISHED_LENGTH
    b = seq(8, max_tokens=1)  # same tokens, exactly two blocks
    s.add(b)
    work, _ = step(s)
    # Both blocks are cached but the last token must be recomputed: only block 0 counts as a hit.
    assert b.cached_tokens == 4
    assert work == [(b.seq_id, 4)]


def test_a_prefix_scheduled_in_this_step_is_reused_by_the_next_admission() -> None:
    """vLLM v1 caches blocks when it schedules them: a same-prefix request admitted in the same
    step (or while the step runs) computes only what the first one does not."""
    s = make(budget=100)
    first, second = seq(17), seq(17)  # the same 17 tokens: 4 full blocks + 1
    s.add(first)
    s.add(second)
    work, _ = step(s)
    assert work == [(first.seq_id, 17), (second.seq_id, 1)]
    assert (first.cached_tokens, second.cached_tokens) == (0, 16)
    # A later arrival finds them as well (they stay cached after the step).
    third = seq(17)
    s.add(third)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.num_new_tokens) for c in plan.chunks][-1] == (third.seq_id, 1)
    assert third.cached_tokens == 16


def test_preempts_latest_when_blocks_run_out_and_readmits_it() -> None:
    s = make(num_blocks=4, budget=100)
    a, b = seq(4, max_tokens=8), seq(4, max_tokens=8, start=50)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: 1 block each, first token sampled
    assert a.num_computed == 4 and b.num_computed == 4
    for _ in range(4):  # decodes positions 4..7: both grow to 2 blocks, all 4 used
        step(s)
    assert s.blocks.num_free_blocks == 0
    plan = s.schedule()  # a needs a third block: b (latest) is preempted
    assert plan.num_preempted == 1
    assert [c.seq.seq_id for c in plan.chunks] == [a.seq_id]
    assert b.status == SeqStatus.PREEMPTED and b.num_computed == 0
    assert list(s.waiting) == [b]
    s.complete(plan, lambda _: Sampled(7, False))
    while s.has_work:
        step(s)
    assert [a.status, b.status] == [SeqStatus.FINISHED_LENGTH] * 2
    assert a.num_output == b.num_output == 8
    assert s.blocks.num_used_blocks == 0


def test_prompt_larger_than_cache_is_rejected() -> None:
    s = make(num_blocks=2)
    assert s.rejection(seq(9)) is not None
    assert s.rejection(seq(8)) is None
    assert s.rejection(seq(0)) == "empty prompt"


def test_sequence_outgrowing_whole_cache_finishes_with_length() -> None:
    s = make(num_blocks=2, budget=100)
    a = seq(6, max_tokens=100)
    s.add(a)
    finished: list[Update] = []
    for _ in range(20):
        if not s.has_work:
            break
        finished += [u for u in step(s)[1] if u.finished is not None]
    assert a.status == SeqStatus.FINISHED_LENGTH
    assert finished == [Update(a, None, SeqStatus.FINISHED_LENGTH)]
    assert len(a.tokens) == 9  # 8 KV slots computed, the 9th token sampled but never given room
    assert s.blocks.num_used_blocks == 0


def test_stop_conditions() -> None:
    s = make(budget=100)
    a = seq(3, max_tokens=10, min_tokens=2, eos_token_ids=frozenset({2}), stop_token_ids=frozenset({9}))
    s.add(a)
    _, u = step(s, eos=True)  # EOS drawn under min_tokens: ignored, token emitted
    assert [x[:3] for x in u] == [(a, 7, None)]
    _, u = step(s, token=9)  # a stop token id under min_tokens: emitted as ordinary
    assert [x[:3] for x in u] == [(a, 9, None)]
    _, u = step(s, token=9)
    assert u == [Update(a, None, SeqStatus.FINISHED_STOPPED)]
    assert a.tokens[3:] == [7, 9]

    b = seq(3, max_tokens=3, ignore_eos=True, eos_token_ids=frozenset({2}), start=40)
    s.add(b)
    _, u = step(s, token=2, eos=True)  # ignore_eos: both the draw and the eos id pass through
    assert [x[:3] for x in u] == [(b, 2, None)]


def test_abort_frees_blocks_immediately() -> None:
    s = make(budget=100)
    a = seq(10)
    s.add(a)
    plan = s.schedule()
    assert s.blocks.num_used_blocks == 3
    s.abort(a)
    assert s.blocks.num_used_blocks == 0
    assert a.status == SeqStatus.FINISHED_ABORTED
    assert s.complete(plan, lambda _: Sampled(7, False)) == []
    assert not s.has_work


def test_lifecycle_order() -> None:
    assert SeqStatus.WAITING < SeqStatus.RUNNING < SeqStatus.FINISHED_STOPPED
    assert not SeqStatus.PREEMPTED.is_finished
    assert all(st.is_finished for st in SeqStatus if st.name.startswith("FINISHED"))


def test_timing_shape() -> None:
    t = TimingModel()
    assert attention_pairs(0, 3) == 1 + 2 + 3
    assert attention_pairs(10, 2) == 11 + 12
    assert t.step_ms(StepShape(0, 0, 0, 0)) == 0.0
    prefill = t.step_ms(StepShape(2000, attention_pairs(0, 2000), 0, 0))
    assert 100 < prefill < 200
    small = t.step_ms(StepShape(16, attention_pairs(1984, 16), 0, 0))
    assert small < 10
    decode = t.step_ms(StepShape(0, 0, 64, 64 * 1000))
    assert 7 < decode < 15
    assert t.step_seconds(StepShape(0, 0, 1, 1), speedup_ratio=10) == pytest.approx(
        t.step_ms(StepShape(0, 0, 1, 1)) / 1e4
    )


def test_decoding_takes_a_block_exactly_when_a_token_starts_one_and_caches_each_filled_block() -> None:
    """Most decode steps skip the block manager (the token lands inside the last block and does not
    fill it); the block table must still grow at every boundary and every filled block be cached."""
    s = make(budget=100)
    a = seq(5, max_tokens=12)  # positions 0-4 from the prompt, then decodes at 5, 6, ... 16
    s.add(a)
    step(s)  # the prompt: 2 blocks (positions 0-3 and 4)
    st = s.blocks._seqs[a.seq_id]
    for _ in range(11):
        computed_before = a.num_computed
        step(s)
        assert len(st.table) == -(-a.num_computed // BS)  # exactly the blocks the computed tokens need
        assert st.committed == a.num_computed // BS  # every full block of computed tokens is cached
        assert a.num_computed == computed_before + 1
    assert a.hashes.sequence[: st.committed] == st.shared
