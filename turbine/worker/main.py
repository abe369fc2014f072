"""Composition root of a worker process: `turbine worker` / `python -m turbine.worker`.

Builds `--num-workers` independent engines (each its own request-plane server, lease and instance id)
in one process, registers them, and on SIGTERM/SIGINT drains them all and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from turbine.config import WorkerConfig, config_from_cli
from turbine.engines.base import Engine, EventSink
from turbine.engines.echo import EchoEngine
from turbine.engines.mocker.engine import MockerConfig, MockerEngine
from turbine.engines.scripted import ScriptedEngine, load_script
from turbine.errors import ConfigError
from turbine.logs import configure_logging
from turbine.models import bundled_model_path
from turbine.preprocess.tokenizer import ModelFiles, load_model_files
from turbine.runtime.discovery.base import Store
from turbine.runtime.factory import make_event_plane, make_request_server, make_store, nats_tls
from turbine.runtime.lifecycle import stop_on_signals
from turbine.runtime.model_files import publish_worker_model_files
from turbine.worker.sdk import EngineWorker, WorkerIdentity, serving, worker_events
from turbine.worker.torch_model import TorchModel, load_torch_model

log = logging.getLogger("turbine.worker")

BUNDLED_MODEL_NAME = "turbine-tiny"

# Byte-level BPE vocabularies start with 256 single-byte tokens; generating those at random would
# produce invalid UTF-8, so the mocker draws from the merged tokens after them when there are enough.
_BYTE_TOKENS = 256


def ordinary_token_range(files: ModelFiles) -> tuple[int, int]:
    """Token ids the mocker may generate: the vocabulary without special (added) tokens."""
    vocab = files.tokenizer.get_vocab_size(with_added_tokens=True)
    special = sorted(i for i, tok in files.tokenizer.get_added_tokens_decoder().items() if tok.special)
    if not special:
        return 0, vocab
    if special[0] > vocab // 2:
        return 0, special[0]  # specials at the end (Llama-style)
    lo = special[-1] + 1
    if vocab - lo > 4 * _BYTE_TOKENS:
        lo += _BYTE_TOKENS
    return lo, vocab


def build_engine(
    cfg: WorkerConfig,
    files: ModelFiles,
    instance_id: int,
    events: EventSink,
    torch_model: TorchModel | None = None,
) -> Engine:
    if cfg.engine == "echo":
        return EchoEngine(delay_s=cfg.echo_delay_ms / 1000.0, block_size=cfg.block_size)
    if cfg.engine == "torch":
        assert torch_model is not None, "load_torch_model() first"
        return torch_model.engine(instance_id, events)
    if cfg.engine == "scripted" and cfg.script_file is not None:
        return ScriptedEngine(load_script(Path(cfg.script_file)), files.tokenizer, block_size=cfg.block_size)
    mocker = MockerConfig(
        block_size=cfg.block_size,
        num_gpu_blocks=cfg.num_gpu_blocks_override or MockerConfig.num_gpu_blocks,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens or MockerConfig.max_num_batched_tokens,
        speedup_ratio=cfg.speedup_ratio,
        enable_prefix_caching=cfg.enable_prefix_caching,
        eos_probability=cfg.eos_probability,
        token_id_range=ordinary_token_range(files),
    )
    return MockerEngine(mocker, worker_id=instance_id, events=events)


async def run_workers(
    cfg: WorkerConfig,
    *,
    stop: asyncio.Event | None = None,
    store: Store | None = None,
    on_ready: Callable[[list[EngineWorker]], None] | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then drain every worker and return.
    The store, the shared event plane and the workers are entered on one exit stack, which closes
    them in reverse order (a given `store` is the caller's to close)."""
    if cfg.engine == "openai":  # a sidecar to OpenAI-compatible servers
        # Imported here: its HTTP and ZeroMQ clients are no other engine's start-up cost.
        from turbine.worker.upstream import run_upstream_workers

        await run_upstream_workers(cfg, stop=stop, store=store, on_ready=on_ready)
        return
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    model_dir, model_name, torch_model = await _load_model(cfg)
    files = await asyncio.to_thread(load_model_files, model_dir)
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await stack.enter_async_context(make_store(cfg))
        # Before any card: a frontend that sees the card must find the files it lists.
        model_files = await publish_worker_model_files(
            cfg.model_files_via,
            model_dir=model_dir,
            store=store,
            request_plane=cfg.request_plane,
            nats_url=cfg.nats_server,
            nats_tls=nats_tls(cfg),
        )
        identity = WorkerIdentity(
            namespace=cfg.namespace,
            component=cfg.component,
            endpoint=cfg.endpoint,
            model_name=model_name,
            model_path=str(model_dir.resolve()),
            context_length=cfg.context_length or files.context_length,
            model_types=cfg.model_types,
            transport=cfg.request_plane,
            files=model_files,
            tool_call_parser=cfg.tool_call_parser,
            reasoning_parser=cfg.reasoning_parser,
        )
        # --event-plane nats or zmq: one connection for the process's workers, connected now so that a
        # wrong URL fails start-up; closed after every worker has drained.
        shared = make_event_plane(cfg)
        if shared is not None:
            await stack.enter_async_context(shared)
        workers = []
        for _ in range(cfg.num_workers):
            instance_id = secrets.randbits(63)
            plane, sink = worker_events(shared, cfg.namespace, model_name, instance_id)
            workers.append(
                EngineWorker(
                    engine=build_engine(cfg, files, instance_id, sink, torch_model),
                    store=store,
                    server=make_request_server(cfg, cfg.host),
                    identity=identity,
                    lease_ttl_s=cfg.lease_ttl_s,
                    instance_id=instance_id,
                    events=plane,
                    events_batch_s=cfg.kv_events_interval_ms / 1000,
                )
            )
        started = await stack.enter_async_context(serving(workers, cfg.drain_timeout_s))
        if on_ready is not None:
            on_ready(started)
        await stop.wait()
        log.info("shutting down %d worker(s)", len(started))


