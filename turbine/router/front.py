"""The routing front: one model's routing policy around its Router, as the frontend's pipeline
calls it: readiness, direct mode, session affinity, queue.

Order of a routing decision (`Routing.route`):
1. `--router-min-initial-workers N`: until N workers of the model have been live at once, requests
   get 503 (with Retry-After) and /health says not ready. Once reached it stays reached.
2. `--router-mode direct`: the client names the worker in the `x-worker-instance-id` header (hex,
   as the `x-turbine-worker` response header shows it); a missing or unknown id is a 404.
3. Session affinity: the session id is the `x-session-id` header or, without it, the request's
   `user` field (the header wins: it is set by whatever fronts the client, which knows the
   conversation; `user` names an end user who may hold many). See turbine/router/affinity.py.
4. The router queue (`--router-queue-threshold`): see turbine/router/queue.py. Without it, a
   request no candidate can take is rejected at once (503).

The pipeline reports every routed request's first token and end here; each may free capacity, so
the queue is pumped after it. Single event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from turbine.config import FrontendConfig
from turbine.errors import InvalidRequest, NotFound, ServiceUnavailable
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.router_events import RouterEvent, RouterSyncBatch, SessionBound
from turbine.router.affinity import AffinitySettings, SessionBindings
from turbine.router.base import Decision, Router
from turbine.router.load import LoadTracker
from turbine.router.queue import QueueSettings, RouterQueue

SESSION_HEADER = "x-session-id"
INSTANCE_HEADER = "x-worker-instance-id"


class RouteHints(NamedTuple):
    """What the client said about where its request should go."""

    session_id: str | None = None
    instance_id: int | None = None


NO_HINTS = RouteHints()
"""An immutable default: requests that say nothing about routing."""


def route_hints(headers: Mapping[str, str], user: str | None) -> RouteHints:
    """Read the routing headers of an HTTP request (and its body's `user` field)."""
    session = headers.get(SESSION_HEADER) or user or None
    raw = headers.get(INSTANCE_HEADER)
    instance = None
    if raw is not None:
        text = raw.strip().lower().removeprefix("0x")
        try:
            instance = int(text, 16)
        except ValueError:
            raise InvalidRequest(
                f"header {INSTANCE_HEADER} {raw!r} is not a worker instance id (hex)", param=INSTANCE_HEADER
            ) from None
    return RouteHints(session, instance)


@dataclass(frozen=True)
class RoutingSettings:
    direct: bool = False
    queue: QueueSettings | None = None
    affinity: AffinitySettings | None = None
    min_initial_workers: int = 0
    migration_max_seq_len: int | None = None
    """A stream whose prompt + generated tokens exceed this fails instead of migrating."""

    @classmethod
    def from_config(cls, cfg: FrontendConfig) -> RoutingSettings:
        queue = None
        if cfg.router_queue_threshold is not None:
            queue = QueueSettings(cfg.router_queue_threshold, cfg.router_queue_policy, cfg.router_max_queued)
        affinity = None
        if cfg.router_session_affinity_ttl_secs is not None:
            affinity = AffinitySettings(
                cfg.router_session_affinity_ttl_secs, cfg.router_session_affinity_mode
            )
        return cls(
            direct=cfg.router_mode == "direct",
            queue=queue,
            affinity=affinity,
            min_initial_workers=cfg.router_min_initial_workers,
            migration_max_seq_len=cfg.migration_max_seq_len,
        )


class Routing:
    def __init__(self, model: str, router: Router, settings: RoutingSettings) -> None:
        self.model = model
        self.router = router
        self.settings = settings
        self._cards: dict[int, ModelDeploymentCard] = {}
        self.ready = settings.min_initial_workers <= 0
        self.queue = (
            RouterQueue(settings.queue, router.select, self._busy, self.finish)
            if settings.queue is not None
            else None
        )
        self.sessions = SessionBindings(settings.affinity) if settings.affinity is not None else None
        self._announce: Callable[[RouterEvent], None] | None = None
        load = getattr(router, "load", None)
        self._load = load if isinstance(load, LoadTracker) else None
        if self.queue is not None and self._load is None:
            raise ValueError("the router queue needs a router that counts load")

    # ------------------------------------------------------------------------- bookkeeping

    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None:
        gone = [w for w in self._cards if w not in cards]
        self._cards = dict(cards)
        self.router.update_instances(cards)
        if self.sessions is not None:
            for worker in gone:
                self.sessions.remove_worker(worker)
        if not self.ready and len(cards) >= self.settings.min_initial_workers:
            self.ready = True
        self.pump()

    def announce_with(self, publish: Callable[[RouterEvent], None]) -> None:
        """Share session bindings with peer replicas through `publish` (replica sync)."""
        self._announce = publish

    def apply_peer_batch(self, batch: RouterSyncBatch) -> None:
        """A peer replica's events arrived (its router applied them already): adopt its session
        bindings, and route waiting requests if its finished ones freed capacity."""
        if self.sessions is not None:
            for event in batch.events:
                if isinstance(event, SessionBound):
                    self.sessions.bind_from_peer(event.session_id, event.worker)
        self.pump()

    def first_token(self, request_id: str, decision: Decision) -> None:
        self.router.on_first_token(request_id, decision)
        self.pump()

    def finish(self, request_id: str, decision: Decision) -> None:
        self.router.on_finish(request_id, decision)
        self.pump()

    def pump(self) -> None:
        if self.queue is not None:
            self.queue.pump()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.fail_all(ServiceUnavailable(f"model '{self.model}' left: its last worker is gone"))

    def _busy(self, worker: int) -> bool:
        """Over the queue threshold: active prefill tokens > threshold × max batched tokens."""
        queue, load = self.settings.queue, self._load
        card = self._cards.get(worker)
        if queue is None or load is None or card is None or card.max_num_batched_tokens is None:
            return False
        return load.active_prefill_tokens(worker) > queue.threshold * card.max_num_batched_tokens

    def _predicted_work(self, request: PreprocessedRequest) -> int:
        predict = getattr(self.router, "predicted_prefill", None)
        return int(predict(request)) if callable(predict) else len(request.token_ids)

    # ----------------------------------------------------------------------------- routing

    async def route(
        self, request: PreprocessedRequest, hints: RouteHints, candidates: Callable[[], Sequence[int]]
    ) -> Decision:
        """Pick the request's worker among `candidates()` (live, not yet failed for it)."""
        if not self.ready:
            raise ServiceUnavailable(
                f"model '{self.model}' is waiting for {self.settings.min_initial_workers} worker(s) "
                f"({len(self._cards)} live); retry later"
            )
        restricted = False
        if self.settings.direct:
            candidates = self._direct(hints.instance_id, candidates)
            restricted = True
        session = hints.session_id if self.sessions is not None else None
        if session is not None and not self.settings.direct:
            narrowed = self._affine(request, session, candidates)
            if isinstance(narrowed, Decision):
                return narrowed
            if narrowed is not None:
                candidates, restricted = narrowed, True
        if self.queue is not None:
            decision = await self.queue.route(
                request, candidates, lambda: self._predicted_work(request), restricted=restricted
            )
        else:
            now = candidates()
            if not now:
                raise ServiceUnavailable(f"model '{self.model}' has no live workers")
            decision = self.router.select(request, now)
        if session is not None and self.sessions is not None:
            self._bind(session, decision.instance_id)
        return decision

    def _direct(
        self, target: int | None, candidates: Callable[[], Sequence[int]]
    ) -> Callable[[], Sequence[int]]:
        if target is None:
            raise NotFound(
                f"--router-mode direct: name a worker of model '{self.model}' in the {INSTANCE_HEADER} "
                "header",
                param=INSTANCE_HEADER,
                code="worker_instance_not_found",
            )
        if target not in self._cards:
            raise NotFound(
                f"worker instance {target:x} does not serve model '{self.model}'",
                param=INSTANCE_HEADER,
                code="worker_instance_not_found",
            )
        if target not in candidates():
            raise ServiceUnavailable(f"worker instance {target:x} failed this request")

        def only_target() -> Sequence[int]:
            return [target] if target in candidates() else []

        return only_target

    def _affine(
        self, request: PreprocessedRequest, session: str, candidates: Callable[[], Sequence[int]]
    ) -> Decision | Callable[[], Sequence[int]] | None:
        """Hard: the candidates narrowed to the bound worker (while it is live and has not failed
        this request). Soft: the bound worker's decision if it is not busy. None: route freely."""
        assert self.sessions is not None
        bound = self.sessions.lookup(session)
        if bound is None or bound not in candidates():
            return None
        if self.sessions.settings.hard:

            def bound_or_any() -> Sequence[int]:
                live = candidates()
                return [bound] if bound in live else live

            return bound_or_any
        if self._busy(bound):
            return None
        try:
            decision = self.router.select(request, [bound])
        except ServiceUnavailable:
            return None  # over the router's own busy thresholds: load overrides the preference
        self._bind(session, bound)
        return decision

    def _bind(self, session: str, worker: int) -> None:
        assert self.sessions is not None
        if self.sessions.bind(session, worker).announce and self._announce is not None:
            self._announce(SessionBound(session, worker))
