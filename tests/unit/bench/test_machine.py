"""The CPU class a benchmark's figures are reported under, from /proc/cpuinfo's text."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbine.bench.machine import cpu_class

pytestmark = pytest.mark.unit


def _cpuinfo(tmp_path: Path, model: str, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    cpu = f"processor\t: {{n}}\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n\n"
    path.write_text(cpu.format(n=0) + cpu.format(n=1))
    return path


@pytest.mark.parametrize(
    ("model", "flags", "expected"),
    [
        ("Intel(R) Xeon(R) Platinum 8480+", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "(AMX)"),
        ("AMD EPYC 9654 96-Core Processor", "avx2 avx512f avx512_bf16", "(AVX-512 BF16, no AMX)"),
        ("AMD EPYC 7763 64-Core Processor", "avx avx2 fma", "(AVX2 only)"),
        ("Intel(R) Xeon(R) Platinum 8175M", "avx2 avx512f avx512bw", "(AVX2 only)"),
        ("QEMU Virtual CPU", "sse4_2", "(no AVX2)"),
    ],
)
def test_names_the_model_and_its_class(tmp_path: Path, model: str, flags: str, expected: str) -> None:
    assert cpu_class(_cpuinfo(tmp_path, model, flags)) == f"{model} {expected}"


def test_unreadable_cpuinfo_is_an_unknown_cpu(tmp_path: Path) -> None:
    assert cpu_class(tmp_path / "missing") == "unknown CPU"
