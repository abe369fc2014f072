import collections
import math
import random

import pytest

from turbine.router.cost import (
    DUPLICATE_WEIGHT,
    AllBusy,
    KvRouterConfig,
    Selected,
    WorkerCost,
    duplication_cost,
    eviction_cost,
    is_busy,
    least_loaded,
    placement_costs,
    power_of_two,
    select_worker,
    softmax_probabilities,
)
from turbine.router.load import WorkerLoad
from turbine.router.radix_index import OverlapScores

pytestmark = pytest.mark.unit

BS = 16


def overlap(scores: dict[int, int], sizes: dict[int, int] | None = None) -> OverlapScores:
    return OverlapScores(scores, sizes or {})


def decode_only(blocks: int) -> WorkerLoad:
    return WorkerLoad(active_requests=1, active_prefill_tokens=0, active_decode_blocks=blocks)


def test_worked_example_picks_the_second_worker() -> None:
    # A 10-block prompt; (prefill, decode) blocks per worker: (8, 10), (5, 5), (2, 9). The decode
    # load includes the request's own block: the caller counts it in.
    result = select_worker(
        KvRouterConfig(block_size=BS),
        [0, 1, 2],
        isl_tokens=10 * BS,
        overlap=overlap({0: 2, 1: 5, 2: 8}),
        loads={0: decode_only(10), 1: decode_only(5), 2: decode_only(9)},
        rng=random.Random(0),
    )
    assert result == Selected(
        worker=1,
        cost=10.0,
        overlap_blocks=5,
        costs=(
            WorkerCost(0, 2, 8.0, 10, 18.0),
            WorkerCost(1, 5, 5.0, 5, 10.0),
            WorkerCost(2, 8, 2.0, 9, 11.0),
        ),
    )


def test_active_prefill_tokens_add_to_the_prefill_term() -> None:
    result = select_worker(
        KvRouterConfig(block_size=BS),
        [0, 1],
        isl_tokens=4 * BS,
        overlap=overlap({0: 4}),
        loads={0: WorkerLoad(1, 10 * BS, 4), 1: decode_only(4)},
        rng=random.Random(0),
    )
    assert isinstance(result, Selected)
    assert result.costs == (WorkerCost(0, 4, 10.0, 4, 14.0), WorkerCost(1, 0, 4.0, 4, 8.0))
    assert result.worker == 1


@pytest.mark.parametrize(("weight", "chosen"), [(0.0, 1), (1.0, 1), (3.0, 0)])
def test_overlap_weight_trades_cache_hits_against_decode_load(weight: float, chosen: int) -> None:
    # Worker 0 holds the whole prompt but is decoding more; worker 1 is idle with nothing cached.
    result = select_worker(
        KvRouterConfig(block_size=BS, overlap_score_weight=weight),
        [0, 1],
        isl_tokens=8 * BS,
        overlap=overlap({0: 8}),
        loads={0: decode_only(20), 1: decode_only(8)},
        rng=random.Random(0),
    )
    assert isinstance(result, Selected)
    assert result.worker == chosen


def test_prefill_never_goes_negative_when_more_blocks_match_than_the_prompt_has() -> None:
    result = select_worker(
        KvRouterConfig(block_size=BS),
        [0],
        isl_tokens=BS,
        overlap=overlap({0: 3}),
        loads={0: decode_only(1)},
        rng=random.Random(0),
    )
    assert isinstance(result, Selected)
    assert result.costs == (WorkerCost(0, 3, 0.0, 1, 1.0),)


def test_ties_go_to_the_smaller_tree_then_at_random() -> None:
    config = KvRouterConfig(block_size=BS)

    def pick(sizes: dict[int, int], seed: int) -> int:
        result = select_worker(
            config,
            [0, 1, 2],
            isl_tokens=2 * BS,
            overlap=overlap({}, sizes),
            loads={2: decode_only(5)},  # worker 2 costs more, never picked
            rng=random.Random(seed),
        )
        assert isinstance(result, Selected)
        return result.worker

    assert {pick({0: 50, 1: 10, 2: 0}, seed) for seed in range(20)} == {1}
    assert {pick({0: 10, 1: 50, 2: 0}, seed) for seed in range(20)} == {0}
    assert {pick({0: 7, 1: 7}, seed) for seed in range(40)} == {0, 1}


