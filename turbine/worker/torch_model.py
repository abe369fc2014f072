"""The worker's side of the torch engine: turn flags into a loaded model and per-worker engines.

Imports torch lazily, so workers of the other engines (and the frontend) run without the `torch`
extra installed; asking for `--engine torch` without it is a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from turbine.config import WorkerConfig
from turbine.engines.base import Engine, EventSink
from turbine.errors import ConfigError

if TYPE_CHECKING:
    from turbine.engines.torch.engine import LoadedModel, TorchEngineConfig

log = logging.getLogger("turbine.worker")

# A CPU step computes every scheduled token before any sequence gets its next one, so a smaller
# budget there keeps decoding streams moving while long prompts prefill in chunks.
CPU_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class TorchModel:
    """A model loaded once per worker process; each of its workers gets an engine with its own KV cache."""

    config: TorchEngineConfig
    loaded: LoadedModel
    model_dir: Path
    """The HF-style directory served (for a .gguf file, its converted copy in the cache)."""
    served_name: str

    def engine(self, worker_id: int, events: EventSink) -> Engine:
        from turbine.engines.torch.engine import TorchEngine

        return TorchEngine(self.config, self.loaded, worker_id, events)


def load_torch_model(cfg: WorkerConfig) -> TorchModel:
    """Blocking (convert a GGUF, read the weights): run it in a thread."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("--engine torch needs PyTorch: pip install 'turbine[torch]'") from None
    from turbine.engines.torch.engine import TorchEngineConfig, load_model, resolve_device
    from turbine.engines.torch.gguf import convert_gguf, served_name

    assert cfg.model_path is not None, "validated by WorkerConfig"
    path = Path(cfg.model_path)
    if cfg.is_gguf:
        cache = Path(cfg.gguf_cache_dir) if cfg.gguf_cache_dir else None
        model_dir, name = convert_gguf(path, cache), served_name(path)
    else:
        model_dir, name = path, path.resolve().name
    device = resolve_device(cfg.device)
    budget = cfg.max_num_batched_tokens or (
        CPU_MAX_NUM_BATCHED_TOKENS if device.type == "cpu" else DEFAULT_MAX_NUM_BATCHED_TOKENS
    )
    config = TorchEngineConfig(
        model_dir=model_dir,
        device=str(device),
        dtype=cfg.dtype,
        block_size=cfg.block_size,
        num_gpu_blocks=cfg.num_gpu_blocks_override,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=budget,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager,
        q4_max_rows=cfg.q4_max_rows,
        cpu_kernels=cfg.cpu_kernels,
        load_format=cfg.load_format,
        guided_decoding_threads=cfg.guided_decoding_threads,
    )
    loaded = load_model(config)
    overrides = cfg.generation_overrides()
    if overrides:
        loaded.defaults = dataclasses.replace(
            loaded.defaults,
            **{k: int(v) if k == "top_k" else v for k, v in overrides.items()},  # type: ignore[arg-type]
        )
    log.info("default sampling: %s", loaded.defaults)
    return TorchModel(config, loaded, model_dir, name)
