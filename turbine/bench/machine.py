"""What a CPU benchmark ran on, named the way the README's CPU table names it."""

from __future__ import annotations

from pathlib import Path


def cpu_class(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and class: AMX, AVX-512 BF16 (no AMX), AVX2 only, or other.

    The class decides the torch engine's CPU paths (bfloat16 by default, the 4-bit kernels), so a
    CPU figure holds only on CPUs of the class it names."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown CPU"
    model, flags = "unknown CPU", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    if {"amx_tile", "amx_bf16"} <= flags:
        kind = "AMX"
    elif "avx512_bf16" in flags:
        kind = "AVX-512 BF16, no AMX"
    elif "avx2" in flags:
        kind = "AVX2 only"
    else:
        kind = "no AVX2"
    return f"{model} ({kind})"
