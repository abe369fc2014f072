"""Composition root of the frontend: `turbine frontend` / `python -m turbine.frontend`.

Start-up: parse config → logging → optional config dump → discovery store + request-plane client →
model registry (watches discovery) → OpenAI HTTP service (HTTPS/mTLS with --tls-*), or a terminal chat
with -i (`interactive.py`); plus the KServe v2 gRPC service with --kserve-grpc-server (`kserve.py`)
→ SIGTERM/SIGINT handlers.
Shutdown: stop accepting → let in-flight requests finish (bounded by --drain-timeout-s) → close the
registry, the request plane and the store → exit 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from turbine.config import FrontendConfig, config_from_cli
from turbine.errors import ConfigError
from turbine.frontend.anthropic import AnthropicService
from turbine.frontend.http import OpenAIService
from turbine.frontend.interactive import serve_interactive
from turbine.frontend.kserve import KServeServer
from turbine.frontend.models import ModelRegistry
from turbine.frontend.pipeline import PipelineSettings
from turbine.frontend.python_engine import load_factory
from turbine.frontend.supervisor import METRICS_SUBDIR, add_pid_header, run_supervisor, stop_with_supervisor
from turbine.frontend.tls import grpc_server_credentials, server_ssl_context
from turbine.logs import configure_logging
from turbine.router.factory import make_router
from turbine.runtime.blobs import NatsObjectBlobStore, StoreBlobStore
from turbine.runtime.discovery.base import Store
from turbine.runtime.events.local_channel import local_plane
from turbine.runtime.factory import make_event_plane, make_request_client, make_store, nats_tls
from turbine.runtime.model_files import ModelFileResolver, default_model_cache_dir
from turbine.runtime.transport.local import LocalPlane
from turbine.worker.upstream import frontend_upstreams, with_gguf_tokenizer

log = logging.getLogger("turbine.frontend")


async def run_frontend(
    cfg: FrontendConfig,
    *,
    stop: asyncio.Event | None = None,
    store: Store | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then drain and return."""
    stop = stop or asyncio.Event()
    cfg = await with_gguf_tokenizer(cfg)  # --upstream with --model-path FILE.gguf
    # First, so a bad certificate or key fails as one ConfigError line before anything starts.
    ssl_context = None
    if cfg.tls_cert_path is not None and cfg.tls_key_path is not None:
        ssl_context = server_ssl_context(cfg.tls_cert_path, cfg.tls_key_path, cfg.tls_client_ca_cert_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    own_store = store is None
    store = store if store is not None else make_store(cfg)
    # Streams to the workers of --upstream (which run in this process) skip the network.
    local = LocalPlane()
    client = local.client(make_request_client(cfg))
    executor = concurrent.futures.ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="tokenize")
    # The NATS object store connects only when a card lists a nats-os: location.
    model_files = ModelFileResolver(
        [StoreBlobStore(store), NatsObjectBlobStore(cfg.nats_server, tls=nats_tls(cfg))],
        Path(cfg.model_cache_dir) if cfg.model_cache_dir else default_model_cache_dir(),
    )
    # --event-plane nats or zmq: one connection (zmq: one bound socket) shared by every model's KV
    # router, opened by the first subscription (only KV routing with events needs it).
    events = make_event_plane(cfg)
    # A child of --num-processes: its routers share load with its siblings over the supervisor's
    # local channel (unless --router-replica-sync shares it with every frontend on NATS already).
    group_dir = cfg.frontend_process_dir
    sync_events = await local_plane(group_dir) if group_dir and not cfg.router_replica_sync else None
    if group_dir:
        stop_with_supervisor(stop)
    registry = ModelRegistry(
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
    if cfg.interactive:
        try:
            await serve_interactive(cfg, registry, stop)
        finally:
            if events is not None:
                await events.close()
            if sync_events is not None:
                await sync_events.close()
            await client.close()
            await model_files.close()
            if own_store:
                await store.close()
            executor.shutdown(wait=False, cancel_futures=True)
        return
    service = OpenAIService(
        registry,
        max_body_bytes=cfg.max_request_body_bytes,
        metrics_prefix=cfg.metrics_prefix,
        reasoning_field_name=cfg.reasoning_field_name,
    )
    app = service.app()
    if cfg.enable_anthropic_api:
        AnthropicService(registry, service).add_routes(app)
    if group_dir:
        service.metrics.aggregate_processes(str(Path(group_dir) / METRICS_SUBDIR))
        add_pid_header(app)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=cfg.drain_timeout_s
    )
    await runner.setup()
    # reuse_port: the processes of one --num-processes frontend listen on the same port.
    site = web.TCPSite(
        runner,
        cfg.http_host,
        cfg.http_port,
        backlog=1024,
        ssl_context=ssl_context,
        reuse_port=True if group_dir else None,
    )
    watcher = loop.create_task(registry.run(), name="model-registry")
    grpc_credentials = (
        grpc_server_credentials(cfg.tls_cert_path, cfg.tls_key_path, cfg.tls_client_ca_cert_path)
        if cfg.kserve_grpc_server and cfg.tls_cert_path is not None and cfg.tls_key_path is not None
        else None
    )
    grpc_server = (
        KServeServer(registry, cfg.http_host, cfg.grpc_port, grpc_credentials, service.metrics)
        if cfg.kserve_grpc_server
        else None
    )
    metrics_runner = web.AppRunner(service.metrics_app(), access_log=None) if cfg.grpc_metrics_port else None
    # --upstream MODEL=URL: the upstream sidecar's workers, registered in this process's store.
    upstreams = contextlib.AsyncExitStack()
    try:
        await upstreams.enter_async_context(frontend_upstreams(cfg, store, local))
        if group_dir and not await registry.caught_up(timeout_s=30.0):
            # One of a --num-processes group (a restart, say): take connections from the shared
            # port only once the models the others serve are loaded here too, so none gets a 404.
            log.warning("serving before every discovered model has loaded (30 s passed)")
        await site.start()
        if grpc_server is not None:
            await grpc_server.start()
        if metrics_runner is not None and cfg.grpc_metrics_port is not None:
            await metrics_runner.setup()
            await web.TCPSite(
                metrics_runner, cfg.http_host, cfg.grpc_metrics_port, reuse_port=True if group_dir else None
            ).start()
        url = f"{'https' if ssl_context else 'http'}://{cfg.http_host}:{cfg.http_port}"
        log.info("OpenAI API on %s (namespace %s, router %s)", url, cfg.namespace, cfg.router_mode)
        if on_ready is not None:
            on_ready(url)
        stop_wait = loop.create_task(stop.wait())
        await asyncio.wait({stop_wait, watcher}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if watcher.done():
            watcher.result()  # discovery failed: surface the error
        log.info("shutting down: draining %d in-flight request(s)", service.inflight)
        await site.stop()
        # grpc.aio's stop refuses new RPCs at once and cancels what is left after the grace period.
        grpc_drained = loop.create_task(grpc_server.stop(cfg.drain_timeout_s)) if grpc_server else None
        if not await service.wait_idle(cfg.drain_timeout_s):
            log.warning("drain timed out with %d request(s) in flight", service.inflight)
        if grpc_drained is not None:
            await grpc_drained
    finally:
        await upstreams.aclose()
        if grpc_server is not None:
            await grpc_server.stop(None)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if events is not None:
            await events.close()
        if sync_events is not None:
            await sync_events.close()
        await client.close()
        await model_files.close()
        if own_store:
            await store.close()
        executor.shutdown(wait=False, cancel_futures=True)
        log.info("frontend stopped")


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
    import uvloop

    if cfg.process_count > 1:
        return run_supervisor(cfg, prog)
    # What is loaded by now (modules, classes, functions) lives as long as the process: frozen, the
    # collector's full passes skip it. Otherwise each pass walks all of it, a pause that every request
    # in flight waits through, long enough to set the chat p99 under concurrent load.
    gc.collect()
    gc.freeze()
    try:
        uvloop.run(run_frontend(cfg))
    except ConfigError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
