"""`turbine bench`'s dispatch: the listing, unknown names, and a missing optional dependency."""

from __future__ import annotations

import sys

import pytest

from turbine.bench.cli import BENCHMARKS, main

pytestmark = pytest.mark.unit


def test_no_name_lists_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in BENCHMARKS)


def test_unknown_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fastest"]) == 2
    assert "unknown benchmark 'fastest'" in capsys.readouterr().err


def test_missing_bench_extra_names_the_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "turbine.bench.scale", raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail as if not installed
    assert main(["scale", "--help"]) == 2
    err = capsys.readouterr().err
    assert "tqdm is not installed" in err and "turbine[bench]" in err
