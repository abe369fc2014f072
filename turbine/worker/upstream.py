"""Composition of the upstream sidecar: `turbine worker --engine openai --upstream-url URL ...` and
`turbine frontend --upstream MODEL=URL ...` (the same workers, inside the frontend process).

Each upstream server (each DP rank of it) becomes one `EngineWorker`: its own request-plane
server, lease, instance id and card, like a native worker, so routing, migration and KV events
work unchanged. The model's tokenizer and template come from `--model-path`; a worker started
without it asks the first upstream's `/v1/models` (vLLM reports the directory it loaded as `root`)
and waits, with backoff, until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from turbine.config import FrontendConfig, RuntimeConfig, WorkerConfig
from turbine.engines.upstream.gguf_files import tokenizer_dir
from turbine.engines.upstream.sidecar import Sidecar, SidecarSettings, UpstreamSpec, wait_for_model
from turbine.errors import ConfigError
from turbine.models import gguf_served_name
from turbine.preprocess.tokenizer import ModelFiles, load_model_files
from turbine.protocol.model_card import ModelFile
from turbine.runtime.discovery.base import Store
from turbine.runtime.factory import make_event_plane, make_request_server, make_store
from turbine.runtime.lifecycle import stop_on_signals
from turbine.runtime.model_files import publish_worker_model_files
from turbine.runtime.transport.base import RequestPlaneServer
from turbine.runtime.transport.local import LocalPlane
from turbine.worker.sdk import EVENTS_BATCH_S, EngineWorker, WorkerIdentity, serving, worker_events

log = logging.getLogger("turbine.worker")

# Without --block-size on the frontend's --upstream: the KV router hashes with this.
DEFAULT_UPSTREAM_BLOCK_SIZE = 64


@contextlib.asynccontextmanager
async def upstream_workers(
    cfg: RuntimeConfig,
    *,
    store: Store,
    specs: list[UpstreamSpec],
    settings: SidecarSettings,
    identity: WorkerIdentity,
    files: ModelFiles,
    host: str,
    drain_timeout_s: float,
    local: LocalPlane | None = None,
    events_batch_s: float = EVENTS_BATCH_S,
) -> AsyncIterator[list[EngineWorker]]:
    """Serve one model's upstreams as registered workers until the context exits; with `local`
    (inside a frontend), that process's own streams to them skip the request plane. On exit the
    workers drain, then the sidecar and the shared event plane close."""
    async with contextlib.AsyncExitStack() as stack:
        shared = make_event_plane(cfg)
        if shared is not None:
            await stack.enter_async_context(shared)
        sidecar = await stack.enter_async_context(Sidecar(specs, settings, files.tokenizer))
        workers = []
        for index in range(sidecar.size):
            instance_id = secrets.randbits(63)
            plane, sink = worker_events(shared, cfg.namespace, identity.model_name, instance_id)
            engine = sidecar.engine(index)
            engine.set_events(sink, instance_id)
            server: RequestPlaneServer = make_request_server(cfg, host)
            if local is not None:
                server = local.server(server)
            workers.append(
                EngineWorker(
                    engine=engine,
                    store=store,
                    server=server,
                    identity=identity,
                    lease_ttl_s=cfg.lease_ttl_s,
                    instance_id=instance_id,
                    events=plane,
                    events_batch_s=events_batch_s,
                )
            )
        sidecar.follow_kv_events()
        yield await stack.enter_async_context(serving(workers, drain_timeout_s))


def _specs(urls: tuple[str, ...], events: tuple[str, ...], replays: tuple[str, ...]) -> list[UpstreamSpec]:
    def at(values: tuple[str, ...], i: int) -> str | None:
        value = values[i] if i < len(values) else ""
        return None if value in ("", "none") else value

    return [UpstreamSpec(url, at(events, i), at(replays, i)) for i, url in enumerate(urls)]


async def run_upstream_workers(
    cfg: WorkerConfig,
    *,
    stop: asyncio.Event | None = None,
    store: Store | None = None,
    on_ready: Callable[[list[EngineWorker]], None] | None = None,
) -> None:
    """`turbine worker --engine openai`: serve until SIGTERM/SIGINT or `stop`, then drain."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    model_name = cfg.model_name
    reported_length: int | None = None
    if cfg.is_gguf:
        assert cfg.model_path is not None
        gguf, cache = Path(cfg.model_path), cfg.gguf_cache_dir
        model_dir = await asyncio.to_thread(tokenizer_dir, gguf, Path(cache) if cache else None)
        model_name = model_name or gguf_served_name(gguf)
    elif cfg.model_path is not None:
        model_dir = Path(cfg.model_path)
    else:
        found = await wait_for_model(cfg.upstream_url[0], cfg.upstream_api_key, stop)
        if found is None:
            return
        if found.root is None or not await asyncio.to_thread(Path(found.root).is_dir):
            raise ConfigError(
                f"--upstream-url {cfg.upstream_url[0]} serves {found.id!r} from {found.root!r}, not a local "
                "directory: give --model-path (the model's tokenizer and template)"
            )
        model_dir = Path(found.root)
        model_name = model_name or found.id
        reported_length = found.max_model_len
    files = await asyncio.to_thread(load_model_files, model_dir)
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await stack.enter_async_context(make_store(cfg))
        model_files: tuple[ModelFile, ...] = await publish_worker_model_files(
            cfg.model_files_via,
            model_dir=model_dir,
            store=store,
            request_plane=cfg.request_plane,
            nats_url=cfg.nats_server,
        )
        identity = WorkerIdentity(
            namespace=cfg.namespace,
            component=cfg.component,
            endpoint=cfg.endpoint,
            model_name=model_name or model_dir.resolve().name,
            model_path=str(model_dir.resolve()),
            context_length=cfg.context_length or reported_length or files.context_length,
            model_types=cfg.model_types,
            transport=cfg.request_plane,
            files=model_files,
        )
        settings = SidecarSettings(
            block_size=cfg.block_size,
            context_length=identity.context_length,
            mode=cfg.upstream_mode,
            dp_size=cfg.upstream_dp_size,
            poll_interval_s=cfg.upstream_poll_interval_s,
            api_key=cfg.upstream_api_key,
            topic=cfg.kv_events_topic,
            sampling_knobs=cfg.upstream_knobs,
            guided_decoding=cfg.upstream_guided_decoding,
            stall_timeout_s=cfg.request_stall_timeout_s,
        )
        specs = _specs(cfg.upstream_url, cfg.kv_events_endpoint, cfg.kv_replay_endpoint)
        async with upstream_workers(
            cfg,
            store=store,
            specs=specs,
            settings=settings,
            identity=identity,
            files=files,
            host=cfg.host,
            drain_timeout_s=cfg.drain_timeout_s,
            events_batch_s=cfg.kv_events_interval_ms / 1000,
        ) as workers:
            if on_ready is not None:
                on_ready(workers)
            await stop.wait()
            log.info("shutting down %d upstream worker(s)", len(workers))


