"""The KV-aware router (`--router-mode kv`) and the load-only routers (least-loaded, power-of-two).

KvRouter: hash the request's prompt into chained blocks, ask the index how long a prefix each worker
already caches, and pick by Dynamo's cost (uncached prefill + active decode load) plus two terms of
ours: cache pressure (blocks a placement evicts) and duplication (blocks of a prefix cached
elsewhere that a placement copies); every cost term is in cost.py. `select` goes overlap → loads
with the request placed → cost → choice. The index follows the workers' KV events (RadixIndex)
or, with `--no-kv-events`, remembers where the router itself sent each prefix (ApproxIndex, TTL +
LRU). Load is counted from the router's own
decisions (load.py) so a burst sees the load it creates. Busy workers are skipped; when every
candidate is busy the request is rejected with 503.
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from turbine.errors import ServiceUnavailable
from turbine.kv.hashing import block_hashes
from turbine.protocol.kv_events import KvDump, KvEventBatch, LoadMetrics
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.router_events import (
    Finished,
    PrefillDone,
    ReplicaState,
    Routed,
    RouterEvent,
    RouterSyncBatch,
)
from turbine.router.active_blocks import ActiveBlocks
from turbine.router.approx_index import ApproxIndex
from turbine.router.base import Decision
from turbine.router.cost import (
    AllBusy,
    KvRouterConfig,
    Selected,
    least_loaded,
    placement_costs,
    power_of_two,
    select_worker,
)
from turbine.router.load import IDLE, LoadTracker, WorkerLoad, request_blocks
from turbine.router.peers import PeerRequests, peer_key
from turbine.router.radix_index import OverlapScores, RadixIndex

log = logging.getLogger(__name__)

# With more candidates than this, only a shortlist of them is scored (see `KvRouter._shortlist`).
SHORTLIST_ABOVE = 16
IDLE_SHORTLIST = 4


@dataclass(frozen=True)
class KvRouterSettings:
    """Everything but the block size, which comes from the workers' cards unless overridden."""

    overlap_score_weight: float = 1.0
    temperature: float = 0.0
    use_kv_events: bool = True
    ttl_s: float = 120.0
    active_decode_blocks_threshold: float | None = None
    active_prefill_tokens_threshold: int | None = None
    block_size_override: int | None = None


class _LoadCounting:
    """Lifecycle callbacks shared by every router that counts its own decisions, and the peer side
    of replica sync: with a listener set (`sync_with_peers`), every routing lifecycle step is also
    reported as a `RouterEvent`, and peers' events are counted as load under replica-scoped keys."""

    def __init__(self) -> None:
        self.load = LoadTracker()
        self._workers: set[int] = set()
        self._listener: Callable[[RouterEvent], None] | None = None
        self._own: set[str] = set()
        self.peers: PeerRequests | None = None

    def _forget_missing(self, cards: Mapping[int, ModelDeploymentCard]) -> list[int]:
        gone = [w for w in self._workers if w not in cards]
        for worker in gone:
            self.load.remove_worker(worker)
        self._workers = set(cards)
        return gone

    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None:
        self._forget_missing(cards)

    def on_first_token(self, request_id: str, decision: Decision) -> None:
        self.load.prefill_done(request_id)
        if self._listener is not None and request_id in self._own:
            self._listener(PrefillDone(request_id))

    def on_finish(self, request_id: str, decision: Decision) -> None:
        self._drop(request_id)
        if self._listener is not None and request_id in self._own:
            self._own.discard(request_id)
            self._listener(Finished(request_id))

    def _drop(self, key: str) -> None:
        """Stop counting a request (own id or peer key), whatever state it was in."""
        self.load.finish(key)

    def _count_peer(self, key: str, event: Routed) -> None:
        self.load.add_request(key, event.worker, event.prefill_tokens, event.decode_blocks)

    def _report_routed(self, event: Routed) -> None:
        if self._listener is not None:
            self._own.add(event.request_id)
            self._listener(event)

    # ------------------------------------------------------------------------- replica sync

    def sync_with_peers(self, listener: Callable[[RouterEvent], None], expiry_s: float) -> None:
        """Report every routing step to `listener`; count peers' requests (see `apply_peer_batch`)."""
        self._listener = listener
        self.peers = PeerRequests(expiry_s)

    def own_active(self) -> list[str]:
        """This replica's active request ids (the heartbeat's content)."""
        return list(self._own)

    def apply_peer_batch(self, batch: RouterSyncBatch) -> None:
        peers = self.peers
        if peers is None:
            return
        replica = batch.replica_id
        peers.seen(replica)
        workers = self._workers
        count, drop = self._count_peer, self._drop
        for event in batch.events:
            if type(event) is Routed:
                # A worker this replica does not know (yet, or any more) has no load to count.
                if event.worker in workers:
                    count(peers.add(replica, event.request_id), event)
            elif type(event) is Finished:
                drop(peers.discard(replica, event.request_id))
            elif type(event) is PrefillDone:
                self.load.prefill_done(peer_key(replica, event.request_id))
            elif isinstance(event, ReplicaState):
                for key in peers.reconcile(replica, event.active):
                    self._drop(key)

    def expire_peers(self) -> int:
        """Stop counting the requests of peers that fell silent; returns how many were dropped."""
        if self.peers is None:
            return 0
        keys = self.peers.expire()
        for key in keys:
            self._drop(key)
        return len(keys)


