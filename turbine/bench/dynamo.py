"""Start and stop NVIDIA Dynamo's frontend and mocker (from a separate venv) for side-by-side benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from turbine.bench.stack import free_port, proc_cpu_seconds, stop_processes
from turbine.models import bundled_model_path


class DynamoStack:
    def __init__(self, python: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="dynamo-bench-")
        root = Path(self._dir.name)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DYN_FILE_KV": str(root / "kv"), "HOME": str(root), "DYN_LOG": "warn"}
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        self._logs = [open(root / n, "wb") for n in ("frontend.log", "mocker.log")]  # noqa: SIM115
        self.frontend = subprocess.Popen(
            [
                python,
                "-m",
                "dynamo.frontend",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(port),
                *common,
                "--router-mode",
                "round-robin",
            ],
            stdout=self._logs[0],
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.mocker = subprocess.Popen(
            [
                python,
                "-m",
                "dynamo.mocker",
                "--model-path",
                str(bundled_model_path()),
                *common,
                "--speedup-ratio",
                "1000000",
            ],
            stdout=self._logs[1],
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.model = self._wait_model()

    def _wait_model(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for proc in (self.frontend, self.mocker):
                if proc.poll() is not None:
                    raise RuntimeError(f"a Dynamo process exited; logs in {self._dir.name}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=1) as resp:
                    data = json.loads(resp.read())["data"]
                    if data:
                        model: str = data[0]["id"]
                        return model
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Dynamo did not come up")

    def frontend_cpu_s(self) -> float:
        return proc_cpu_seconds(self.frontend.pid)

    def close(self) -> None:
        stop_processes([self.frontend, self.mocker])
        for log in self._logs:
            log.close()
        self._dir.cleanup()
