"""Composition root of the frontend: `turbine frontend` / `python -m turbine.frontend`.

Start-up: parse config → logging → optional config dump → discovery store + request-plane client →
model registry (watches discovery) → OpenAI HTTP service (HTTPS/mTLS with --tls-*), or a terminal chat
with -i (`interactive.py`); plus the KServe v2 gRPC service with --kserve-grpc-server (`kserve.py`)
→ SIGTERM/SIGINT handlers.
Shutdown: stop accepting → let in-flight requests finish (bounded by --drain-timeout-s) → close the
registry, the request plane and the store → exit 0. Each resource is entered once on one
`AsyncExitStack` as it is made, and the stack closes them all in reverse order, on every path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import secrets
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from turbine.config import FrontendConfig, config_from_cli
from turbine.frontend.anthropic import AnthropicService
from turbine.frontend.http import OpenAIService
from turbine.frontend.interactive import serve_interactive
from turbine.frontend.models import ModelRegistry
from turbine.frontend.pipeline import PipelineSettings
from turbine.frontend.python_engine import load_factory
from turbine.frontend.supervisor import (
    METRICS_SUBDIR,
    add_pid_header,
    exit_status,
    run_supervisor,
    stop_with_supervisor,
)
from turbine.frontend.tls import server_ssl_context
from turbine.logs import configure_logging
from turbine.router.factory import make_router
from turbine.runtime.blobs import NATS_SCHEME, BlobStore, LazyBlobStore, StoreBlobStore
from turbine.runtime.discovery.base import Store
from turbine.runtime.events.local_channel import local_plane
from turbine.runtime.factory import make_event_plane, make_request_client, make_store, nats_tls
from turbine.runtime.lifecycle import cancel_and_wait, stop_on_signals
from turbine.runtime.model_files import ModelFileResolver, default_model_cache_dir
from turbine.runtime.transport.local import LocalPlane

if TYPE_CHECKING:
    from turbine.frontend.kserve import KServeServer

log = logging.getLogger("turbine.frontend")


async def run_frontend(
    cfg: FrontendConfig,
    *,
    stop: asyncio.Event | None = None,
    store: Store | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then drain and return. Every resource
    is entered once on one exit stack, which closes them in reverse order (a given `store` is the
    caller's to close)."""
    stop = stop or asyncio.Event()
    if cfg.upstreams:
        # Only a frontend that fronts servers itself loads the upstream sidecar (and its clients),
        # as only one with --kserve-grpc-server loads gRPC: both are imported where they are used.
        from turbine.worker.upstream import with_gguf_tokenizer

        cfg = await with_gguf_tokenizer(cfg)  # --upstream with --model-path FILE.gguf
    # First, so a bad certificate or key fails as one ConfigError line before anything starts.
    ssl_context = None
    if cfg.tls_cert_path is not None and cfg.tls_key_path is not None:
        ssl_context = server_ssl_context(cfg.tls_cert_path, cfg.tls_key_path, cfg.tls_client_ca_cert_path)
    stop_on_signals(stop)
    async with contextlib.AsyncExitStack() as stack:
        if not cfg.interactive:
            stack.callback(log.info, "frontend stopped")
        executor = concurrent.futures.ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="tokenize")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        if store is None:
            store = await stack.enter_async_context(make_store(cfg))
        # Streams to the workers of --upstream (which run in this process) skip the network.
        local = LocalPlane()
        registry = await _registry(cfg, stack, store, local, executor)
        if cfg.frontend_process_dir:
            stop_with_supervisor(stop)
        if cfg.interactive:
            await serve_interactive(cfg, registry, stop)
            return
        await _serve_http(cfg, stack, registry, store, local, stop, ssl_context, on_ready)