async def with_gguf_tokenizer(cfg: FrontendConfig) -> FrontendConfig:
    """`cfg` with a `--model-path FILE.gguf` (given with --upstream) replaced by the tokenizer
    directory read from the file, which the frontend's preprocessing loads like any model dir."""
    path = cfg.model_path
    if path is None or not cfg.upstreams or await asyncio.to_thread(Path(path).is_dir):
        return cfg
    model_dir = await asyncio.to_thread(tokenizer_dir, Path(path))
    return dataclasses.replace(cfg, model_path=str(model_dir))


@contextlib.asynccontextmanager
async def frontend_upstreams(
    cfg: FrontendConfig, store: Store, local: LocalPlane | None = None
) -> AsyncIterator[None]:
    """`turbine frontend --upstream MODEL=URL ... [--upstream-file FILE]`: the sidecar inside the
    frontend process (whose request-plane client, wrapped by `local`, calls it directly)."""
    specs = cfg.upstreams
    if not specs or cfg.model_path is None:
        yield
        return
    by_model: dict[str, list[str]] = {}
    for spec in specs:
        name, _, url = spec.partition("=")
        by_model.setdefault(name, []).append(url)
    model_dir = await asyncio.to_thread(Path(cfg.model_path).resolve)
    files = await asyncio.to_thread(load_model_files, model_dir)
    block_size = cfg.kv_cache_block_size or DEFAULT_UPSTREAM_BLOCK_SIZE
    async with contextlib.AsyncExitStack() as stack:
        for name, urls in by_model.items():
            identity = WorkerIdentity(
                namespace=cfg.namespace,
                component="upstream",
                endpoint="generate",
                model_name=name,
                model_path=str(model_dir),
                context_length=files.context_length,
                transport=cfg.request_plane,
            )
            await stack.enter_async_context(
                upstream_workers(
                    cfg,
                    store=store,
                    specs=_specs(tuple(urls), (), ()),
                    settings=SidecarSettings(
                        block_size=block_size,
                        context_length=files.context_length,
                        guided_decoding=cfg.upstream_guided_decoding,
                        stall_timeout_s=cfg.request_stall_timeout_s,
                    ),
                    identity=identity,
                    files=files,
                    host="127.0.0.1",
                    drain_timeout_s=cfg.drain_timeout_s,
                    local=local,
                )
            )
        yield
