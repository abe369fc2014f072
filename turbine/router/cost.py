"""Pure scoring and selection for the KV-aware router (Dynamo's classic cost) and load-only modes.

Per candidate worker w (lower cost is better):

    prefill_blocks[w] = (isl_tokens − overlap_blocks[w]·block_size + active_prefill_tokens[w]) / block_size
    decode_blocks[w]  = active_decode_blocks[w] + request_blocks        (this request included)
    cost[w]           = overlap_score_weight · prefill_blocks[w] + decode_blocks[w]

Temperature 0 picks the cheapest worker, ties broken by the smaller cached tree (spreading new
prefixes onto the emptier cache) and then at random. Temperature T > 0 min-max normalises the costs
to [0, 1], negates and divides them by T and samples from their softmax, trading some cache hits for
spreading load. Busy workers (over a configured threshold) are skipped; when every candidate is busy
the result is `AllBusy` and the caller rejects the request (503).

No I/O and no hidden state: randomness comes from the injected `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from turbine.router.load import IDLE, WorkerLoad
from turbine.router.prefix_match import OverlapScores

_REL_TIE = 1e-9
"""Costs within this relative distance count as equal: they come from float divisions."""


@dataclass(frozen=True)
class KvRouterConfig:
    """How the KV router weighs cache overlap against load, and when it considers a worker busy."""

    block_size: int
    """Tokens per KV block; must equal the workers' block size (the model card's)."""
    overlap_score_weight: float = 1.0
    """Weight of the prefill term against the decode term; higher favours cache hits, 0 ignores
    the cache and balances decode load only."""
    temperature: float = 0.0
    """0: always the cheapest worker. > 0: softmax sampling over normalised costs; larger spreads more."""
    active_decode_blocks_threshold: float | None = None
    """Busy when active decode blocks > this fraction × the worker's total KV blocks; None: off."""
    active_prefill_tokens_threshold: int | None = None
    """Busy when active prefill tokens > this many; None: off."""

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.overlap_score_weight < 0:
            raise ValueError(f"overlap_score_weight must be >= 0, got {self.overlap_score_weight}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.active_decode_blocks_threshold is not None and self.active_decode_blocks_threshold < 0:
            raise ValueError("active_decode_blocks_threshold must be >= 0")
        if self.active_prefill_tokens_threshold is not None and self.active_prefill_tokens_threshold < 0:
            raise ValueError("active_prefill_tokens_threshold must be >= 0")


class WorkerCost(NamedTuple):
    """One candidate's cost and its parts, for logs and metrics."""

    worker: int
    overlap_blocks: int
    prefill_blocks: float
    decode_blocks: int
    cost: float


@dataclass(frozen=True)
class Selected:
    worker: int
    cost: float
    overlap_blocks: int
    costs: tuple[WorkerCost, ...]
    """Every candidate that was not busy, in candidate order."""
    busy: tuple[int, ...] = ()
    """Candidates skipped as busy."""


@dataclass(frozen=True)
class AllBusy:
    """Every candidate was over a busy threshold; the caller rejects the request."""

    busy: tuple[int, ...]


Selection = Selected | AllBusy


def is_busy(config: KvRouterConfig, load: WorkerLoad, total_kv_blocks: int | None) -> bool:
    """Over either threshold. A worker whose total KV blocks are unknown is never busy on decode."""
    decode_limit = config.active_decode_blocks_threshold
    if (
        decode_limit is not None
        and total_kv_blocks is not None
        and load.active_decode_blocks > decode_limit * total_kv_blocks
    ):
        return True
    prefill_limit = config.active_prefill_tokens_threshold
    return prefill_limit is not None and load.active_prefill_tokens > prefill_limit


def worker_cost(
    config: KvRouterConfig,
    worker: int,
    isl_tokens: int,
    request_blocks: int,
    overlap_blocks: int,
    load: WorkerLoad,
) -> WorkerCost:
    bs = config.block_size
    # Clamped: a caller may hash more blocks than the prompt it reports (e.g. prompt + generated
    # tokens after a migration); cached tokens beyond the prompt cannot make prefill negative.
    uncached = max(0, isl_tokens - overlap_blocks * bs)
    prefill = (uncached + load.active_prefill_tokens) / bs
    decode = load.active_decode_blocks + request_blocks
    return WorkerCost(worker, overlap_blocks, prefill, decode, config.overlap_score_weight * prefill + decode)


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """Selection probabilities at `temperature` > 0: softmax of −(min-max normalised cost) / T."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    lo, hi = min(costs), max(costs)
    if hi - lo <= _REL_TIE * max(1.0, abs(hi)):
        return [1.0 / len(costs)] * len(costs)
    span = hi - lo
    # The cheapest worker's logit is 0 and the rest are negative, so exp never overflows.
    weights = [math.exp(-(c - lo) / span / temperature) for c in costs]
    total = sum(weights)
    return [w / total for w in weights]


def select_worker(
    config: KvRouterConfig,
    candidates: Sequence[int],
    *,
    isl_tokens: int,
    request_blocks: int,
    overlap: OverlapScores,
    loads: Mapping[int, WorkerLoad],
    rng: random.Random,
    total_kv_blocks: Mapping[int, int] | None = None,
    extra_cost: Mapping[int, float] | None = None,
) -> Selection:
    """Choose among `candidates` for a request of `isl_tokens` prompt tokens occupying `request_blocks`.

    `loads` holds active load per worker (absent: idle), `total_kv_blocks` each worker's capacity
    (absent: unknown, so never busy on decode blocks). `extra_cost` adds a per-worker term in the
    same unit (blocks) to the classic cost, e.g. the cached blocks a placement would evict.
    """
    if not candidates:
        raise ValueError("select_worker needs at least one candidate")
    totals = total_kv_blocks or {}
    scores = overlap.scores
    costs: list[WorkerCost] = []
    busy: list[int] = []
    for worker in candidates:
        load = loads.get(worker, IDLE)
        if is_busy(config, load, totals.get(worker)):
            busy.append(worker)
            continue
        cost = worker_cost(config, worker, isl_tokens, request_blocks, scores.get(worker, 0), load)
        if extra_cost and worker in extra_cost:
            cost = cost._replace(cost=cost.cost + extra_cost[worker])
        costs.append(cost)
    if not costs:
        return AllBusy(tuple(busy))
    if config.temperature > 0:
        probs = softmax_probabilities([c.cost for c in costs], config.temperature)
        chosen = costs[_sample(probs, rng)]
    else:
        chosen = _argmin(costs, overlap.tree_sizes, rng)
    return Selected(chosen.worker, chosen.cost, chosen.overlap_blocks, tuple(costs), tuple(busy))


def _argmin(costs: list[WorkerCost], tree_sizes: Mapping[int, int], rng: random.Random) -> WorkerCost:
    best = min(c.cost for c in costs)
    tol = _REL_TIE * max(1.0, abs(best))
    tied = [c for c in costs if c.cost - best <= tol]
    if len(tied) > 1:
        smallest = min(tree_sizes.get(c.worker, 0) for c in tied)
        tied = [c for c in tied if tree_sizes.get(c.worker, 0) == smallest]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def _sample(probs: Sequence[float], rng: random.Random) -> int:
    r = rng.random()
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if r < acc:
            return i
    return len(probs) - 1  # float rounding left the sum just under 1


def _load_key(loads: Mapping[int, WorkerLoad], worker: int) -> tuple[int, int]:
    load = loads.get(worker, IDLE)
    return load.active_requests, load.active_decode_blocks


def least_loaded(candidates: Sequence[int], loads: Mapping[int, WorkerLoad], rng: random.Random) -> int:
    """Fewest active requests, then fewest active decode blocks; remaining ties at random."""
    if not candidates:
        raise ValueError("least_loaded needs at least one candidate")
    keys = [_load_key(loads, w) for w in candidates]
    best = min(keys)
    tied = [w for w, k in zip(candidates, keys, strict=True) if k == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def power_of_two(candidates: Sequence[int], loads: Mapping[int, WorkerLoad], rng: random.Random) -> int:
    """Sample two distinct candidates and take the less loaded (as in `least_loaded`; tie: the first).

    Nearly as balanced as least-loaded but without every frontend herding onto the same idle worker.
    """
    if not candidates:
        raise ValueError("power_of_two needs at least one candidate")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    return a if _load_key(loads, a) <= _load_key(loads, b) else b
