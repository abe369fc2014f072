"""TorchEngine: a real model served by `EngineCore` with the torch executor.

`load_model()` (slow: weights, a progress bar) runs once per worker process, off the event loop, and
its result is shared read-only by every engine of the process; each engine then owns its KV cache,
sized from `--num-gpu-blocks-override`, else from free GPU memory (`--gpu-memory-utilization`) on
CUDA or `--kv-cache-memory-bytes` on CPU. Prefix caching, chunked prefill, preemption, KV events and
load metrics come from the shared scheduler (`engines/core`), exactly as in the mocker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbine.engines.base import EventSink
from turbine.engines.core.engine import EngineCore, Executor
from turbine.engines.core.scheduler import SchedulerConfig
from turbine.engines.torch import cpu_kernels, q4
from turbine.engines.torch.arch import ModelArch, read_arch
from turbine.engines.torch.buckets import buckets
from turbine.engines.torch.compile_watch import CompileWatch
from turbine.engines.torch.cuda_graphs import DecodeGraphs
from turbine.engines.torch.grammar import Guides
from turbine.engines.torch.loader import load_weights
from turbine.engines.torch.model import LlamaModel
from turbine.engines.torch.runner import SamplingDefaults, TorchExecutor
from turbine.errors import ConfigError
from turbine.protocol.model_card import CAP_GUIDED_DECODING
from turbine.protocol.request import SAMPLING_KNOBS, PreprocessedRequest

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 1 << 30
# Room left on the GPU for activations and the sampler, beyond the weights and the KV cache.
_ACTIVATION_RESERVE_BYTES = 1 << 30


Q4_ROWS_TORCH = 8
"""Default row limit of the 4-bit steps on torch's int4 kernel: it is compute-bound beyond (`q4.py`)."""
Q4_ROWS_AMX = 32
"""The same on Turbine's AMX kernel: up to 32 rows (two passes of 16) SmolLM2's layer matmuls are
faster on it than on the dequantized bfloat16 weights, at 64 rows slower."""


