"""The Engine seam.

Lifecycle: construct → `await start()` → any number of concurrent `generate()` streams →
`await stop()`. `stop()` is called only after every stream has ended (the worker drains first).

Contract of `generate(request)`:
- It is an async generator yielding `EngineOutput` deltas; the last one carries `finish_reason`
  (and `cached_tokens`), and nothing follows it.
- Cancellation is by closing the generator (`aclose()`) or cancelling the task iterating it; the
  engine must release every resource the request held (KV blocks, scheduler slots) in `finally`.
- Many streams run concurrently on one event loop; engines must not block the loop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Protocol, runtime_checkable

import msgspec

from turbine.protocol.kv_events import KvDump, KvEventBatch, LoadMetrics
from turbine.protocol.request import PreprocessedRequest
from turbine.protocol.response import EngineOutput


class EngineCapacity(msgspec.Struct, frozen=True):
    """What the engine can hold, published in the model card for the router."""

    kv_block_size: int
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # What the engine honours beyond plain sampling (turbine.protocol.model_card capability names),
    # copied into the model card.
    capabilities: tuple[str, ...] = ()


class EventSink(Protocol):
    """Where an engine publishes KV events and load metrics. Calls must not block."""

    def publish_kv_events(self, batch: KvEventBatch) -> None: ...

    def publish_load(self, metrics: LoadMetrics) -> None: ...


class NullEventSink:
    """Drops everything: for engines run without an event plane (tests, single worker)."""

    def publish_kv_events(self, batch: KvEventBatch) -> None:
        return None

    def publish_load(self, metrics: LoadMetrics) -> None:
        return None


class Engine(Protocol):
    def capacity(self) -> EngineCapacity: ...

    async def start(self) -> None: ...

    def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]: ...

    async def stop(self) -> None: ...


@runtime_checkable
class PushEngine(Protocol):
    """An engine that can also hand a request's outputs to a callback as it makes them (one per
    step), instead of through a generator the consumer resumes per token."""

    async def generate_into(
        self, request: PreprocessedRequest, sink: Callable[[EngineOutput], None]
    ) -> None: ...


@runtime_checkable
class KvCacheReporter(Protocol):
    """Engines with a prefix cache also answer for its whole state (routers re-sync from it)."""

    def kv_dump(self) -> KvDump: ...


@runtime_checkable
class Embedder(Protocol):
    """Engines that embed: one vector per token sequence (models whose card lists "embedding").

    Must not block the loop; the same token ids must give the same vector.
    """

    async def embed(self, token_ids: list[int]) -> list[float]: ...
