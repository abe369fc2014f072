import collections
import random

import pytest

from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.router.simple import RandomRouter, RoundRobinRouter

pytestmark = pytest.mark.unit


def _req() -> PreprocessedRequest:
    return PreprocessedRequest("r", "m", [1, 2, 3], SamplingOptions(), StopConditions(max_tokens=4))


def test_round_robin_cycles_in_order() -> None:
    router = RoundRobinRouter()
    picks = [router.select(_req(), [10, 20, 30]).instance_id for _ in range(7)]
    assert picks == [10, 20, 30, 10, 20, 30, 10]


def test_round_robin_stays_even_when_candidates_shrink() -> None:
    router = RoundRobinRouter()
    counts = collections.Counter(router.select(_req(), [1, 2]).instance_id for _ in range(10))
    assert counts == {1: 5, 2: 5}


def test_random_is_seeded_and_covers_every_candidate() -> None:
    a = RandomRouter(random.Random(3))
    b = RandomRouter(random.Random(3))
    picks_a = [a.select(_req(), [1, 2, 3]).instance_id for _ in range(300)]
    picks_b = [b.select(_req(), [1, 2, 3]).instance_id for _ in range(300)]
    assert picks_a == picks_b
    counts = collections.Counter(picks_a)
    assert set(counts) == {1, 2, 3}
    assert all(60 < c < 140 for c in counts.values())
