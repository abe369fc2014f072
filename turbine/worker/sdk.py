"""Serve an engine as a discoverable worker.

`EngineWorker` lifecycle: `start()` → engine started, request plane listening, lease granted, Instance
and ModelDeploymentCard registered under the lease → serving → `shutdown()`: delete the card
(frontends stop routing here; the Instance stays until the lease goes, so frontends do not move its
streams), refuse new requests with a retriable "draining" error, let in-flight streams finish
(bounded), revoke the lease, close the request plane, stop the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass

import msgspec

from turbine.engines.base import Embedder, Engine, KvCacheReporter, PushEngine
from turbine.errors import InvalidRequest
from turbine.protocol.instance import Instance, model_key
from turbine.protocol.kv_events import (
    KV_DUMP_ENDPOINT,
    KV_EVENTS_ENDPOINT,
    RawWorkerEvent,
)
from turbine.protocol.model_card import EMBED_ENDPOINT, ModelDeploymentCard, ModelFile
from turbine.protocol.request import PreprocessedRequest
from turbine.runtime.discovery.base import Store
from turbine.runtime.discovery.lease import LeaseKeeper
from turbine.runtime.events.base import EventPlane, kv_events_subject, load_subject, model_subject_prefix
from turbine.runtime.events.memory import MemoryEventPlane
from turbine.runtime.events.pacing import paced
from turbine.runtime.events.sink import EventPlaneSink
from turbine.runtime.transport.base import Emit, Pushed, RequestPlaneServer

log = logging.getLogger(__name__)

_decode_request = msgspec.msgpack.Decoder(PreprocessedRequest).decode
_encode = msgspec.msgpack.Encoder().encode
_decode_embed = msgspec.msgpack.Decoder(list[list[int]]).decode


EVENTS_BATCH_S = 0.002
"""The least time between two sends of a `kv_events` stream while events keep coming (their
delay at most; the frontend's routing history and active blocks cover requests routed since).
Every process of every frontend follows every worker, so each send costs each of them a wake-up:
a longer interval saves the followers CPU (`benchmarks/results/scale_processes.md`), but routing
sees new prefixes' blocks that much later, and fast requests in a row then tie on stale cache
sizes and pile onto one worker. `--kv-events-interval-ms` trades one for the other."""


@dataclass(frozen=True)
class WorkerIdentity:
    """Where the worker registers and what it serves."""

    namespace: str
    component: str
    endpoint: str
    model_name: str
    model_path: str
    context_length: int
    transport: str = "tcp"
    model_types: tuple[str, ...] = ("chat", "completions")
    # The model files published for frontends on other machines (runtime/model_files.py).
    files: tuple[ModelFile, ...] = ()
    # Output parsers frontends apply (`--tool-call-parser`, `--reasoning-parser`), carried in the card.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


class EngineWorker:
    def __init__(
        self,
        *,
        engine: Engine,
        store: Store,
        server: RequestPlaneServer,
        identity: WorkerIdentity,
        lease_ttl_s: float,
        instance_id: int | None = None,
        events: EventPlane | None = None,
        events_batch_s: float = EVENTS_BATCH_S,
    ) -> None:
        self.engine = engine
        # Checked once: a runtime Protocol check per request would cost a few µs each time.
        self._push: PushEngine | None = engine if isinstance(engine, PushEngine) else None
        self._store = store
        self._server = server
        self._identity = identity
        self._lease_ttl_s = lease_ttl_s
        # This worker's own in-process event plane (its engine publishes there, and also on the
        # shared NATS plane with --event-plane nats); frontends following over the request plane
        # read it through the kv_events endpoint, which therefore works in either mode.
        self._events = events
        self._events_batch_s = events_batch_s
        self.instance_id = instance_id if instance_id is not None else secrets.randbits(63)
        self._lease: LeaseKeeper | None = None
        self._keys: list[str] = []
        self.address = ""

    async def start(self) -> None:
        ident = self._identity
        await self.engine.start()
        self.address = await self._server.start(self._handle)
        capacity = self.engine.capacity()
        instance = Instance(
            namespace=ident.namespace,
            component=ident.component,
            endpoint=ident.endpoint,
            instance_id=self.instance_id,
            transport=ident.transport,
            address=self.address,
        )
        card = ModelDeploymentCard(
            name=ident.model_name,
            model_path=ident.model_path,
            namespace=ident.namespace,
            component=ident.component,
            endpoint=ident.endpoint,
            instance_id=self.instance_id,
            context_length=ident.context_length,
            model_types=ident.model_types,
            kv_block_size=capacity.kv_block_size,
            total_kv_blocks=capacity.total_kv_blocks,
            max_num_seqs=capacity.max_num_seqs,
            max_num_batched_tokens=capacity.max_num_batched_tokens,
            capabilities=capacity.capabilities,
            files=ident.files,
            tool_call_parser=ident.tool_call_parser,
            reasoning_parser=ident.reasoning_parser,
        )
        self._lease = LeaseKeeper(self._store)
        await self._lease.start(self._lease_ttl_s)
        # The instance first, then the card: a frontend that sees the card can already route.
        self._keys = [instance.key(), model_key(ident.namespace, ident.model_name, self.instance_id)]
        await self._lease.put(self._keys[0], _encode(instance))
        await self._lease.put(self._keys[1], _encode(card))
        log.info("worker %x serving %s on %s", self.instance_id, ident.model_name, self.address)

    def _handle(self, endpoint: str, payload: bytes) -> AsyncGenerator[bytes, None] | Pushed:
        if endpoint != self._identity.endpoint:
            if endpoint == KV_EVENTS_ENDPOINT:
                return self._stream_events()
            if endpoint == KV_DUMP_ENDPOINT:
                return self._dump()
            if endpoint == EMBED_ENDPOINT:
                return self._embed(payload)
            raise InvalidRequest(f"unknown endpoint {endpoint!r}")
        if self._push is not None:
            return Pushed(functools.partial(self._generate_pushed, self._push, payload))
        return self._generate(payload)

    @staticmethod
    async def _generate_pushed(engine: PushEngine, payload: bytes, emit: Emit) -> None:
        """`_generate` for engines that push: each output is encoded and handed to the transport
        from the engine's step loop, with no task wake-up per token."""
        try:
            request = _decode_request(payload)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"malformed request: {exc}") from None
        await engine.generate_into(request, lambda out: emit(_encode(out)))

    async def _generate(self, payload: bytes) -> AsyncGenerator[bytes, None]:
        try:
            request = _decode_request(payload)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"malformed request: {exc}") from None
        # aclosing: a cancelled stream must close the engine's generator now, not at GC time.
        async with contextlib.aclosing(self.engine.generate(request)) as outputs:
            async for out in outputs:
                yield _encode(out)

    async def _stream_events(self) -> AsyncGenerator[bytes, None]:
        """This worker's KV event batches and load metrics, from now on, until shutdown.

        While events keep coming they go out in bursts at most once per `events_batch_s`, each burst
        all that arrived meanwhile (`runtime/events/pacing.py`): a busy engine publishes a batch
        per scheduler step, and every frontend process following it would otherwise wake once per
        step. A quiet stream's first event goes at once.
        """
        if self._events is None:
            raise InvalidRequest("this worker publishes no events")
        kv_subject = kv_events_subject(self._identity.namespace, self._identity.model_name, self.instance_id)
        load_subject_ = load_subject(self._identity.namespace, self._identity.model_name, self.instance_id)
        prefix = model_subject_prefix(self._identity.namespace, self._identity.model_name)
        async with contextlib.aclosing(self._events.subscribe(prefix)) as sub:
            async for subject, data in paced(sub, self._events_batch_s):
                if subject == kv_subject:
                    yield _encode(RawWorkerEvent(kv=msgspec.Raw(data)))
                elif subject == load_subject_:
                    yield _encode(RawWorkerEvent(load=msgspec.Raw(data)))

    async def _dump(self) -> AsyncGenerator[bytes, None]:
        if not isinstance(self.engine, KvCacheReporter):
            raise InvalidRequest("this worker's engine has no prefix cache to dump")
        yield _encode(self.engine.kv_dump())

    async def _embed(self, payload: bytes) -> AsyncGenerator[bytes, None]:
        """Payload: msgpack list of token id lists; reply: one frame, the list of vectors."""
        engine = self.engine
        if "embedding" not in self._identity.model_types or not isinstance(engine, Embedder):
            raise InvalidRequest(f"model '{self._identity.model_name}' does not serve embeddings")
        try:
            batch = _decode_embed(payload)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"malformed embed request: {exc}") from None
        yield _encode([await engine.embed(ids) for ids in batch])

    async def shutdown(self, drain_timeout_s: float) -> None:
        lease = self._lease
        if lease is not None:
            # The card only: frontends stop routing here at once, but keep the instance's streams,
            # which they would move elsewhere if its instance key went (`ModelRegistry._left`).
            # The instance key goes with the lease, once the streams are done.
            await lease.delete(self._keys[1])
        self._server.drain()
        if self._events is not None:
            # Event subscriptions never end by themselves; close them so the drain below can finish.
            await self._events.close()
        if self._server.active_streams:
            log.info("worker %x draining %d stream(s)", self.instance_id, self._server.active_streams)
        if not await self._server.wait_idle(drain_timeout_s):
            log.warning("worker %x: drain timed out, cancelling the rest", self.instance_id)
        if lease is not None:
            await lease.revoke()
        await self._server.stop()
        await self.engine.stop()
        log.info("worker %x stopped", self.instance_id)


def worker_events(
    shared: EventPlane | None, namespace: str, model: str, instance_id: int
) -> tuple[MemoryEventPlane, EventPlaneSink]:
    """A worker's own in-process event plane (frontends follow it through the worker's kv_events
    endpoint) and the sink its engine publishes to: that plane, or `shared` (the process's NATS or
    zmq plane, with --event-plane nats|zmq) mirrored into it."""
    plane = MemoryEventPlane()
    if shared is None:
        return plane, EventPlaneSink(plane, namespace, model, instance_id)
    return plane, EventPlaneSink(shared, namespace, model, instance_id, mirror=plane)


@contextlib.asynccontextmanager
async def serving(
    workers: Iterable[EngineWorker], drain_timeout_s: float
) -> AsyncIterator[list[EngineWorker]]:
    """Start `workers` one after the other and hand back those started; on exit shut every started
    one down (each drains for up to `drain_timeout_s`), all at once."""
    started: list[EngineWorker] = []
    try:
        for worker in workers:
            await worker.start()
            started.append(worker)
        yield started
    finally:
        await asyncio.gather(*(w.shutdown(drain_timeout_s) for w in started), return_exceptions=True)
