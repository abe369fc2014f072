"""The sidecar: every upstream server (and each of its data-parallel ranks) as one `UpstreamEngine`,
plus the ZMQ subscribers that feed them the engines' KV events.

Ownership: `Sidecar` owns one HTTP session (shared by all its engines) and the subscriber tasks;
`start()` before any engine starts, `close()` after every engine stopped. The composition root
(turbine/worker/upstream.py) wraps each engine in a worker that registers it in discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from dataclasses import dataclass

import aiohttp
import tokenizers

from turbine.engines.upstream.client import UpstreamClient, UpstreamModel
from turbine.engines.upstream.engine import UpstreamEngine, UpstreamSettings
from turbine.engines.upstream.kv_codec import EngineEventBatch
from turbine.engines.upstream.params import UPSTREAM_KNOBS
from turbine.engines.upstream.subscriber import KvEventSubscriber
from turbine.errors import ConfigError, UpstreamUnavailable
from turbine.runtime.lifecycle import Connecting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamSpec:
    url: str
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None


@dataclass(frozen=True)
class SidecarSettings:
    block_size: int
    context_length: int
    mode: str = "auto"
    dp_size: int = 1
    poll_interval_s: float = 1.0
    api_key: str | None = None
    topic: str = ""
    # The sampling knobs the upstream honours (SAMPLING_KNOBS names), listed in the card.
    sampling_knobs: tuple[str, ...] = UPSTREAM_KNOBS
    guided_decoding: str = "none"  # UpstreamSettings.guided_decoding
    stall_timeout_s: float = 0.0  # UpstreamSettings.stall_timeout_s


_TCP_PORT = re.compile(r"^(tcp://.*:)(\d+)$")


def rank_endpoint(endpoint: str, rank: int) -> str:
    """vLLM's DP rank r binds the configured TCP port + r."""
    if rank == 0:
        return endpoint
    match = _TCP_PORT.match(endpoint)
    if match is None:
        raise ConfigError(f"KV event endpoint {endpoint!r}: several DP ranks need tcp://HOST:PORT")
    return f"{match[1]}{int(match[2]) + rank}"


class Sidecar(Connecting):
    def __init__(
        self, specs: list[UpstreamSpec], settings: SidecarSettings, tokenizer: tokenizers.Tokenizer
    ) -> None:
        self.specs = specs
        self.settings = settings
        self._tokenizer = tokenizer
        self._session: aiohttp.ClientSession | None = None
        self._engines: dict[tuple[int, int], UpstreamEngine] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribers: list[KvEventSubscriber] = []

    @property
    def size(self) -> int:
        """How many instances: one per upstream and DP rank."""
        return len(self.specs) * self.settings.dp_size

    def slot(self, index: int) -> tuple[int, int]:
        return divmod(index, self.settings.dp_size)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False), auto_decompress=False
        )

    def engine(self, index: int) -> UpstreamEngine:
        """The engine of instance `index` (upstream index // dp_size, rank index % dp_size)."""
        key = self.slot(index)
        if key in self._engines:
            return self._engines[key]
        assert self._session is not None, "start() first"
        upstream, rank = key
        spec, s = self.specs[upstream], self.settings
        client = UpstreamClient(
            spec.url, self._session, api_key=s.api_key, dp_rank=rank if s.dp_size > 1 else None
        )
        engine = UpstreamEngine(
            client,
            self._tokenizer,
            UpstreamSettings(
                block_size=s.block_size,
                context_length=s.context_length,
                mode=s.mode,
                poll_interval_s=s.poll_interval_s,
                kv_events=spec.kv_events_endpoint is not None,
                sampling_knobs=s.sampling_knobs,
                guided_decoding=s.guided_decoding,
                stall_timeout_s=s.stall_timeout_s,
            ),
        )
        self._engines[key] = engine
        return engine

    def follow_kv_events(self) -> None:
        """Start one subscriber per upstream with an events endpoint and DP rank (after `engine()`
        was called for every instance, so each batch finds its engine)."""
        loop = asyncio.get_running_loop()
        for upstream, spec in enumerate(self.specs):
            if spec.kv_events_endpoint is None:
                continue
            for rank in range(self.settings.dp_size):
                sub = KvEventSubscriber(
                    rank_endpoint(spec.kv_events_endpoint, rank),
                    replay_endpoint=(
                        rank_endpoint(spec.kv_replay_endpoint, rank) if spec.kv_replay_endpoint else None
                    ),
                    topic=self.settings.topic,
                    rank=rank,
                    on_batch=functools.partial(self._on_batch, upstream),
                    on_reset=functools.partial(self._on_reset, upstream),
                )
                self.subscribers.append(sub)
                engine = self._engines.get((upstream, rank))
                if engine is not None:
                    engine.on_recovered = sub.restart
                self._tasks.append(loop.create_task(sub.run(), name=f"kv-events-{upstream}-{rank}"))

    def _on_batch(self, upstream: int, batch: EngineEventBatch, rank: int) -> None:
        engine = self._engines.get((upstream, rank))
        if engine is None:
            log.warning("KV events of upstream %d name DP rank %d, which is not served", upstream, rank)
            return
        engine.apply_engine_events(batch.events)

    def _on_reset(self, upstream: int, rank: int) -> None:
        engine = self._engines.get((upstream, rank))
        if engine is not None:
            engine.reset_kv()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for engine in self._engines.values():
            engine.client.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


async def wait_for_model(url: str, api_key: str | None, stop: asyncio.Event) -> UpstreamModel | None:
    """Poll an upstream's /v1/models with backoff until it answers (None if `stop` is set first):
    for a sidecar started without --model-path, which learns the model from the server."""
    delay = 0.25
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(url, session, api_key=api_key)
        while not stop.is_set():
            try:
                return await client.model(5.0)
            except UpstreamUnavailable as exc:
                log.warning("%s; retrying in %.1f s", exc.message, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)
    return None