async def _registry(
    cfg: FrontendConfig,
    stack: contextlib.AsyncExitStack,
    store: Store,
    local: LocalPlane,
    executor: concurrent.futures.Executor,
) -> ModelRegistry:
    """The model registry, its model files, request-plane client and event planes on `stack`."""
    # The NATS object store is made (and connects) only when a card lists a nats-os: location.
    model_files = ModelFileResolver(
        [StoreBlobStore(store), LazyBlobStore(NATS_SCHEME, lambda: _nats_blobs(cfg))],
        Path(cfg.model_cache_dir) if cfg.model_cache_dir else default_model_cache_dir(),
    )
    await stack.enter_async_context(model_files)
    client = await stack.enter_async_context(local.client(make_request_client(cfg)))
    # A child of --num-processes: its routers share load with its siblings over the supervisor's
    # local channel (unless --router-replica-sync shares it with every frontend on NATS already).
    group_dir = cfg.frontend_process_dir
    sync_events = await local_plane(group_dir) if group_dir and not cfg.router_replica_sync else None
    if sync_events is not None:
        stack.push_async_callback(sync_events.close)
    # --event-plane nats or zmq: one connection (zmq: one bound socket) shared by every model's KV
    # router, opened by the first subscription (only KV routing with events needs it): closed on
    # exit, not started here.
    events = make_event_plane(cfg)
    if events is not None:
        stack.push_async_callback(events.close)
    return ModelRegistry(
        # Each frontend process is one router replica; a random id never collides in practice.
        PipelineSettings.from_config(
            cfg, replica_id=secrets.randbits(63) if cfg.router_replica_sync or group_dir else None
        ),
        store=store,
        client=client,
        router_factory=lambda: make_router(cfg),
        executor=executor,
        engine_factory=load_factory(cfg.exp_python_factory) if cfg.exp_python_factory else None,
        model_files=model_files,
        events=events,
        sync_events=sync_events,
    )


async def _serve_http(
    cfg: FrontendConfig,
    stack: contextlib.AsyncExitStack,
    registry: ModelRegistry,
    store: Store,
    local: LocalPlane,
    stop: asyncio.Event,
    ssl_context: ssl.SSLContext | None,
    on_ready: Callable[[str], None] | None,
) -> None:
    """The OpenAI API (with the gRPC service and metrics port if asked) until `stop`, then stop
    accepting and drain. Entered on `stack`, so closed in reverse: the upstream workers, gRPC, the
    metrics port, the HTTP server, the registry's watcher."""
    service = _openai_service(cfg, registry)
    reuse_port = True if cfg.frontend_process_dir else None
    watcher = asyncio.get_running_loop().create_task(registry.run(), name="model-registry")
    stack.push_async_callback(cancel_and_wait, watcher)
    runner = web.AppRunner(
        _app(cfg, registry, service),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=cfg.drain_timeout_s,
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    # reuse_port: the processes of one --num-processes frontend listen on the same port.
    site = web.TCPSite(
        runner, cfg.http_host, cfg.http_port, backlog=1024, ssl_context=ssl_context, reuse_port=reuse_port
    )
    metrics_runner = web.AppRunner(service.metrics_app(), access_log=None) if cfg.grpc_metrics_port else None
    if metrics_runner is not None:
        stack.push_async_callback(metrics_runner.cleanup)
    grpc_server = _grpc_server(cfg, registry, service)
    if grpc_server is not None:
        stack.push_async_callback(grpc_server.stop, None)
    # --upstream MODEL=URL: the upstream sidecar's workers, registered in this process's store.
    if cfg.upstreams:
        from turbine.worker.upstream import frontend_upstreams

        await stack.enter_async_context(frontend_upstreams(cfg, store, local))
    if cfg.frontend_process_dir and not await registry.caught_up(timeout_s=30.0):
        # One of a --num-processes group (a restart, say): take connections from the shared
        # port only once the models the others serve are loaded here too, so none gets a 404.
        log.warning("serving before every discovered model has loaded (30 s passed)")
    await site.start()
    if grpc_server is not None:
        await grpc_server.start()
    if metrics_runner is not None and cfg.grpc_metrics_port is not None:
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, cfg.http_host, cfg.grpc_metrics_port, reuse_port=reuse_port).start()
    url = f"{'https' if ssl_context else 'http'}://{cfg.http_host}:{cfg.http_port}"
    log.info("OpenAI API on %s (namespace %s, router %s)", url, cfg.namespace, cfg.router_mode)
    if on_ready is not None:
        on_ready(url)
    await _until_stopped(stop, watcher)
    await _drain(cfg, service, site, grpc_server)


