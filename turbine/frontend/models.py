"""Watch discovery and keep one ModelPipeline per served model, with its live instances.

A model appears when its first worker has registered both its Instance and its card, and disappears
when its last one goes. Instances join and leave the model's router live. Model files (tokenizer,
template) are loaded once per model directory, off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from turbine.errors import ConfigError, ModelNotFound, TurbineError, WorkerUnreachable
from turbine.frontend.metrics import RoutingStats
from turbine.frontend.pipeline import ModelPipeline, PipelineSettings
from turbine.frontend.python_engine import EngineFactory
from turbine.postprocess.parsers.output import ParserSettings
from turbine.preprocess.preprocessor import Preprocessor
from turbine.preprocess.tokenizer import ModelFiles, load_model_files
from turbine.protocol.instance import Instance, instance_id_from_key, instances_prefix, models_prefix
from turbine.protocol.model_card import ModelDeploymentCard
from turbine.router.base import Router
from turbine.router.health import HealthCounts
from turbine.router.load import LoadTracker
from turbine.runtime.discovery.base import Store, WatchKind
from turbine.runtime.events.base import EventPlane
from turbine.runtime.model_files import ModelFileResolver
from turbine.runtime.transport.base import RequestPlaneClient

log = logging.getLogger(__name__)

# A model whose files failed to load is tried again after 2, 4, 8, ... seconds, at most a minute.
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 60.0

_decode_instance = msgspec.msgpack.Decoder(Instance).decode
_decode_card = msgspec.msgpack.Decoder(ModelDeploymentCard).decode


class ModelRegistry:
    def __init__(
        self,
        settings: PipelineSettings,
        *,
        store: Store,
        client: RequestPlaneClient,
        router_factory: Callable[[], Router],
        executor: concurrent.futures.Executor,
        engine_factory: EngineFactory | None = None,
        model_files: ModelFileResolver | None = None,
        events: EventPlane | None = None,
        sync_events: EventPlane | None = None,
    ) -> None:
        """`settings`: the frontend's, for the registry and every pipeline; `model_files` fetches a
        card's files when its model_path is not on this machine (None: never fetch); `events`: the
        shared event plane KV routers follow (None: the request plane); `sync_events`: where replica
        sync runs instead of `events` (--num-processes: the local channel)."""
        self._settings = settings
        self._store = store
        self._namespace = settings.namespace
        self._client = client
        self._router_factory = router_factory
        self._executor = executor
        self._only_model = settings.only_model
        self._model_path_override = settings.model_path_override
        self._engine_factory = engine_factory
        self._events = events
        self._sync_events = sync_events
        self._model_files = model_files
        self._instances: dict[int, Instance] = {}
        self._cards: dict[int, ModelDeploymentCard] = {}
        self._pipelines: dict[str, ModelPipeline] = {}
        self._files: dict[str, ModelFiles] = {}
        self._loading: set[str] = set()
        # Models whose files could not be loaded -> failed attempts so far; retried with backoff
        # (a store or NATS outage passes; a checksum mismatch stays refused, logged each time).
        self._failed: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    # ----------------------------------------------------------------------------- lookups

    def get(self, name: str) -> ModelPipeline:
        pipeline = self._pipelines.get(name)
        if pipeline is None:
            raise ModelNotFound(name)
        return pipeline

    def models(self) -> list[ModelPipeline]:
        """Models with at least one live instance, by name."""
        return sorted((p for p in self._pipelines.values() if p.instance_ids), key=lambda p: p.name)

    @property
    def instance_count(self) -> int:
        return sum(len(p.instance_ids) for p in self._pipelines.values())

    def router_loads(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(model, worker) -> (active requests, active prefill tokens) of load-aware routers."""
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for pipeline in self._pipelines.values():
            tracker = getattr(pipeline.router, "load", None)
            if isinstance(tracker, LoadTracker):
                for worker, load in tracker.snapshot().items():
                    out[pipeline.name, worker] = (load.active_requests, load.active_prefill_tokens)
        return out

    @property
    def min_initial_workers(self) -> int:
        return self._settings.routing.min_initial_workers

    def router_queues(self) -> dict[str, RoutingStats]:
        """model -> its router queue's length and waits, and its session bindings (where on)."""
        out = {}
        for p in self._pipelines.values():
            queue, sessions = p.routing.queue, p.routing.sessions
            if queue is not None or sessions is not None:
                out[p.name] = RoutingStats(
                    len(queue) if queue is not None else 0,
                    queue.waits if queue is not None else None,
                    len(sessions) if sessions is not None else None,
                )
        return out

    def health(self) -> dict[str, HealthCounts]:
        """model -> its stalls, quarantines after a stall, and workers out of routing now."""
        return {p.name: p.health.counts() for p in self._pipelines.values()}

    # ------------------------------------------------------------------------------ watching

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until every model that discovery lists right now has a pipeline with a live
        instance (or `timeout_s` passes; a model whose files fail to load never gets one). For a
        process that joins others on a shared port: it takes connections only once it can serve
        what they serve. Needs `run()` going."""
        listed = set()
        for kv in await self._store.get_prefix(models_prefix(self._namespace)):
            try:
                card = _decode_card(kv.value)
            except msgspec.DecodeError:
                continue
            if self._only_model is None or card.name == self._only_model:
                listed.add(card.name)

        def ready() -> bool:
            return all(
                ((p := self._pipelines.get(name)) is not None and p.instance_ids) or name in self._failed
                for name in listed
            )

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not ready():
                    await self.changed.wait()
        return ready()

    async def run(self) -> None:
        """Watch instances and cards until cancelled (owned by the frontend's task group)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_instances())
                tg.create_task(self._watch_cards())
        finally:
            for task in list(self._tasks):
                task.cancel()
            for pipeline in self._pipelines.values():
                await pipeline.close()

    async def _watch_instances(self) -> None:
        async for event in self._store.watch_prefix(instances_prefix(self._namespace)):
            instance_id = instance_id_from_key(event.key)
            if event.kind is WatchKind.PUT and event.value is not None:
                try:
                    self._instances[instance_id] = _decode_instance(event.value)
                except msgspec.DecodeError:
                    log.warning("ignoring malformed instance at %s", event.key)
                    continue
            else:
                gone = self._instances.pop(instance_id, None)
                self._refresh_instance(instance_id)
                if gone is not None:
                    self._left(gone)
                continue
            self._refresh_instance(instance_id)

    def _left(self, gone: Instance) -> None:
        """An instance key vanished: its lease expired or it was deleted. A draining worker deletes
        only its card first and keeps this key until its streams are done, so whatever is still
        streaming from this one is cut off: fail it now, and `--migration-limit` moves it on,
        rather than wait for the connection to break (a frozen worker's never does)."""
        abandon = getattr(self._client, "abandon", None)
        if abandon is None:
            forget = getattr(self._client, "forget", None)
            if forget is not None:
                forget(gone.address)
            return
        failed = abandon(gone.address, WorkerUnreachable(f"worker {gone.instance_id:x} left discovery"))
        if failed:
            log.warning("worker %x left discovery: moving its %d open stream(s)", gone.instance_id, failed)

    async def _watch_cards(self) -> None:
        async for event in self._store.watch_prefix(models_prefix(self._namespace)):
            instance_id = instance_id_from_key(event.key)
            old = self._cards.get(instance_id)
            if event.kind is WatchKind.PUT and event.value is not None:
                try:
                    card = _decode_card(event.value)
                except msgspec.DecodeError:
                    log.warning("ignoring malformed model card at %s", event.key)
                    continue
                if self._only_model is not None and card.name != self._only_model:
                    continue
                self._cards[instance_id] = card
                if card.name not in self._pipelines:
                    self._load(card)
            else:
                self._cards.pop(instance_id, None)
            if old is not None:
                self._refresh_model(old.name)
            self._refresh_instance(instance_id)

    def _refresh_instance(self, instance_id: int) -> None:
        card = self._cards.get(instance_id)
        if card is not None:
            self._refresh_model(card.name)

    def _refresh_model(self, name: str) -> None:
        live = {
            iid: self._instances[iid]
            for iid, card in self._cards.items()
            if card.name == name and iid in self._instances
        }
        pipeline = self._pipelines.get(name)
        if pipeline is not None:
            if not any(card.name == name for card in self._cards.values()):
                del self._pipelines[name]
                self._spawn(pipeline.close())
                log.info("model %s removed: its last worker left", name)
            else:
                before = len(pipeline.instance_ids)
                pipeline.set_instances(live, {iid: self._cards[iid] for iid in live})
                if before != len(live):
                    log.info("model %s: %d live instance(s)", name, len(live))
        self.changed.set()
        self.changed.clear()

    def _load(self, card: ModelDeploymentCard, *, retry: bool = False) -> None:
        if card.name in self._loading or (card.name in self._failed and not retry):
            return
        self._loading.add(card.name)
        self._spawn(self._load_model(card))

    async def _retry_later(self, name: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        card = next((c for c in self._cards.values() if c.name == name), None)
        if card is not None and name not in self._pipelines:
            self._load(card, retry=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _parsers_for(self, card: ModelDeploymentCard) -> ParserSettings:
        """The frontend's parser overrides, else the card's; a card naming a parser this frontend
        does not know (a newer worker) is served without that parser rather than refused."""
        overrides = self._settings.parser_overrides
        tool = overrides.tool_call_parser or card.tool_call_parser
        reasoning = overrides.reasoning_parser or card.reasoning_parser
        try:
            return ParserSettings(tool, reasoning)
        except ConfigError as exc:
            log.error("model %s: %s; serving its output unparsed", card.name, exc.message)
            return ParserSettings()

    async def _load_model(self, card: ModelDeploymentCard) -> None:
        path = self._model_path_override or card.model_path
        try:
            if self._model_path_override is None and card.files and self._model_files is not None:
                path = str(await self._model_files.local_dir(card))
            files = self._files.get(path)
            if files is None:
                files = await asyncio.to_thread(load_model_files, Path(path))
                self._files[path] = files
            preprocessor = Preprocessor(
                card.name,
                files,
                self._executor,
                card.context_length,
                self._settings.tokenizer_cache_entries,
                exclude_tools_when_tool_choice_none=self._settings.exclude_tools_when_tool_choice_none,
            )
        except TurbineError as exc:
            attempts = self._failed.get(card.name, 0) + 1
            self._failed[card.name] = attempts
            delay_s = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))
            log.error(
                "cannot serve model %s from %s: %s (retrying in %.0f s)",
                card.name,
                path,
                exc.message,
                delay_s,
            )
            self._spawn(self._retry_later(card.name, delay_s))
            return
        finally:
            self._loading.discard(card.name)
        self._failed.pop(card.name, None)
        if not any(c.name == card.name for c in self._cards.values()):
            return  # every worker left while we were loading
        engine = self._engine_factory(card) if self._engine_factory is not None else None
        self._pipelines[card.name] = ModelPipeline(
            card,
            preprocessor,
            self._router_factory(),
            self._client,
            self._settings,
            parsers=self._parsers_for(card),
            engine=engine,
            events=self._events,
            sync_events=self._sync_events,
        )
        log.info("model %s added (context %d, from %s)", card.name, preprocessor.context_length, path)
        self._refresh_model(card.name)
