"""Start and stop a local Turbine stack (frontend + worker processes) for benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def proc_io_counts(pid: int) -> tuple[int, int]:
    """A process's read + write system calls (`/proc/PID/io`) and its threads' voluntary context
    switches, i.e. how often it slept waiting for something (Linux)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just exited
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
    return int(io["syscr"]) + int(io["syscw"]), switches


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc (Linux)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    """SIGTERM every process still running (graceful shutdown), then kill whichever has not exited
    within `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalStack:
    """A frontend and worker processes (each with its own `--num-workers`) over a private file store.

    `extra_frontends` more frontend processes, each on its own port (`urls`), follow the same workers:
    independent frontends that share nothing but the workers, a baseline for `--num-processes`."""

    def __init__(
        self,
        frontend_args: list[str],
        worker_args: list[str],
        *,
        expect_instances: int = 1,
        worker_processes: int = 1,
        worker_extra: list[list[str]] | None = None,
        frontend_prefix: Sequence[str] = (),
        worker_prefix: Sequence[str] = (),
        extra_frontends: int = 0,
        keep_logs: Path | None = None,
    ) -> None:
        """`frontend_prefix`/`worker_prefix` go before the commands (e.g. `taskset -c 0-7`).
        `keep_logs`: where the processes' logs are copied once they have stopped (their last lines
        are what they log on the way out)."""
        self._keep_logs = keep_logs
        self._dir = tempfile.TemporaryDirectory(prefix="turbine-bench-")
        self.root = Path(self._dir.name)
        ports = [free_port() for _ in range(1 + extra_frontends)]
        self.port = ports[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]
        common = ["--discovery-backend", "file", "--file-store-path", str(self.root / "store")]
        common += ["--namespace", "bench", "--log-level", "warning"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        names = ["frontend.log", *(f"worker-{i}.log" for i in range(worker_processes))]
        names += [f"frontend-{i}.log" for i in range(1, 1 + extra_frontends)]
        self._logs = [open(self.root / name, "wb") for name in names]  # noqa: SIM115
        frontend = [*frontend_prefix, sys.executable, "-m", "turbine.frontend", "--http-port"]
        frontends = [
            subprocess.Popen(
                [*frontend, str(port), *common, *frontend_args],
                stdout=self._logs[0 if i == 0 else worker_processes + i],
                stderr=subprocess.STDOUT,
                env=env,
            )
            for i, port in enumerate(ports)
        ]
        self.frontend = frontends[0]
        self.extra_frontends = frontends[1:]
        self.workers = [
            subprocess.Popen(
                [
                    *worker_prefix,
                    sys.executable,
                    "-m",
                    "turbine.worker",
                    *common,
                    *worker_args,
                    *(worker_extra[i] if worker_extra else []),
                ],
                stdout=self._logs[1 + i],
                stderr=subprocess.STDOUT,
                env=env,
            )
            for i in range(worker_processes)
        ]
        self._expect = expect_instances

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [self.frontend, *self.extra_frontends, *self.workers]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a stack process exited with {proc.returncode}")
            if all(self._ready(url) for url in self.urls):
                return
            time.sleep(0.1)
        raise TimeoutError("stack did not become ready")

    def _ready(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                models = json.loads(resp.read())["models"]
                return bool(sum(models.values()) >= self._expect)
        except OSError:
            return False

    def _frontend_sum(self, read: Callable[[int], tuple[float, float]]) -> tuple[float, float]:
        """`read(pid)` summed over the frontend processes and their live children (--num-processes)."""
        first = second = 0.0
        pids = [p.pid for p in (self.frontend, *self.extra_frontends)]
        for pid in [*pids, *(c for p in pids for c in child_pids(p))]:
            with contextlib.suppress(OSError):  # a child that just exited
                a, b = read(pid)
                first += a
                second += b
        return first, second

    def frontend_cpu_s(self) -> float:
        """CPU of the frontend process and its live children (--num-processes)."""
        return sum(self._frontend_sum(proc_cpu_split))

    def frontend_cpu_split(self) -> tuple[float, float]:
        """User and system (kernel) CPU seconds of the frontend process and its live children."""
        return self._frontend_sum(proc_cpu_split)

    def frontend_io_counts(self) -> tuple[int, int]:
        """`proc_io_counts` of the frontend process and its live children, summed."""
        calls, switches = self._frontend_sum(proc_io_counts)
        return int(calls), int(switches)

    def close(self) -> None:
        stop_processes(self.processes)
        for log in self._logs:
            log.close()
        if self._keep_logs is not None:
            self._keep_logs.mkdir(parents=True, exist_ok=True)
            for log_file in self.root.glob("*.log"):
                shutil.copyfile(log_file, self._keep_logs / log_file.name)
        self._dir.cleanup()

    def __enter__(self) -> LocalStack:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