def test_softmax_probabilities_follow_normalised_costs() -> None:
    probs = softmax_probabilities([10.0, 15.0, 20.0], temperature=1.0)
    weights = [1.0, math.exp(-0.5), math.exp(-1.0)]
    assert probs == pytest.approx([w / sum(weights) for w in weights])
    # Normalisation makes the scale of the costs irrelevant.
    assert softmax_probabilities([100.0, 150.0, 200.0], 1.0) == pytest.approx(probs)
    assert softmax_probabilities([3.0, 3.0], 0.5) == [0.5, 0.5]
    # A low temperature concentrates on the cheapest worker.
    assert softmax_probabilities([10.0, 20.0], 0.05)[0] > 0.99
    with pytest.raises(ValueError):
        softmax_probabilities([1.0], 0.0)


def test_positive_temperature_samples_by_softmax_of_cost() -> None:
    config = KvRouterConfig(block_size=BS, temperature=0.5)
    loads = {0: decode_only(1), 1: decode_only(6), 2: decode_only(11)}
    rng = random.Random(1234)
    trials = 20_000
    counts: collections.Counter[int] = collections.Counter()
    for _ in range(trials):
        result = select_worker(config, [0, 1, 2], isl_tokens=BS, overlap=overlap({}), loads=loads, rng=rng)
        assert isinstance(result, Selected)
        counts[result.worker] += 1
    expected = softmax_probabilities([2.0, 7.0, 12.0], 0.5)
    assert counts[0] > counts[1] > counts[2] > 0
    for worker, p in enumerate(expected):
        assert counts[worker] / trials == pytest.approx(p, abs=0.015)


def test_busy_workers_are_skipped_even_when_cheapest() -> None:
    config = KvRouterConfig(
        block_size=BS, active_decode_blocks_threshold=0.5, active_prefill_tokens_threshold=1000
    )
    result = select_worker(
        config,
        [0, 1, 2, 3],
        isl_tokens=4 * BS,
        overlap=overlap({0: 4, 1: 4}),
        loads={0: decode_only(51), 1: WorkerLoad(1, 1001, 0), 2: decode_only(50), 3: decode_only(60)},
        total_kv_blocks={0: 100, 1: 100, 2: 100},  # worker 3's capacity is unknown: never busy on decode
        rng=random.Random(0),
    )
    assert isinstance(result, Selected)
    assert result.busy == (0, 1)
    assert [c.worker for c in result.costs] == [2, 3]
    assert result.worker == 2


def test_all_busy_is_reported() -> None:
    config = KvRouterConfig(block_size=BS, active_prefill_tokens_threshold=0)
    result = select_worker(
        config,
        [5, 6],
        isl_tokens=BS,
        overlap=overlap({}),
        loads={5: WorkerLoad(1, 1, 0), 6: WorkerLoad(1, 3, 0)},
        rng=random.Random(0),
    )
    assert result == AllBusy(busy=(5, 6))


def test_is_busy_thresholds_are_off_by_default() -> None:
    assert not is_busy(KvRouterConfig(block_size=BS), WorkerLoad(9, 10**9, 10**9), 1)
    config = KvRouterConfig(block_size=BS, active_decode_blocks_threshold=0.9)
    assert not is_busy(config, decode_only(90), 100)
    assert is_busy(config, decode_only(91), 100)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"block_size": 0},
        {"block_size": 16, "overlap_score_weight": -1.0},
        {"block_size": 16, "temperature": -0.1},
        {"block_size": 16, "active_decode_blocks_threshold": -0.5},
        {"block_size": 16, "active_prefill_tokens_threshold": -1},
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        KvRouterConfig(**kwargs)  # type: ignore[arg-type]


def test_selection_needs_candidates() -> None:
    with pytest.raises(ValueError):
        select_worker(
            KvRouterConfig(block_size=BS),
            [],
            isl_tokens=1,
            overlap=overlap({}),
            loads={},
            rng=random.Random(0),
        )