class LoadRouter(_LoadCounting):
    """least-loaded (fewest active requests, then decode blocks) or power-of-two choices."""

    def __init__(self, mode: str, rng: random.Random | None = None) -> None:
        super().__init__()
        if mode not in ("least-loaded", "power-of-two"):
            raise ValueError(f"unknown load router mode {mode!r}")
        self._pick = least_loaded if mode == "least-loaded" else power_of_two
        self._rng = rng or random.Random()
        self._block_size = 64

    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None:
        super().update_instances(cards)
        if cards:
            self._block_size = next(iter(cards.values())).kv_block_size

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        worker = self._pick(candidates, self.load.loads, self._rng)
        prompt = len(request.token_ids)
        blocks = request_blocks(prompt, 0, self._block_size)
        self.load.add_request(request.request_id, worker, prompt, blocks)
        if self._listener is not None:
            self._report_routed(Routed(request.request_id, worker, prompt, blocks, [], 0, 0))
        return Decision(worker)


def _log_choice(request_id: str, chosen: Selected, extra: Mapping[int, float]) -> None:
    log.debug(
        "request %s -> %x (overlap %d): %s",
        request_id,
        chosen.worker,
        chosen.overlap_blocks,
        ", ".join(
            f"{c.worker:x}: ov {c.overlap_blocks} pf {c.prefill_blocks:.1f} dc {c.decode_blocks}"
            f" +{extra.get(c.worker, 0):.0f} = {c.cost:.1f}"
            for c in chosen.costs
        ),
    )


