"""Load- and cache-blind routers: round-robin (the default), random, and direct."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest
from turbine.router.base import Decision


class _Stateless:
    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None:
        return None

    def on_first_token(self, request_id: str, decision: Decision) -> None:
        return None

    def on_finish(self, request_id: str, decision: Decision) -> None:
        return None


class RoundRobinRouter(_Stateless):
    """Cycles through the candidates in instance-id order, so every live worker gets its turn."""

    def __init__(self) -> None:
        self._counter = 0

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        assert candidates, "the pipeline never asks a router to choose among no instances"
        choice = candidates[self._counter % len(candidates)]
        self._counter += 1
        return Decision(choice)


class RandomRouter(_Stateless):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        assert candidates, "the pipeline never asks a router to choose among no instances"
        return Decision(self._rng.choice(candidates))


class DirectRouter(_Stateless):
    """`--router-mode direct`: the client names the worker (header `x-worker-instance-id`); the
    routing front narrows the candidates to that one instance (router/front.py), so this
    only confirms the choice."""

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        assert len(candidates) == 1, "direct routing narrows the candidates to the named instance"
        return Decision(candidates[0])
