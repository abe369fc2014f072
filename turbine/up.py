"""`turbine up`: a frontend plus mock workers, on the embedded defaults, in one process tree.

The workers run in one child process (`turbine worker --num-workers N`) that finds the frontend
through the file discovery store, exactly as separately started workers would; with
`--discovery-backend mem` they run inside this process instead. Ctrl-C (or SIGTERM) drains both and
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from turbine.config import (
    FrontendConfig,
    UpConfig,
    WorkerConfig,
    config_from_cli,
)
from turbine.errors import ConfigError
from turbine.frontend.main import run_frontend
from turbine.logs import configure_logging
from turbine.runtime.discovery.memory import MemoryStore
from turbine.worker.main import BUNDLED_MODEL_NAME, run_workers

log = logging.getLogger("turbine.up")


def _worker_argv(cfg: UpConfig) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "turbine.worker",
        "--engine",
        "mocker",
        "--num-workers",
        str(cfg.workers),
        "--speedup-ratio",
        str(cfg.speedup_ratio),
        "--num-gpu-blocks-override",
        str(cfg.num_gpu_blocks_override),
        "--block-size",
        str(cfg.block_size),
        "--namespace",
        cfg.namespace,
        "--discovery-backend",
        cfg.discovery_backend,
        "--lease-ttl-s",
        str(cfg.lease_ttl_s),
        "--log-level",
        cfg.log_level,
        # The workers must speak the frontend's planes.
        "--request-plane",
        cfg.request_plane,
        "--event-plane",
        cfg.event_plane,
        "--nats-server",
        cfg.nats_server,
        "--zmq-event-endpoint",
        cfg.zmq_event_endpoint,
    ]
    if cfg.file_store_path:
        argv += ["--file-store-path", cfg.file_store_path]
    if cfg.model_path:
        argv += ["--model-path", cfg.model_path]
    if cfg.model_name:
        argv += ["--model-name", cfg.model_name]
    return argv


def _banner(url: str, model: str) -> str:
    return (
        f"\nTurbine is serving the OpenAI API on {url}\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n'
        "Press Ctrl-C to stop.\n"
    )


def _served_model_name(cfg: UpConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    return os.path.basename(os.path.abspath(cfg.model_path)) if cfg.model_path else BUNDLED_MODEL_NAME


async def _run(cfg: UpConfig, model: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(url: str) -> None:
        print(_banner(url.replace("0.0.0.0", "127.0.0.1"), model), flush=True)

    frontend_cfg = FrontendConfig(**{f: getattr(cfg, f) for f in FrontendConfig.__dataclass_fields__})
    if cfg.discovery_backend == "mem":
        store = MemoryStore()
        worker_cfg = WorkerConfig(
            namespace=cfg.namespace,
            discovery_backend="mem",
            model_path=cfg.model_path,
            model_name=cfg.model_name,
            num_workers=cfg.workers,
            speedup_ratio=cfg.speedup_ratio,
            num_gpu_blocks_override=cfg.num_gpu_blocks_override,
            block_size=cfg.block_size,
            request_plane=cfg.request_plane,
            event_plane=cfg.event_plane,
            nats_server=cfg.nats_server,
            zmq_event_endpoint=cfg.zmq_event_endpoint,
        )
        workers = loop.create_task(run_workers(worker_cfg, stop=stop, store=store))
        try:
            await run_frontend(frontend_cfg, stop=stop, store=store, on_ready=ready)
        finally:
            stop.set()
            await workers
            await store.close()
        return 0

    # start_new_session: Ctrl-C reaches only us; we stop the workers after the frontend has drained.
    argv = _worker_argv(cfg)
    child = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
    try:
        await run_frontend(frontend_cfg, stop=stop, on_ready=ready)
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(child.wait(), 30)
        except TimeoutError:
            child.kill()
            code = await child.wait()
    if code != 0:
        log.error("workers exited with status %d", code)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    prog = "turbine up"
    cfg = config_from_cli(
        UpConfig,
        argv,
        prog=prog,
        description="Start a frontend plus mocker workers serving the bundled (or given) model.",
    )
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_json)
    import uvloop

    try:
        with contextlib.suppress(KeyboardInterrupt):
            return uvloop.run(_run(cfg, _served_model_name(cfg)))
    except ConfigError as exc:  # e.g. a TLS certificate that does not load
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2
    return 0