class KvRouter(_LoadCounting):
    def __init__(self, settings: KvRouterSettings, rng: random.Random | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._rng = rng or random.Random()
        self._config: KvRouterConfig | None = None
        self._capacity: dict[int, int] = {}
        self.index = RadixIndex()
        self.approx = ApproxIndex(settings.ttl_s)
        self.pending = ApproxIndex(settings.ttl_s, remember_evictions=True)
        self.active = ActiveBlocks()
        self.worker_load: dict[int, LoadMetrics] = {}
        self._warned: set[int] = set()
        self._has_peers = False

    @property
    def wants_events(self) -> bool:
        return self.settings.use_kv_events

    @property
    def block_size(self) -> int | None:
        return self._config.block_size if self._config else None

    # -------------------------------------------------------------------------------- instances

    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None:
        for worker in self._forget_missing(cards):
            self.index.remove_worker(worker)
            self.approx.remove_worker(worker)
            self.pending.remove_worker(worker)
            self.active.remove_worker(worker)
            self._capacity.pop(worker, None)
            self.worker_load.pop(worker, None)
            self._warned.discard(worker)
        if self._config is None and cards:
            s = self.settings
            block_size = s.block_size_override or next(iter(cards.values())).kv_block_size
            self._config = KvRouterConfig(
                block_size=block_size,
                overlap_score_weight=s.overlap_score_weight,
                temperature=s.temperature,
                active_decode_blocks_threshold=s.active_decode_blocks_threshold,
                active_prefill_tokens_threshold=s.active_prefill_tokens_threshold,
            )
        for worker, card in cards.items():
            mismatch = self._config is not None and card.kv_block_size != self._config.block_size
            if mismatch and worker not in self._warned and self._config is not None:
                self._warned.add(worker)
                log.warning(
                    "KV ROUTING IS DEGRADED: worker %x of %s uses KV block size %d but the router hashes "
                    "with %d; its cache overlap will read as zero. Align --block-size on the workers or "
                    "--kv-cache-block-size on the frontend.",
                    worker,
                    card.name,
                    card.kv_block_size,
                    self._config.block_size,
                )
            if card.total_kv_blocks is not None and self._capacity.get(worker) != card.total_kv_blocks:
                self._capacity[worker] = card.total_kv_blocks
                self.approx.set_capacity(worker, card.total_kv_blocks)
                self.pending.set_capacity(worker, card.total_kv_blocks)

    # --------------------------------------------------------------------------------- routing

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        config = self._config
        assert config is not None, "instances are known before any request is routed"
        hashes = block_hashes(request.token_ids, config.block_size).sequence
        overlap, in_flight = self._overlap(hashes)
        if len(candidates) > SHORTLIST_ABOVE:
            candidates = self._shortlist(candidates, overlap)
        isl = len(request.token_ids)
        tail = request_blocks(isl, 0, config.block_size) - len(hashes)
        loads, new_blocks = self._placed_loads(candidates, hashes, tail, overlap, in_flight)
        extra = placement_costs(config, candidates, overlap, loads, new_blocks, self._capacity)
        chosen = select_worker(
            config,
            candidates,
            isl_tokens=isl,
            overlap=overlap,
            loads=loads,
            rng=self._rng,
            total_kv_blocks=self._capacity,
            extra_cost=extra,
        )
        if isinstance(chosen, AllBusy):
            raise ServiceUnavailable(
                f"all {len(chosen.busy)} worker(s) of model '{request.model}' are busy; retry later"
            )
        if log.isEnabledFor(logging.DEBUG):
            _log_choice(request.request_id, chosen, extra)
        uncached = max(0, isl - chosen.overlap_blocks * config.block_size)
        self._place(request.request_id, chosen, hashes, tail, uncached)
        return Decision(chosen.worker, chosen.overlap_blocks)

    def _overlap(self, hashes: list[int]) -> tuple[OverlapScores, dict[int, int]]:
        """Leading blocks of `hashes` each worker caches (or soon will), and per worker the prompt
        tokens of that prefix an earlier request there is still prefilling (KV events only)."""
        if not self.settings.use_kv_events:
            return self.approx.find_matches(hashes), {}
        block_size = self.block_size
        assert block_size is not None
        overlap = self.index.find_matches(hashes)
        pending_index = self.pending
        # What the index reports is the cache as of the last event. Requests routed since will
        # evict from it before this one is scheduled: where the routing history (an LRU model of
        # each worker's cache over everything routed there) has pushed part of this prefix out,
        # trust the index only up to that point. Otherwise a request is sent for a prefix that
        # is gone by the time it runs, and recomputes it at the back of a queue.
        trimmed = {}
        for worker, blocks in overlap.scores.items():
            kept = pending_index.evicted_before(worker, hashes, blocks)
            if kept:
                trimmed[worker] = kept
        overlap = OverlapScores(trimmed, overlap.tree_sizes)
        # The router's own routing history (TTL + LRU per worker capacity, as in approximate
        # mode) raises the event-based overlap: requests routed moments ago have produced no
        # KV events yet, and a prefix whose blocks a worker just evicted is best re-cached
        # where it lived, not copied onto a second worker where it evicts some third prefix.
        pending = self.pending.find_matches(hashes).scores
        # With peers (replica sync): blocks that requests in flight on a worker are computing
        # right now, this replica's and its peers', will be cached there by the time this
        # request runs. This is how a peer's just-routed prefix counts here without every
        # replica recording every peer's placement in its own history. A lone replica's own
        # placements are all in its routing history already.
        if self._has_peers:
            pending = self.active.extend_prefixes(hashes, pending, overlap.scores)
        in_flight: dict[int, int] = {}
        if not pending:
            return overlap, in_flight
        scores = dict(overlap.scores)
        for worker, blocks in pending.items():
            cached = scores.get(worker, 0)
            if blocks > cached:
                scores[worker] = blocks
                # Blocks not (or no longer) in the index: if an earlier request is still
                # prefilling them, this one waits for that work rather than repeating it,
                # so that part of the worker's active prefill is not extra queue.
                in_flight[worker] = (blocks - cached) * block_size
        return OverlapScores(scores, overlap.tree_sizes), in_flight

    def _placed_loads(
        self,
        candidates: Sequence[int],
        hashes: list[int],
        tail: int,
        overlap: OverlapScores,
        in_flight: Mapping[int, int],
    ) -> tuple[dict[int, WorkerLoad], dict[int, int]]:
        """Each candidate's load with this request placed on it, and the KV blocks it would
        allocate there. Decode load counts the KV blocks each request makes its worker allocate:
        the blocks it had to compute (not the cached prefix it reuses, which the worker holds
        either way) and its partial `tail`, each distinct block once. Prefill tokens that an
        earlier request is computing already (`in_flight`) are not counted twice."""
        active, loads, scores = self.active, self.load.loads, overlap.scores
        placed: dict[int, WorkerLoad] = {}
        new_blocks: dict[int, int] = {}
        for w in candidates:
            new = active.new_blocks(w, hashes[scores.get(w, 0) :]) + tail
            load = loads.get(w, IDLE)
            shared = min(in_flight.get(w, 0), load.active_prefill_tokens)
            placed[w] = load._replace(
                active_decode_blocks=active.count(w) + new,
                active_prefill_tokens=load.active_prefill_tokens - shared,
            )
            new_blocks[w] = new
        return placed, new_blocks

    def _place(self, request_id: str, chosen: Selected, hashes: list[int], tail: int, uncached: int) -> None:
        """Count the request on its worker (load, active blocks, routing history) and report it."""
        self.load.add_request(request_id, chosen.worker, uncached, 0)
        self.active.add(request_id, chosen.worker, hashes[chosen.overlap_blocks :], tail)
        self._record_history(chosen.worker, hashes)
        if self._listener is not None:
            self._report_routed(
                Routed(request_id, chosen.worker, uncached, 0, hashes, chosen.overlap_blocks, tail)
            )

    def predicted_prefill(self, request: PreprocessedRequest) -> int:
        """Prompt tokens the request would compute on the worker caching most of it (the router
        queue's `wspt` order); the whole prompt before any worker is known."""
        config = self._config
        tokens = request.token_ids
        if config is None:
            return len(tokens)
        hashes = block_hashes(tokens, config.block_size).sequence
        index = self.index if self.settings.use_kv_events else self.approx
        best = max(index.find_matches(hashes).scores.values(), default=0)
        if self.settings.use_kv_events:
            best = max(best, max(self.pending.find_matches(hashes).scores.values(), default=0))
        return max(0, len(tokens) - best * config.block_size)

    def _record_history(self, worker: int, hashes: list[int]) -> None:
        if self.settings.use_kv_events:
            self.pending.record(worker, hashes)
        else:
            self.approx.record(worker, hashes)

    def _drop(self, key: str) -> None:
        self.load.finish(key)
        self.active.remove(key)

    def _count_peer(self, key: str, event: Routed) -> None:
        # A peer's placement counts here as this replica's own would: active load, and the blocks
        # it makes the worker allocate, which also stand in for KV events not yet arrived while it
        # runs (`ActiveBlocks.extend_prefixes`: two replicas send a new prefix's burst to one
        # worker). With KV events on, the routing history (`pending`) stays this replica's own:
        # every replica follows the workers' real events, and recording every peer's placement
        # as well would cost each replica an LRU update per block of every peer request. Without
        # events, peers' placements are the only cache model there is, so they are recorded.
        self._has_peers = True
        self.load.add_request(key, event.worker, event.prefill_tokens, 0)
        self.active.add(key, event.worker, event.hashes[event.overlap :], event.tail)
        if not self.settings.use_kv_events:
            self.approx.record(event.worker, event.hashes)

    def _shortlist(self, candidates: Sequence[int], overlap: OverlapScores) -> list[int]:
        """The candidates that can differ in cost: those caching part of the prompt, those with
        active work, and the few idle ones with the emptiest caches. Every other idle worker costs
        exactly what the kept idle ones cost or more (same prefill and decode, fuller cache), so
        scoring them cannot change the choice, and with hundreds of workers it would dominate."""
        scores = overlap.scores
        loads = self.load.loads
        sizes = overlap.tree_sizes
        keep: list[int] = []
        idle: list[int] = []
        for w in candidates:
            (keep if w in scores or w in loads else idle).append(w)
        keep += heapq.nsmallest(IDLE_SHORTLIST, idle, key=lambda w: sizes.get(w, 0))
        return keep

    # ---------------------------------------------------------------- events (KvEventConsumer)

    def apply_kv_events(self, batch: KvEventBatch) -> bool:
        if batch.worker_id not in self._workers:
            return False  # a late batch from a worker that already left
        return self.index.apply(batch).gap

    def load_kv_dump(self, dump: KvDump) -> bool:
        if dump.worker_id not in self._workers:
            return False
        if self._config is not None and dump.block_size != self._config.block_size:
            log.warning(
                "worker %x dumps blocks of size %d, router uses %d",
                dump.worker_id,
                dump.block_size,
                self._config.block_size,
            )
        return self.index.load_dump(dump.worker_id, dump.block_hashes, dump.next_event_id).gap

    def apply_load(self, metrics: LoadMetrics) -> None:
        if metrics.worker_id in self._workers:
            self.worker_load[metrics.worker_id] = metrics
