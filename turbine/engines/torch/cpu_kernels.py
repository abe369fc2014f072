"""Turbine's own CPU kernels (`csrc/`), compiled on first use and cached.

torch ships no CPU kernel for what bounds a small model's decode step on CPU, so the project writes
its own (what they gain: `benchmarks/results/engine_cpu.md`):

- `csrc/cpu_q4.cpp`: a GGUF's 4-bit weights multiplied on the CPU's matrix unit (AMX), exactly.
  torch's int4 kernel is bound by dequantizing to floating point as rows grow; this one costs the
  same at 4 or 16 rows (`benchmarks/results/cpu_kernels.md`). At 1-3 rows
  torch's kernel is as fast or faster, so `AmxQ4Weight` keeps both and picks by the rows.
- `csrc/cpu_ops.cpp`: the element-wise work of a layer fused (RMSNorm with the residual add, RoPE
  with the K/V cache write, SiLU·up), as `triton_ops` does on CUDA.
- `csrc/cpu_attention.cpp`: paged decode attention straight from the cache's blocks, as
  `triton_decode` does on CUDA.

The sources are compiled with torch's extension builder (a C++ compiler, and `ninja`, which the torch
extra installs) into `~/.cache/turbine/kernels/<hash>` once per machine, source and torch version
(`TURBINE_KERNEL_CACHE` moves it); later starts load the cached library. `--cpu-kernels auto` falls
back to torch's ops, with one warning, where that cannot happen (no compiler, a CPU without AMX and
AVX-512 BF16, or a kernel that refuses the tile state); `turbine` makes that an error; `torch` never
tries. They serve bfloat16 on CPU (`engine.load_model`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from turbine.choices import CPU_KERNELS
from turbine.engines.torch.q4 import Blocks, Q4Weight

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).parent / "csrc" / f for f in ("cpu_q4.cpp", "cpu_ops.cpp", "cpu_attention.cpp")
)
HEADERS = (Path(__file__).parent / "csrc" / "cpu_vec.h",)
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512bw", "avx512vl", "f16c", "fma")
CFLAGS = (
    "-O3", "-fopenmp", "-mamx-tile", "-mamx-bf16", "-mavx512bf16",
    "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-mfma",
)  # fmt: skip
SMALL_ROWS = 3
"""Inputs of at most this many rows go through torch's int4 kernel: there it is as fast or faster
(`benchmarks/results/cpu_kernels.md`)."""


class KernelsUnavailable(RuntimeError):
    """The kernels cannot run here; the message says why, in one line."""


def missing_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The instruction sets the kernels need that this CPU lacks (all of them where unknown)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return list(CPU_FLAGS)
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    return [f for f in CPU_FLAGS if f not in flags]


def cache_dir() -> Path:
    """Where the compiled library goes: keyed by the sources, flags and torch version."""
    digest = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode())
    for src in (*SOURCES, *HEADERS):
        digest.update(src.read_bytes())
    root = Path(os.environ.get("TURBINE_KERNEL_CACHE", Path.home() / ".cache" / "turbine" / "kernels"))
    return root / digest.hexdigest()[:16]


STALE_LOCK_S = 300.0
"""A build lock older than this is a dead builder's (a build takes ~20 s)."""


def clear_stale_lock(build: Path, now: float | None = None) -> bool:
    """Remove the build directory's lock if a builder left it and died (killed mid-compile): torch's
    builder waits for that file to go away, without a timeout, so every later start would hang."""
    lock = build / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("removing a stale build lock (%.0f s old) in %s", age, build)
    lock.unlink(missing_ok=True)
    return True


def staged_sources(build: Path) -> list[Path]:
    """The sources, copied into the build directory (once: its name is their hash), to compile from
    there: torch's builder writes their paths into its build file and rebuilds when those change, so
    compiling from the package would rebuild for every checkout or environment of the same sources."""
    staged = build / "src"
    staged.mkdir(exist_ok=True)
    for src in (*SOURCES, *HEADERS):
        dest = staged / src.name
        data = src.read_bytes()
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = staged / f".{src.name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, dest)  # whole, even with several processes staging at once
    return [staged / src.name for src in SOURCES]


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel's binary is there only when the
    environment's bin directory is, which a plain `.venv/bin/python` run does not arrange."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