def test_least_loaded_orders_by_requests_then_decode_blocks() -> None:
    loads = {1: WorkerLoad(2, 0, 1), 2: WorkerLoad(1, 0, 9), 3: WorkerLoad(1, 0, 4)}
    assert least_loaded([1, 2, 3], loads, random.Random(0)) == 3
    assert least_loaded([1, 2, 3, 4], loads, random.Random(0)) == 4  # unknown: idle
    picks = {least_loaded([5, 6], {}, random.Random(seed)) for seed in range(30)}
    assert picks == {5, 6}


def test_power_of_two_takes_the_less_loaded_of_two_samples() -> None:
    loads = {1: WorkerLoad(5, 0, 0), 2: WorkerLoad(0, 0, 0), 3: WorkerLoad(9, 0, 0)}
    rng = random.Random(3)
    picks = collections.Counter(power_of_two([1, 2, 3], loads, rng) for _ in range(3000))
    # The busiest worker only wins when paired with itself, which sampling without replacement never does.
    assert picks[3] == 0
    # Worker 2 wins every pair it is in (2/3 of them), worker 1 only the (1, 3) pair.
    assert picks[2] / 3000 == pytest.approx(2 / 3, abs=0.03)
    assert power_of_two([8], {}, rng) == 8
    with pytest.raises(ValueError):
        power_of_two([], {}, rng)
    with pytest.raises(ValueError):
        least_loaded([], {}, rng)


def test_extra_cost_is_added_per_worker() -> None:
    chosen = select_worker(
        KvRouterConfig(block_size=4),
        [1, 2],
        isl_tokens=8,
        overlap=OverlapScores({}, {}),
        loads={1: decode_only(2), 2: decode_only(2)},
        rng=random.Random(0),
        extra_cost={1: 100.0},
    )
    assert not isinstance(chosen, AllBusy)
    assert chosen.worker == 2
    assert {c.worker: c.cost for c in chosen.costs}[1] == pytest.approx(104.0)


def test_eviction_cost_counts_the_cached_blocks_a_placement_pushes_out() -> None:
    config = KvRouterConfig(block_size=BS, overlap_score_weight=1.5)
    # 90 cached + 20 in use (10 of them new) on 100 blocks: 10 cached blocks go, at the prefill weight.
    assert eviction_cost(config, 10, 20, 90, 100) == 15.0
    # Never more than the blocks the placement allocates itself.
    assert eviction_cost(config, 4, 20, 90, 100) == 6.0
    assert eviction_cost(config, 10, 20, 80, 100) == 0.0  # it all fits
    assert eviction_cost(config, 10, 20, 90, None) == 0.0  # capacity unknown


def test_duplication_cost_counts_the_blocks_another_worker_caches_already() -> None:
    config = KvRouterConfig(block_size=BS, overlap_score_weight=0.5)
    assert duplication_cost(config, 2, 6) == DUPLICATE_WEIGHT * 0.5 * 4
    assert duplication_cost(config, 6, 6) == 0.0
    assert duplication_cost(KvRouterConfig(block_size=BS, overlap_score_weight=0.0), 0, 6) == 0.0


def test_placement_costs_add_both_terms_and_leave_out_free_placements() -> None:
    config = KvRouterConfig(block_size=BS)
    costs = placement_costs(
        config,
        [0, 1, 2, 3],
        overlap({0: 5, 1: 2}, {0: 50, 1: 98, 2: 10, 3: 0}),
        loads={0: decode_only(3), 1: decode_only(6), 2: decode_only(8), 3: decode_only(8)},
        new_blocks={0: 3, 1: 6, 2: 8, 3: 8},
        total_kv_blocks={0: 100, 1: 100, 2: 100},
    )
    # 0 caches the whole prefix and has room; 1 evicts 4 and copies 3 blocks; 2 has room and
    # copies 5; 3's capacity is unknown, so it only copies 5.
    assert costs == {1: 4.0 + DUPLICATE_WEIGHT * 3, 2: DUPLICATE_WEIGHT * 5, 3: DUPLICATE_WEIGHT * 5}
