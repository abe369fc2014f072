"""Pure scoring and selection for the KV-aware router (Dynamo's classic cost) and load-only modes.

Per candidate worker w (lower cost is better):

    prefill_blocks[w] = (isl_tokens − overlap_blocks[w]·block_size + active_prefill_tokens[w]) / block_size
    decode_blocks[w]  = active_decode_blocks[w]           (the caller counts this request's blocks in)
    cost[w]           = overlap_score_weight · prefill_blocks[w] + decode_blocks[w] + extra_cost[w]

The KV router's extra cost (`placement_costs`) is two terms of ours, each in prefill blocks: cache
pressure (cached blocks the placement would evict) and duplication (blocks of a prefix cached
elsewhere that the placement would copy).

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

DUPLICATE_WEIGHT = 2.0
"""Each block of a prefix cached elsewhere that a placement would copy costs this many prefill
blocks on top of computing it: weighing a copy above computing afresh keeps a burst of one prefix
group on the worker that holds it, where lower weights split the group
(`benchmarks/results/README.md`)."""


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
    config: KvRouterConfig, worker: int, isl_tokens: int, overlap_blocks: int, load: WorkerLoad
) -> WorkerCost:
    bs = config.block_size
    # Clamped: a caller may hash more blocks than the prompt it reports (e.g. prompt + generated
    # tokens after a migration); cached tokens beyond the prompt cannot make prefill negative.
    uncached = max(0, isl_tokens - overlap_blocks * bs)
    prefill = (uncached + load.active_prefill_tokens) / bs
    decode = load.active_decode_blocks
    return WorkerCost(worker, overlap_blocks, prefill, decode, config.overlap_score_weight * prefill + decode)


def eviction_cost(
    config: KvRouterConfig, new_blocks: int, blocks_in_use: int, cached_blocks: int, total_blocks: int | None
) -> float:
    """Cache pressure: a placement that allocates `new_blocks` (`blocks_in_use` active blocks with
    them) on a worker caching `cached_blocks` of `total_blocks` pushes the excess out of its cache.
    Those are other prefixes' future misses, so each costs like a prefill block. Without this term,
    spilling a prefix onto a second worker looks cheap and the duplicate evicts some third prefix.
    0 where the capacity is unknown or nothing is evicted."""
    if total_blocks is None:
        return 0.0
    evicted = min(new_blocks, cached_blocks + blocks_in_use - total_blocks)
    return config.overlap_score_weight * evicted if evicted > 0 else 0.0


def duplication_cost(config: KvRouterConfig, overlap_blocks: int, best_overlap: int) -> float:
    """Blocks of this prefix that another worker already caches (`best_overlap` of them) and this
    one (caching `overlap_blocks`) would compute again. Beyond this request's prefill (the prefill
    term), the second copy takes cache space that later pushes other prefixes out, and the prefix's
    later requests split between two caches. Without this term a worker briefly busy with other
    prefixes (a burst's first requests) loses its prefix to an idle worker."""
    copies = best_overlap - overlap_blocks
    return DUPLICATE_WEIGHT * config.overlap_score_weight * copies if copies > 0 else 0.0


def placement_costs(
    config: KvRouterConfig,
    candidates: Sequence[int],
    overlap: OverlapScores,
    loads: Mapping[int, WorkerLoad],
    new_blocks: Mapping[int, int],
    total_kv_blocks: Mapping[int, int],
) -> dict[int, float]:
    """Cache pressure plus duplication per candidate, for `select_worker`'s `extra_cost`; workers
    for which both are 0 are left out. `loads` are the loads with this request placed (its blocks
    counted in `active_decode_blocks`), `new_blocks` the blocks it would allocate on each worker."""
    scores, sizes = overlap.scores, overlap.tree_sizes
    best = max(scores.values(), default=0)
    extra: dict[int, float] = {}
    for w in candidates:
        in_use = loads.get(w, IDLE).active_decode_blocks
        pressure = eviction_cost(config, new_blocks[w], in_use, sizes.get(w, 0), total_kv_blocks.get(w))
        cost = pressure + duplication_cost(config, scores.get(w, 0), best)
        if cost > 0:
            extra[w] = cost
    return extra


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
    overlap: OverlapScores,
    loads: Mapping[int, WorkerLoad],
    rng: random.Random,
    total_kv_blocks: Mapping[int, int] | None = None,
    extra_cost: Mapping[int, float] | None = None,
) -> Selection:
    """Choose among `candidates` for a request of `isl_tokens` prompt tokens.

    `loads` holds active load per worker (absent: idle; the request's own decode blocks are the
    caller's to count in), `total_kv_blocks` each worker's capacity
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
        cost = worker_cost(config, worker, isl_tokens, scores.get(worker, 0), load)
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
