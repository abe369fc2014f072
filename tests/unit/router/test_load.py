import random

import pytest

from turbine.router.load import LoadTracker, WorkerLoad, request_blocks

pytestmark = pytest.mark.unit


def test_request_blocks_rounds_up_prompt_plus_expected_output() -> None:
    assert request_blocks(100, 28, 16) == 8
    assert request_blocks(100, 29, 16) == 9
    assert request_blocks(0, 0, 16) == 0
    assert request_blocks(1, -5, 16) == 1  # a negative expectation counts as none
    with pytest.raises(ValueError):
        request_blocks(1, 1, 0)


def test_prefill_counts_until_first_token_and_decode_until_finish() -> None:
    tracker = LoadTracker()
    tracker.add_request("a", 1, prefill_tokens=100, decode_blocks=8)
    tracker.add_request("b", 1, prefill_tokens=50, decode_blocks=4)
    tracker.add_request("c", 2, prefill_tokens=10, decode_blocks=1)
    assert tracker.load(1) == WorkerLoad(2, 150, 12)
    assert (
        tracker.active_requests(1),
        tracker.active_prefill_tokens(1),
        tracker.active_decode_blocks(1),
    ) == (
        2,
        150,
        12,
    )
    tracker.prefill_done("a")
    assert tracker.load(1) == WorkerLoad(2, 50, 12)
    tracker.prefill_done("a")  # repeated: no change
    assert tracker.load(1) == WorkerLoad(2, 50, 12)
    assert tracker.finish("a") is True
    assert tracker.load(1) == WorkerLoad(1, 50, 4)
    assert tracker.snapshot() == {1: WorkerLoad(1, 50, 4), 2: WorkerLoad(1, 10, 1)}
    assert tracker.worker_of("b") == 1
    assert len(tracker) == 2


def test_finish_is_idempotent_and_ignores_unknown_ids() -> None:
    tracker = LoadTracker()
    tracker.add_request("a", 1, 10, 2)
    assert tracker.finish("a") is True
    assert tracker.finish("a") is False
    assert tracker.finish("never-routed") is False
    tracker.prefill_done("a")  # after finish: ignored
    tracker.prefill_done("never-routed")
    assert tracker.snapshot() == {}
    assert tracker.load(1) == WorkerLoad()
    assert tracker.worker_of("a") is None


def test_finish_before_first_token_releases_the_prefill_tokens() -> None:
    tracker = LoadTracker()
    tracker.add_request("a", 1, 100, 8)
    tracker.add_request("b", 1, 30, 2)
    tracker.finish("a")  # cancelled while still prefilling
    assert tracker.load(1) == WorkerLoad(1, 30, 2)


def test_re_routing_the_same_id_moves_its_load() -> None:
    tracker = LoadTracker()
    tracker.add_request("a", 1, 100, 8)
    tracker.add_request("a", 2, 120, 9)  # migrated with its generated tokens appended
    assert tracker.snapshot() == {2: WorkerLoad(1, 120, 9)}
    tracker.finish("a")
    assert tracker.snapshot() == {}


def test_remove_worker_drops_its_requests() -> None:
    tracker = LoadTracker()
    tracker.add_request("a", 1, 100, 8)
    tracker.add_request("b", 2, 10, 1)
    tracker.remove_worker(1)
    tracker.remove_worker(7)
    assert tracker.snapshot() == {2: WorkerLoad(1, 10, 1)}
    assert tracker.finish("a") is False
    assert len(tracker) == 1


def test_loads_is_a_live_read_only_view() -> None:
    tracker = LoadTracker()
    loads = tracker.loads
    tracker.add_request("a", 3, 5, 1)
    assert loads[3] == WorkerLoad(1, 5, 1)
    with pytest.raises(TypeError):
        loads[3] = WorkerLoad()  # type: ignore[index]


def test_negative_load_is_rejected() -> None:
    with pytest.raises(ValueError):
        LoadTracker().add_request("a", 1, -1, 0)


def test_no_leaks_after_many_requests_ending_every_way() -> None:
    rng = random.Random(11)
    tracker = LoadTracker()
    # The model: request id -> (worker, prefill still counting, decode blocks)
    live: dict[str, tuple[int, int, int]] = {}
    pending = [f"r{i}" for i in range(1000)]
    routed: list[str] = []

    def check() -> None:
        expected: dict[int, WorkerLoad] = {}
        for worker, prefill, blocks in live.values():
            load = expected.get(worker, WorkerLoad())
            expected[worker] = WorkerLoad(
                load.active_requests + 1,
                load.active_prefill_tokens + prefill,
                load.active_decode_blocks + blocks,
            )
        assert tracker.snapshot() == expected
        assert len(tracker) == len(live)

    while pending or routed:
        if pending and (not routed or rng.random() < 0.5):
            rid = pending.pop()
            worker, prefill, blocks = rng.randrange(8), rng.randrange(1, 4000), rng.randrange(1, 300)
            tracker.add_request(rid, worker, prefill, blocks)
            live[rid] = (worker, prefill, blocks)
            routed.append(rid)
        else:
            rid = routed.pop(rng.randrange(len(routed)))
            outcome = rng.choice(["success", "error", "cancel"])
            # success always saw a first token; errors and cancels may come before or after it.
            if outcome == "success" or rng.random() < 0.5:
                tracker.prefill_done(rid)
                worker, _, blocks = live[rid]
                live[rid] = (worker, 0, blocks)
            assert tracker.finish(rid) is True
            del live[rid]
            if rng.random() < 0.2:  # the pipeline reports the end twice (e.g. error then cancel)
                assert tracker.finish(rid) is False
            if rng.random() < 0.1:  # a late first token after the end
                tracker.prefill_done(rid)
        check()
    assert tracker.snapshot() == {}
    assert len(tracker) == 0
    assert all(tracker.load(w) == WorkerLoad() for w in range(8))