def _openai_service(cfg: FrontendConfig, registry: ModelRegistry) -> OpenAIService:
    return OpenAIService(
        registry,
        max_body_bytes=cfg.max_request_body_bytes,
        metrics_prefix=cfg.metrics_prefix,
        reasoning_field_name=cfg.reasoning_field_name,
    )


def _app(cfg: FrontendConfig, registry: ModelRegistry, service: OpenAIService) -> web.Application:
    """The HTTP app: the OpenAI routes, and Anthropic's with --enable-anthropic-api."""
    app = service.app()
    if cfg.enable_anthropic_api:
        AnthropicService(registry, service).add_routes(app)
    if cfg.frontend_process_dir:
        service.metrics.aggregate_processes(str(Path(cfg.frontend_process_dir) / METRICS_SUBDIR))
        add_pid_header(app)
    return app


def _nats_blobs(cfg: FrontendConfig) -> BlobStore:
    from turbine.runtime.nats_blobs import NatsObjectBlobStore

    return NatsObjectBlobStore(cfg.nats_server, tls=nats_tls(cfg))


def _grpc_server(cfg: FrontendConfig, registry: ModelRegistry, service: OpenAIService) -> KServeServer | None:
    """The KServe v2 gRPC service with --kserve-grpc-server (TLS as the HTTP edge's)."""
    if not cfg.kserve_grpc_server:
        return None
    from turbine.frontend.kserve import KServeServer
    from turbine.frontend.tls import grpc_server_credentials

    credentials = (
        grpc_server_credentials(cfg.tls_cert_path, cfg.tls_key_path, cfg.tls_client_ca_cert_path)
        if cfg.tls_cert_path is not None and cfg.tls_key_path is not None
        else None
    )
    return KServeServer(registry, cfg.http_host, cfg.grpc_port, credentials, service.metrics)


async def _until_stopped(stop: asyncio.Event, watcher: asyncio.Task[None]) -> None:
    """Wait for `stop`; if the registry's watcher ends first, discovery failed: raise its error."""
    stop_wait = asyncio.get_running_loop().create_task(stop.wait())
    await asyncio.wait({stop_wait, watcher}, return_when=asyncio.FIRST_COMPLETED)
    stop_wait.cancel()
    if watcher.done():
        watcher.result()


async def _drain(
    cfg: FrontendConfig, service: OpenAIService, site: web.TCPSite, grpc_server: KServeServer | None
) -> None:
    """Stop accepting, then let in-flight requests finish for up to --drain-timeout-s."""
    requests = service.requests
    log.info("shutting down: draining %d in-flight request(s)", requests.active_streams)
    await site.stop()
    # grpc.aio's stop refuses new RPCs at once and cancels what is left after the grace period.
    grpc_drained = (
        asyncio.get_running_loop().create_task(grpc_server.stop(cfg.drain_timeout_s)) if grpc_server else None
    )
    if not await requests.wait_idle(cfg.drain_timeout_s):
        log.warning("drain timed out with %d request(s) in flight", requests.active_streams)
    if grpc_drained is not None:
        await grpc_drained


def main(argv: Sequence[str] | None = None, prog: str = "turbine frontend") -> int:
    cfg = config_from_cli(
        FrontendConfig,
        argv,
        prog=prog,
        description="Serve the OpenAI API for every model that workers register in discovery.",
    )
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_json)
    if cfg.process_count > 1:
        return run_supervisor(cfg, prog)
    # What is loaded by now (modules, classes, functions) lives as long as the process: frozen, the
    # collector's full passes skip it. Otherwise each pass walks all of it, a pause that every request
    # in flight waits through, long enough to set the chat p99 under concurrent load.
    gc.collect()
    gc.freeze()
    return exit_status(run_frontend(cfg), prog)
