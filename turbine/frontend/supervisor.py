"""`--num-processes N`: one supervisor and N frontend processes on the same ports.

The supervisor serves nothing itself. It makes a private temp directory, with the local channel's
socket folder in it (events/local_channel.py), and starts N children, `python -m turbine.frontend`, with the
same config passed as TURBINE_* variables (the environment keeps secrets off `ps`) plus
`--num-processes 1` and TURBINE_FRONTEND_PROCESS_DIR=DIR. Each child is a full frontend: it follows discovery
and the workers' KV events itself, binds the HTTP (and gRPC) port with SO_REUSEPORT, so the kernel
spreads connections over the N listening sockets, and shares its routing load and session
bindings with its siblings by replica sync over the local channel. Every child records its metrics
into prometheus_client multiprocess files under DIR/metrics (PROMETHEUS_MULTIPROC_DIR), so /metrics
of any child shows the whole frontend. Responses carry `x-turbine-frontend-pid`.

A child that dies is restarted after a backoff (0.5 s doubling up to 30 s; back to 0.5 s once a
child has lived a minute); its gauges leave the totals (`mark_process_dead`), its counters stay.
A child exiting 2 (a config error, the same for every child) stops the group with status 2.
SIGTERM/SIGINT: forward SIGTERM to every child, wait while they drain (their --drain-timeout-s plus
a margin, then SIGKILL), remove DIR, exit 0. Each child's stdin is a pipe whose write end only
the supervisor holds: EOF there means the supervisor is gone (even killed outright, even before the
child started watching), and the child drains and exits as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from prometheus_client import multiprocess

from turbine.config import FrontendConfig, config_to_env
from turbine.errors import ConfigError
from turbine.runtime.events.local_channel import forget_process, prepare_channel
from turbine.runtime.lifecycle import stop_on_signals

log = logging.getLogger("turbine.frontend.supervisor")

PID_HEADER = "x-turbine-frontend-pid"
METRICS_SUBDIR = "metrics"
"""The prometheus_client multiprocess directory, beside the local channel's in the private one."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that lived this long resets the backoff
EXIT_MARGIN_S = 10.0  # past a child's drain timeout before it is killed


# ----------------------------------------------------------------------------------- in a child


def add_pid_header(app: web.Application) -> None:
    """Tag every response of this child with its pid (which process served a request)."""
    pid = str(os.getpid())

    async def tag(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[PID_HEADER] = pid

    app.on_response_prepare.append(tag)


def stop_with_supervisor(stop: asyncio.Event) -> None:
    """Set `stop` when stdin (the supervisor's pipe) reaches EOF, so that no orphan keeps the port."""
    loop = asyncio.get_running_loop()
    fd = 0
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not stop.is_set():
                log.warning("the supervisor is gone; stopping")
                stop.set()

    loop.add_reader(fd, readable)


# ------------------------------------------------------------------------------- the supervisor


def run_supervisor(cfg: FrontendConfig, prog: str) -> int:
    """`turbine frontend --num-processes N` (N > 1): the exit status."""
    return exit_status(supervise(cfg), prog)


def exit_status(main: Coroutine[Any, Any, int | None], prog: str) -> int:
    """Run a frontend process's `main` on uvloop; the exit status: what it returns (0 for None),
    2 for a configuration error (printed like a usage error), 1 when it cannot serve."""
    try:
        return uvloop.run(main) or 0
    except ConfigError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1


def _probe_ports(cfg: FrontendConfig) -> None:
    """Fail at once (OSError) when a port is held by a process that does not share it, instead of
    restarting children that cannot bind forever."""
    ports = [cfg.http_port]
    if cfg.kserve_grpc_server:
        ports.append(cfg.grpc_port)
    if cfg.grpc_metrics_port is not None:
        ports.append(cfg.grpc_metrics_port)
    for port in ports:
        family, kind, proto, _, address = socket.getaddrinfo(cfg.http_host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(f"port {port} on {cfg.http_host} is not available: {exc.strerror}") from exc


async def supervise(
    cfg: FrontendConfig,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Run `cfg.process_count` children until `stop` is set or SIGTERM/SIGINT arrives; then stop
    them gracefully and return the exit status (0, or 2 when the children found a config error)."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    _probe_ports(cfg)
    directory = Path(tempfile.mkdtemp(prefix="turbine-fe-"))
    try:
        (directory / METRICS_SUBDIR).mkdir()
        prepare_channel(directory)
        group = _Group(cfg, directory, stop)
        return await group.run(on_ready)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _Group:
    """The children of one supervisor run, one slot each, kept alive until `stop`."""

    def __init__(self, cfg: FrontendConfig, directory: Path, stop: asyncio.Event) -> None:
        self._cfg = cfg
        self._stop = stop
        self._directory = directory
        self._metrics_dir = str(directory / METRICS_SUBDIR)
        child = dataclasses.replace(
            cfg, num_processes="1", frontend_process_dir=str(directory), dump_config_to=None
        )
        env = dict(os.environ)
        for key, value in config_to_env(child).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        self._env = env
        self.exit_code = 0

    async def run(self, on_ready: Callable[[str], None] | None) -> int:
        count = self._cfg.process_count
        async with asyncio.TaskGroup() as tg:
            for slot in range(count):
                tg.create_task(self._keep(slot), name=f"frontend-process-{slot}")
            scheme = "https" if self._cfg.tls_cert_path else "http"
            url = f"{scheme}://{self._cfg.http_host}:{self._cfg.http_port}"
            log.info("supervising %d frontend processes on %s", count, url)
            if on_ready is not None:
                on_ready(url)
        log.info("every frontend process stopped")
        return self.exit_code

    async def _spawn(self) -> asyncio.subprocess.Process:
        # stdin: a pipe only we hold open (see stop_with_supervisor).
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turbine.frontend", env=self._env, stdin=asyncio.subprocess.PIPE
        )

    async def _keep(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stop.is_set():
            proc = await self._spawn()
            started = loop.time()
            exited = loop.create_task(proc.wait())
            stopping = loop.create_task(self._stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                await self._terminate(proc, exited)
                _close_stdin(proc)
                multiprocess.mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                return
            code = exited.result()
            _close_stdin(proc)
            multiprocess.mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            # A child that died without closing its plane left its socket: siblings would keep
            # trying to connect to it.
            forget_process(self._directory, proc.pid)
            if self._stop.is_set():
                return
            if code == 2:
                log.error("frontend process %d found a config error; stopping", proc.pid)
                self.exit_code = 2
                self._stop.set()
                return
            if loop.time() - started >= HEALTHY_AFTER_S:
                failures = 0
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**failures)
            failures += 1
            log.warning(
                "frontend process %d (slot %d) exited with status %d; restarting in %.1f s",
                proc.pid,
                slot,
                code,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), self._cfg.drain_timeout_s + EXIT_MARGIN_S)
        except TimeoutError:
            log.warning("frontend process %d did not stop in time; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await exited
        if code != 0:
            log.warning("frontend process %d exited with status %d while stopping", proc.pid, code)


def _close_stdin(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
