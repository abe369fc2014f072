"""The Router seam.

A router belongs to one model and is told which instances are live, with their model cards
(`update_instances`), whenever discovery changes. `select` picks one of the given candidates (never
an instance outside them; the pipeline removes workers that already failed this request). The
pipeline reports each routed request's lifecycle so load-aware routers can count active work:
`on_first_token` once prefill is done, then exactly one `on_finish` whatever the outcome (success,
error or cancel).
Routers are used from one event loop and must not block it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

from turbine.protocol.model_card import ModelDeploymentCard
from turbine.protocol.request import PreprocessedRequest


class Decision(NamedTuple):
    """Where a request went, and why (exposed in headers and metrics)."""

    instance_id: int
    overlap_blocks: int = 0


class Router(Protocol):
    def update_instances(self, cards: Mapping[int, ModelDeploymentCard]) -> None: ...

    def select(self, request: PreprocessedRequest, candidates: Sequence[int]) -> Decision:
        """Pick one candidate; raises ServiceUnavailable when none can take the request now."""
        ...

    def on_first_token(self, request_id: str, decision: Decision) -> None: ...

    def on_finish(self, request_id: str, decision: Decision) -> None: ...