@dataclass(frozen=True)
class TorchEngineConfig:
    model_dir: Path
    device: str | None = None
    """cpu | cuda | cuda:N; None: cuda when available, else cpu."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (see `resolve_dtype`)."""
    block_size: int = 64
    num_gpu_blocks: int | None = None
    """KV blocks per engine; None: sized from memory."""
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    """CPU KV cache size per engine (default 1 GiB)."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    load_publish_interval_s: float = 1.0
    enforce_eager: bool = False
    """No CUDA graphs for decode steps (vLLM's flag): slower, but nothing is captured."""
    progress: bool = True
    """Show a progress bar while the weights load."""
    q4_max_rows: int | None = None
    """On CPU in bfloat16, steps of at most this many rows use a GGUF's 4-bit linear weights as they
    are stored (`q4.py`); larger steps the dequantized ones. 0: always the dequantized weights.
    None: `Q4_ROWS_AMX` where Turbine's AMX kernel runs them, else `Q4_ROWS_TORCH`."""
    cpu_kernels: str = "auto"
    """On CPU in bfloat16: turbine (`cpu_kernels.py`, compiled here: the 4-bit matmuls of small
    steps, fused layer ops, paged decode attention), torch (torch's ops only), or auto (turbine
    where it can run, else torch)."""
    load_format: str = "auto"
    """auto: the checkpoint's weights; dummy: random weights of its config's shape, drawn on the device
    (benchmarks of shapes whose weights are not at hand)."""
    guided_decoding_threads: int | None = None
    """Threads of the grammar library computing a step's token masks together; None: a quarter of
    the CPUs, 1 to 4 (`default_mask_threads`)."""


@dataclass
class LoadedModel:
    model: LlamaModel
    arch: ModelArch
    defaults: SamplingDefaults
    device: torch.device
    cpu_kernels: bool = False
    """Turbine's CPU kernels (`cpu_kernels.py`) are loaded and the model uses them."""
    watch: CompileWatch = field(default_factory=CompileWatch)
    """Kernel compiles and graph captures of this process: warnings once serving."""
    gpu_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by each engine's runner around a CUDA step: engines sharing the model (and the GPU) then
    never launch work while another captures a CUDA graph, which capture does not allow."""


def default_mask_threads() -> int:
    """A quarter of the CPUs this process may use, 1 to 4: a step's masks (tens of microseconds a
    row) spread over a few threads, leaving the event loop, the runner and the frontend theirs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 4))


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the torch engine runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device, arch: ModelArch) -> torch.dtype:
    """auto: bf16 on CUDA (fp16 for fp16 checkpoints); on CPU bf16 where the processor computes it
    natively (AVX-512 BF16 / AMX: half the weight bytes per step, the usual limit), else float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    return torch.float16 if arch.torch_dtype == "float16" else torch.bfloat16


def sampling_defaults(model_dir: Path) -> SamplingDefaults:
    """The knobs the checkpoint's generation_config.json sets explicitly; vLLM's defaults for the rest."""
    path = model_dir / "generation_config.json"
    try:
        gen = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        gen = {}
    base = SamplingDefaults()
    if not isinstance(gen, dict):
        return base
    return SamplingDefaults(
        temperature=float(gen.get("temperature", base.temperature)),
        top_p=float(gen.get("top_p", base.top_p)),
        top_k=max(int(gen.get("top_k", base.top_k)), 0),
        min_p=float(gen.get("min_p", base.min_p)),
    )


def load_model(cfg: TorchEngineConfig) -> LoadedModel:
    """Read the architecture and the weights; `ConfigError` (one line) for anything we cannot run."""
    arch = read_arch(cfg.model_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, arch)
    # Turbine's CPU kernels serve bfloat16 on CPU; float32 stays the plain torch path, the one the
    # tests hold token for token against transformers. Settled before the weights load, so that a
    # worker that cannot have them fails at once.
    native = False
    if device.type == "cpu" and dtype == torch.bfloat16:
        try:
            native = cpu_kernels.resolve(cfg.cpu_kernels)
        except cpu_kernels.KernelsUnavailable as exc:
            raise ConfigError(f"--cpu-kernels turbine: {exc}") from None
    log.info(
        "loading %s (%s, %d layers) as %s on %s", cfg.model_dir, arch.family, arch.num_layers, dtype, device
    )
    dummy = cfg.load_format == "dummy"
    weights = (
        dummy_model_weights(cfg.model_dir, dtype, device)
        if dummy
        else load_weights(cfg.model_dir, dtype, progress=cfg.progress)
    )
    rows = cfg.q4_max_rows
    if rows is None:
        rows = Q4_ROWS_AMX if native else Q4_ROWS_TORCH
    small = rows if q4.applies(device, dtype) and not dummy else 0
    blocks = q4.load(cfg.model_dir) if small > 0 else {}
    kernel: q4.Q4Kernel = cpu_kernels.AmxQ4Weight if native else q4.Q4Weight
    try:
        model = LlamaModel(
            arch, weights, device, q4_blocks=blocks, q4_max_rows=small, q4_kernel=kernel, cpu_kernels=native
        )
    except ValueError as exc:
        raise ConfigError(f"{cfg.model_dir}: {exc}") from None
    log.info("loaded %.1f MB of weights", model.weight_bytes() / 1e6)
    if native:
        log.info("Turbine's CPU kernels: fused layer ops and paged decode attention")
    if model.q4_bytes():
        log.info(
            "steps of at most %d rows use the 4-bit weights (%.1f MB more, %s kernel)",
            small,
            model.q4_bytes() / 1e6,
            "Turbine's AMX" if kernel is cpu_kernels.AmxQ4Weight else "torch's int4",
        )
    loaded = LoadedModel(model, arch, sampling_defaults(cfg.model_dir), device, cpu_kernels=native)
    if device.type == "cuda":
        loaded.watch.open()
    return loaded


def dummy_model_weights(model_dir: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """`--load-format dummy`: random weights of the shape `config.json` gives, drawn on the device."""
    from turbine.engines.torch.random_model import dummy_weights

    try:
        config = json.loads((model_dir / "config.json").read_text())
        return dummy_weights(config, dtype, device)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--load-format dummy: {model_dir}/config.json gives no Llama shape: {exc}"
        ) from None


def kv_cache_blocks(cfg: TorchEngineConfig, loaded: LoadedModel) -> int:
    """KV blocks for one engine: the override, else what the memory budget holds."""
    if cfg.num_gpu_blocks is not None:
        return cfg.num_gpu_blocks
    element = loaded.model.dtype.itemsize
    per_block = loaded.arch.kv_bytes_per_token(element) * cfg.block_size
    if loaded.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(loaded.device)
        budget = int(total * cfg.gpu_memory_utilization) - (total - free) - _ACTIVATION_RESERVE_BYTES
    else:
        budget = cfg.kv_cache_memory_bytes or DEFAULT_CPU_KV_BYTES
    blocks = budget // per_block
    if blocks < 1:
        raise ConfigError(
            f"no memory left for the KV cache: one block of {cfg.block_size} tokens takes {per_block} bytes, "
            f"the budget is {max(budget, 0)} bytes"
        )
    return int(blocks)


class TorchEngine(EngineCore):
    """Implements `turbine.engines.base.Engine` with a real model (see the module docstring)."""

    name = "torch"
    # The sampler applies every penalty and bias knob (logits_processors.py).
    capabilities: tuple[str, ...] = SAMPLING_KNOBS

    def __init__(
        self, cfg: TorchEngineConfig, loaded: LoadedModel, worker_id: int, events: EventSink
    ) -> None:
        num_blocks = kv_cache_blocks(cfg, loaded)
        super().__init__(
            worker_id=worker_id,
            events=events,
            block_size=cfg.block_size,
            num_blocks=num_blocks,
            scheduler=SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens),
            enable_prefix_caching=cfg.enable_prefix_caching,
            load_publish_interval_s=cfg.load_publish_interval_s,
        )
        self.loaded = loaded
        model = loaded.model
        # One block more than the scheduler hands out: padding rows of CUDA-graph batches write there.
        kv = model.new_kv_cache(num_blocks + 1, cfg.block_size)
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MB)",
            num_blocks,
            cfg.block_size,
            num_blocks * cfg.block_size * loaded.arch.kv_bytes_per_token(model.dtype.itemsize) / 1e6,
        )
        kernel = loaded.cpu_kernels or _decode_kernel_available(loaded.device)
        tokenizer_json = cfg.model_dir / "tokenizer.json"
        # Guided decoding needs the vocabulary as text; a model directory without tokenizer.json
        # serves without it (its card does not list the capability, so frontends refuse such requests).
        self._guides = None
        if tokenizer_json.is_file():
            threads = cfg.guided_decoding_threads or default_mask_threads()
            self._guides = Guides(tokenizer_json, loaded.arch.vocab_size, threads)
        if self._guides is not None:
            self.capabilities = (*self.capabilities, CAP_GUIDED_DECODING)
            self._guides.pin = loaded.device.type == "cuda"
        graphs = None
        if kernel and loaded.device.type == "cuda" and not cfg.enforce_eager:
            graphs = DecodeGraphs(
                model,
                kv,
                block_size=cfg.block_size,
                scratch_block=num_blocks,
                max_batch=min(cfg.max_num_seqs, 256),
                max_blocks_per_seq=-(-loaded.arch.max_position_embeddings // cfg.block_size),
                watch=loaded.watch,
            )
        self._scratch_block = num_blocks
        self._max_batched_tokens = cfg.max_num_batched_tokens
        prefill_kernel = _prefill_kernel_available(loaded.device, cfg.block_size, loaded.arch.head_dim)
        self._max_num_seqs = cfg.max_num_seqs
        self._executor = TorchExecutor(
            model,
            kv,
            self.blocks,
            loaded.defaults,
            decode_kernel=kernel,
            graphs=graphs,
            step_lock=loaded.gpu_lock if loaded.device.type == "cuda" else None,
            guides=self._guides,
            prefill_kernel=prefill_kernel,
            # On CUDA a step's row count picks library kernels (cuBLAS) and allocator blocks the first
            # time it is seen: pad to the few sizes the warm-up has run.
            pad_steps=prefill_kernel,
        )

    def executor(self) -> Executor:
        return self._executor

    async def _prepare(self) -> None:
        """Compile and capture before serving (`TorchExecutor.warm_up`), so no request pays for it."""
        if self._guides is not None:  # the vocabulary, read into the grammar library
            await asyncio.to_thread(self._guides.load)
        started = time.perf_counter()
        with self.loaded.watch.warming_up():
            # On CUDA a full-budget step too: the caching allocator then holds a full step's
            # activations, so a prompt longer than any before does not wait for cudaMalloc.
            full = self._max_batched_tokens if self.loaded.device.type == "cuda" else 0
            sizes = await self._executor.warm_up(self._scratch_block, full, self._max_num_seqs)
        graphs = f"; CUDA graphs of decode batches {', '.join(map(str, sizes))}" if sizes else ""
        if self._executor.pad_steps and full:
            graphs += f"; prefill steps padded to {len(buckets(full))} sizes up to {buckets(full)[-1]} tokens"
        log.info(
            "warm-up done in %.1f s: %d kernel compiles and graph captures%s",
            time.perf_counter() - started,
            self.loaded.watch.compiles,
            graphs,
        )

    def rejection(self, request: PreprocessedRequest) -> str | None:
        limit = self.loaded.arch.max_position_embeddings
        if len(request.token_ids) >= limit:
            return f"prompt of {len(request.token_ids)} tokens does not fit the model's context of {limit}"
        vocab = self.loaded.arch.vocab_size
        if any(not 0 <= t < vocab for t in request.token_ids):
            return f"prompt has token ids outside the model's vocabulary of {vocab}"
        guided = request.sampling.guided
        if guided is not None:
            if self._guides is None:
                return "this engine has no tokenizer.json, so it cannot constrain its output"
            error = self._guides.error(guided)
            if error is not None:
                return f"{guided.param}: the grammar does not compile: {error}"
        return None

    async def stop(self) -> None:
        await super().stop()
        self._executor.close()


def _prefill_kernel_available(device: torch.device, block_size: int, head_dim: int) -> bool:
    """Prefill chunks through the paged Triton kernel: on CUDA, where Triton runs and the shape fits."""
    if device.type != "cuda":
        return False
    try:
        from turbine.engines.torch import triton_prefill
    except ImportError:
        return False
    return triton_prefill.supported(block_size, head_dim)


def _decode_kernel_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