TORCH_SWITCH_INTERVAL_S = 0.0005


async def _load_model(cfg: WorkerConfig) -> tuple[Path, str, TorchModel | None]:
    """The model's directory, its served name, and with --engine torch the loaded model."""
    model_dir = Path(cfg.model_path) if cfg.model_path else bundled_model_path()
    model_name = cfg.model_name or (model_dir.resolve().name if cfg.model_path else BUNDLED_MODEL_NAME)
    if cfg.engine != "torch":
        return model_dir, model_name, None
    # The torch engine's runner and grammar threads come back from GIL-free work (CUDA calls, the
    # grammar library) several times a step, and each time wait for the GIL while the event loop
    # holds it: by up to the switch interval, whose default (5 ms) is longer than a small model's
    # whole decode step.
    sys.setswitchinterval(TORCH_SWITCH_INTERVAL_S)
    # Loaded before anything registers: frontends see this worker only once it can serve.
    torch_model = await asyncio.to_thread(load_torch_model, cfg)
    if cfg.is_gguf and not cfg.model_name:
        model_name = torch_model.served_name
    return torch_model.model_dir, model_name, torch_model


def main(argv: Sequence[str] | None = None, prog: str = "turbine worker") -> int:
    cfg = config_from_cli(
        WorkerConfig,
        argv,
        prog=prog,
        description="Serve a model with an engine (torch, mocker or echo) and register it in discovery.",
    )
    if cfg is None:
        return 2
    configure_logging(cfg.log_level, cfg.log_json)
    import uvloop

    # As in the frontend: what is loaded by now lives as long as the process, and the collector's full
    # passes, each a pause for every stream, need not walk it.
    gc.collect()
    gc.freeze()
    try:
        uvloop.run(run_workers(cfg))
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 2
    return 0