# A shared library loads once per process, whoever asks: the cache mirrors that process-wide fact.
@functools.cache
def load() -> None:
    """Compile (first time on this machine) and load the kernels; `KernelsUnavailable` if they can't."""
    missing = missing_cpu_flags()
    if missing:
        raise KernelsUnavailable(f"this CPU lacks {', '.join(missing)}")
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    build = cache_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)  # an unwritable cache is a reason like any other
        clear_stale_lock(build)
        if not (build / "turbine_cpu_kernels.so").is_file():
            log.info("compiling Turbine's CPU kernels into %s (once, about 20 s)", build)
        cpp_extension.load(
            name="turbine_cpu_kernels",
            sources=[str(s) for s in staged_sources(build)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # whatever the builder raises (no compiler, no ninja, a compile error)
        text = str(exc).strip()
        raise KernelsUnavailable(
            f"compiling them failed: {text.splitlines()[0] if text else type(exc).__name__}"
        ) from exc
    if not torch.ops.turbine_cpu.amx_ready():
        raise KernelsUnavailable("the kernel refused this process the AMX tile state")


def resolve(choice: str) -> bool:
    """Whether to use the kernels for `--cpu-kernels choice`: raises `KernelsUnavailable` for
    `turbine` where they cannot run; warns and says no for `auto`."""
    if choice not in CPU_KERNELS:
        raise ValueError(f"--cpu-kernels {choice!r}: one of {', '.join(CPU_KERNELS)}")
    if choice == "torch":
        return False
    try:
        load()
    except KernelsUnavailable as exc:
        if choice == "turbine":
            raise
        log.warning("Turbine's CPU kernels are off (%s): torch's ops instead", exc)
        return False
    return True


class AmxQ4Weight:
    """A 4-bit weight for `csrc/cpu_q4.cpp` (inputs of more than `SMALL_ROWS` rows) and torch's int4
    kernel (the rest); `w(x)` is `x @ W.T` for 2-D bfloat16 `x`. Same interface as `q4.Q4Weight`.
    Needs `load()` to have succeeded."""

    __slots__ = ("nbytes", "packed", "rows", "small")

    def __init__(self, blocks: Blocks, dtype: torch.dtype) -> None:
        nibbles, scale, zero = blocks
        self.rows = nibbles.shape[0]
        if self.rows % 16:
            raise RuntimeError(f"{self.rows} output rows: the AMX kernel takes multiples of 16")
        # q4.Blocks hold w = (q − 8)·scale + zero; the kernel wants w = q·d + m (the GGUF's Q4_1 form).
        self.packed: torch.Tensor = torch.ops.turbine_cpu.q4_pack(nibbles, scale, zero - 8 * scale)
        self.small = Q4Weight(blocks, dtype)
        self.nbytes = self.packed.nbytes + self.small.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= SMALL_ROWS:
            return self.small(x)
        out: torch.Tensor = torch.ops.turbine_cpu.q4_linear(x, self.packed, self.rows)
        return out


# The fused layer kernels (`csrc/cpu_ops.cpp`) and the paged decode attention
# (`csrc/cpu_attention.cpp`), with the signatures of `triton_ops` and `triton_decode`.


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of each row of `x` ([rows, n], contiguous); with `residual`, `x += residual` first,
    in place (the residual stream), and the norm is of that sum."""
    out: torch.Tensor = torch.ops.turbine_cpu.rms_norm(x, weight, eps, residual)
    return out


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """q with RoPE applied ([T, heads, head_dim]); K (with RoPE) and V written at `slots` of the cache."""
    out: torch.Tensor = torch.ops.turbine_cpu.rope_and_cache(
        qkv, positions, inv_freq, k_cache, v_cache, slots, heads, kv_heads, head_dim
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up for `gate_up` = [gate | up] along the last dim ([T, 2n] → [T, n])."""
    out: torch.Tensor = torch.ops.turbine_cpu.silu_mul(gate_up)
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence ([S, heads, head_dim]) over its paged context, read in
    place from `k_cache`/`v_cache` [num_blocks, block_size, kv_heads, head_dim]."""
    out: torch.Tensor = torch.ops.turbine_cpu.paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, scale
    )
    return out
