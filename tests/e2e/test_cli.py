"""The command-line entry points as users run them: `turbine up`, flag validation, config dumps."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL, Proc, free_port, http, live_instances, wait_instances, wait_until

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(300)
def test_turbine_up_serves_smollm2_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, gguf_cache: Path, smollm2_dir: Path
) -> None:
    """The README's first command: a real model answers the README's question (the session's
    conversion of the GGUF, `smollm2_dir`, is in `gguf_cache` already)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "turbine",
        "up",
        "--http-port",
        str(port),
        "--file-store-path",
        str(tmp_path / "store"),
        "--namespace",
        "up-test",
        "--gguf-cache-dir",
        str(gguf_cache),
    ]
    proc = Proc("up", argv, tmp_path / "up.log", env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: "Press Ctrl-C" in proc.log(), 180, proc)
        assert live_instances(url, "SmolLM2-135M-Instruct") == 1
        assert "curl" in proc.log() and url in proc.log() and "capital of France" in proc.log()
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = oai.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=40,
        )
        assert "Paris" in (out.choices[0].message.content or ""), out
        proc.signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.log()
    finally:
        proc.stop()


def test_turbine_up_with_mocker_workers(tmp_path: Path) -> None:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "turbine",
        "up",
        "--engine",
        "mocker",
        "--http-port",
        str(port),
        "--file-store-path",
        str(tmp_path / "store"),
        "--namespace",
        "up-test",
        "--speedup-ratio",
        "100",
    ]
    proc = Proc("up", argv, tmp_path / "up.log", env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_instances(url, 2, timeout=30)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=5
        )
        assert out.choices[0].finish_reason == "length"
        proc.signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.log()
    finally:
        proc.stop()


def test_turbine_up_in_memory_discovery(tmp_path: Path) -> None:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "turbine",
        "up",
        "--http-port",
        str(port),
        "--discovery-backend",
        "mem",
        "--engine",
        "mocker",
        "--workers",
        "1",
        "--speedup-ratio",
        "100",
    ]
    proc = Proc("up-mem", argv, tmp_path / "up.log", env={**__import__("os").environ})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_instances(url, 1, timeout=30)
        status, _, body = http(
            "POST",
            url + "/v1/completions",
            json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 3}).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.log()
    finally:
        proc.stop()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turbine", *args], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frontend", "--model-path", "/does/not/exist"], "is not a directory"),
        (["frontend", "--router-mode", "fastest"], "is not one of"),
        (["frontend", "--http-port", "70000"], "out of range"),
        (["frontend", "--http-port", "eighty"], "not a valid int"),
        (["worker", "--speedup-ratio", "0"], "must be positive"),
        (["worker", "--lease-ttl-s", "0"], "must be positive"),
        (["up", "--workers", "0"], "at least 1"),
    ],
)
def test_invalid_flags_fail_fast_with_one_clear_line(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_env_vars_configure_and_flags_win(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "TURBINE_ROUTER_MODE": "fastest"}
    result = _run("frontend", env=env)
    assert result.returncode == 2 and "TURBINE_ROUTER_MODE" in result.stderr


def test_dump_config_writes_resolved_json(tmp_path: Path) -> None:
    import os

    port = free_port()
    dump = tmp_path / "config.json"
    env = {**os.environ, "TURBINE_ROUTER_MODE": "random", "TURBINE_HTTP_PORT": "1"}
    argv = [
        sys.executable,
        "-m",
        "turbine",
        "frontend",
        "--http-port",
        str(port),
        "--dump-config-to",
        str(dump),
        "--file-store-path",
        str(tmp_path / "store"),
    ]
    proc = Proc("frontend", argv, tmp_path / "frontend.log", env=env)
    try:
        wait_until(lambda: dump.exists() and dump.stat().st_size > 0, 20, proc)
        config = json.loads(dump.read_text())
        assert config["router_mode"] == "random"
        assert config["http_port"] == port  # the flag wins over TURBINE_HTTP_PORT
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/live", timeout=1)[0] == 200, 20, proc)
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.stop()


def test_help_lists_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("up", "frontend", "worker", "bench"):
        assert command in result.stdout
