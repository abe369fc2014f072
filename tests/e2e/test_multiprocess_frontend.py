"""`turbine frontend --num-processes 2`: one supervisor, two frontend processes on one port."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import openai
import psutil
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import MODEL, Proc, Stack, free_port, http, shared_prefix_hit_ratio, wait_until

pytestmark = pytest.mark.e2e

MOCKER = ("--engine", "mocker", "--num-workers", "2", "--block-size", "16")


def _children(supervisor: Proc) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(supervisor.pid).children()}
    except psutil.NoSuchProcess:
        return set()


def _served_by(url: str, i: int, tokens: int = 3) -> int:
    """One completion on a fresh connection (the kernel picks a process per connection): the pid
    of the process that served it."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as oai:
        raw = oai.completions.with_raw_response.create(model=MODEL, prompt=f"hello {i}", max_tokens=tokens)
    assert raw.parse().choices[0].text
    return int(raw.headers["x-turbine-frontend-pid"])


def _metric_sum(url: str, name: str) -> float:
    _, _, body = http("GET", url + "/metrics")
    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and s.labels.get("model") == MODEL
    )


ACTIVE = "turbine_router_active_requests"
BINDINGS = "turbine_router_session_bindings"


def _views(url: str, name: str) -> dict[int, float]:
    """`name` as counted by each process that answered one of 8 fresh /metrics requests, by pid (a
    router's metrics come from the answering process's own router)."""
    views: dict[int, float] = {}
    for _ in range(8):
        _, headers, body = http("GET", url + "/metrics")
        pid = int({k.lower(): v for k, v in headers.items()}["x-turbine-frontend-pid"])
        views[pid] = sum(
            s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name == name and s.labels.get("model") == MODEL
        )
    return views


def _wait_load_shared(url: str, children: set[int]) -> None:
    """Until each process's routed requests are counted by its siblings. Replica sync subscribes
    when the model appears and siblings connect to a new one by their next heartbeat; a request
    routed before that is never counted by the sibling. So probe with streams (each served by the
    process the kernel picks) until every process has been heard by all."""
    heard: set[int] = set()

    def probe() -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            served = pool.submit(_served_by, url, -1 - len(heard), 60)
            try:
                wait_until(lambda: _views(url, ACTIVE) == dict.fromkeys(children, 1.0), 2)
                counted = True
            except AssertionError:
                counted = False
            pid = served.result()
        if counted:
            heard.add(pid)
        return heard == children

    wait_until(probe, 60)
    wait_until(lambda: _views(url, ACTIVE) == dict.fromkeys(children, 0.0), 10)


def _all_ready(url: str, instances: int) -> bool:
    """Every process sees the workers: a few fresh connections in a row say so."""
    for _ in range(6):
        status, _, body = http("GET", url + "/health", timeout=2)
        if status != 200 or json.loads(body)["models"].get(MODEL) != instances:
            return False
    return True


def test_two_processes_share_a_port_restart_and_stop(stack: Stack) -> None:
    supervisor, url = stack.frontend("--num-processes", "2")
    port = int(url.rsplit(":", 1)[1])
    stack.worker(*MOCKER, "--speedup-ratio", "1000")
    wait_until(lambda: len(_children(supervisor)) == 2, 20, supervisor)
    first = _children(supervisor)
    wait_until(lambda: all(port in _listening_ports(pid) for pid in first), 20, supervisor)
    wait_until(lambda: _all_ready(url, 2), 30, supervisor)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(lambda i: _served_by(url, i), range(24)))
    assert set(pids) == first  # both processes took requests
    # One /metrics for the whole frontend, whichever process answers the scrape.
    for _ in range(4):
        assert _metric_sum(url, "turbine_requests_total") == 24
        assert _metric_sum(url, "turbine_inflight_requests") == 0

    victim = pids[0]
    psutil.Process(victim).kill()
    wait_until(lambda: len(_children(supervisor) - {victim}) == 2, 20, supervisor)
    (replacement,) = _children(supervisor) - first
    # The port keeps serving (every request succeeds) until the replacement takes requests too.
    served: list[int] = []

    def replacement_serves() -> bool:
        served.append(_served_by(url, len(served)))
        return served[-1] == replacement

    wait_until(replacement_serves, 30, supervisor, interval=0.01)
    assert victim not in served
    # The dead process's counts stay in the totals.
    assert _metric_sum(url, "turbine_requests_total") == 24 + len(served)

    children = _children(supervisor)
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    with pytest.raises(OSError):  # nothing serves the port any more
        http("GET", url + "/live", timeout=1)
    assert "supervising 2 frontend processes" in supervisor.log()


def _long_stream(url: str, i: int) -> str:
    """A stream that stays in flight for a few seconds (the mocker's ~7 ms steps): long enough for
    the checks made while it runs, on a loaded machine too."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as oai:
        chunks = oai.completions.create(
            model=MODEL,
            prompt=f"A long tale number {i}",
            max_tokens=500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)


def test_processes_share_routing_load_and_keep_the_cache_hit_ratio(stack: Stack) -> None:
    supervisor, two = stack.frontend("--num-processes", "2", "--router-mode", "kv")
    single, one = stack.frontend("--router-mode", "kv")
    stack.worker(*MOCKER, "--speedup-ratio", "1")
    port = int(two.rsplit(":", 1)[1])
    wait_until(lambda: len(_children(supervisor)) == 2, 20, supervisor)
    wait_until(lambda: all(port in _listening_ports(pid) for pid in _children(supervisor)), 20, supervisor)
    wait_until(lambda: _all_ready(two, 2) and _all_ready(one, 2), 30, supervisor)
    _wait_load_shared(two, _children(supervisor))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_long_stream, two, i) for i in range(6)]
        # Whichever process answers /metrics counts all six, its siblings' too (local replica sync).
        wait_until(lambda: _metric_sum(two, "turbine_router_active_requests") == 6, 15)
        for _ in range(4):
            assert _metric_sum(two, "turbine_router_active_requests") == 6
        assert all(s.result() for s in streams)
    wait_until(lambda: _metric_sum(two, "turbine_router_active_requests") == 0, 15)

    # The shared-prefix workload over fresh connections spread over both processes hits the
    # workers' caches as well as through one process.
    alone = shared_prefix_hit_ratio([one], "one")
    shared = shared_prefix_hit_ratio([two], "two")
    print(f"hit ratio: one process {alone:.3f}, two processes {shared:.3f}")
    assert alone > 0.6
    assert shared >= alone - 0.05, (alone, shared)
    single.stop()


def test_a_restarted_process_shares_routing_load_again(stack: Stack) -> None:
    """A child killed outright leaves its socket on the local channel behind; its replacement is
    heard by the survivor, and hears it, as the first one was."""
    supervisor, url = stack.frontend("--num-processes", "2", "--router-mode", "kv")
    stack.worker(*MOCKER, "--speedup-ratio", "1")
    port = int(url.rsplit(":", 1)[1])
    wait_until(lambda: len(_children(supervisor)) == 2, 20, supervisor)
    victim = min(_children(supervisor))
    psutil.Process(victim).kill()
    wait_until(lambda: len(_children(supervisor) - {victim}) == 2, 20, supervisor)
    wait_until(lambda: all(port in _listening_ports(pid) for pid in _children(supervisor)), 20, supervisor)
    wait_until(lambda: _all_ready(url, 2), 30, supervisor)
    _wait_load_shared(url, _children(supervisor))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_long_stream, url, i) for i in range(6)]
        wait_until(lambda: _metric_sum(url, "turbine_router_active_requests") == 6, 15)
        for _ in range(6):  # fresh connections: both processes answer some of these
            assert _metric_sum(url, "turbine_router_active_requests") == 6
        assert all(s.result() for s in streams)
    wait_until(lambda: _metric_sum(url, "turbine_router_active_requests") == 0, 15)


def test_refuses_a_port_held_by_another_process(stack: Stack) -> None:
    _, url = stack.frontend()  # a single-process frontend: no SO_REUSEPORT, nobody may share
    port = url.rsplit(":", 1)[1]
    proc = stack._start(
        "frontend",
        [
            sys.executable,
            "-m",
            "turbine.frontend",
            "--http-port",
            port,
            "--num-processes",
            "2",
            *stack.common(),
        ],
    )
    assert proc.wait(20) == 1
    assert f"port {port} on 127.0.0.1 is not available" in proc.log()


def _listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN
    }


def test_turbine_up_with_two_processes_serves_http_and_grpc(tmp_path: Path) -> None:
    port, grpc_port = free_port(), free_port()
    argv = [
        sys.executable, "-m", "turbine", "up", "--engine", "mocker", "--speedup-ratio", "1000",
        "--num-processes", "2", "--kserve-grpc-server", "--grpc-port", str(grpc_port),
        "--http-port", str(port), "--file-store-path", str(tmp_path / "store"), "--namespace", "up-multi",
    ]  # fmt: skip
    proc = Proc("up", argv, tmp_path / "up.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _all_ready(url, 2), 40, proc)
        frontends = [
            c for c in psutil.Process(proc.pid).children() if "turbine.frontend" in " ".join(c.cmdline())
        ]
        assert len(frontends) == 2
        # Each process listens on both ports itself (SO_REUSEPORT).
        wait_until(lambda: all({port, grpc_port} <= _listening_ports(c.pid) for c in frontends), 20, proc)
        wait_until(lambda: _all_ready(url, 2), 20, proc)

        for i in range(4):
            _served_by(url, i)
        for i in range(4):  # a fresh channel (connection) each time
            client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
            try:
                tensor = triton.InferInput("text_input", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([f"hello {i}".encode()], dtype=np.object_))
                result = client.infer(MODEL, [tensor])
                assert result.as_numpy("text_output") is not None
            finally:
                client.close()
        # Both edges of both processes add up in one scrape.
        assert _metric_sum(url, "turbine_requests_total") == 8

        proc.signal(signal.SIGINT)
        assert proc.wait(40) == 0, proc.log()
        assert not [c.pid for c in frontends if psutil.pid_exists(c.pid)]
    finally:
        proc.stop()


def _session_request(url: str, session: str) -> tuple[str, int]:
    """One chat request of `session` on a fresh connection: (its worker, the serving process)."""
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30) as oai:
        raw = oai.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_headers={"x-session-id": session},
        )
    assert raw.parse().choices[0].finish_reason is not None
    return str(raw.headers["x-turbine-worker"]), int(raw.headers["x-turbine-frontend-pid"])


def test_session_bindings_hold_across_processes(stack: Stack) -> None:
    supervisor, url = stack.frontend("--num-processes", "2", "--router-session-affinity-ttl-secs", "30")
    stack.worker("--engine", "mocker", "--num-workers", "4", "--block-size", "16", "--speedup-ratio", "1000")
    port = int(url.rsplit(":", 1)[1])
    wait_until(lambda: len(_children(supervisor)) == 2, 20, supervisor)
    wait_until(lambda: all(port in _listening_ports(pid) for pid in _children(supervisor)), 20, supervisor)
    wait_until(lambda: _all_ready(url, 4), 30, supervisor)
    children = _children(supervisor)
    # Replica sync subscribes when the model appears, and a binding made before that never reaches
    # the sibling: bind probe sessions until each process's binding has reached the other.
    heard: set[int] = set()
    probes = itertools.count()

    def probe() -> bool:
        before = _views(url, BINDINGS)
        if set(before) != children:
            return False
        _, pid = _session_request(url, f"probe-{next(probes)}")
        try:
            wait_until(lambda: _views(url, BINDINGS) == {p: n + 1 for p, n in before.items()}, 2)
            heard.add(pid)
        except AssertionError:
            pass
        return heard == children

    wait_until(probe, 60)
    base: dict[int, float] = {}

    def sampled() -> bool:
        base.update(_views(url, BINDINGS))
        return set(base) == children

    wait_until(sampled, 10)

    sessions = [f"s{i}" for i in range(8)]
    bound = {s: _session_request(url, s)[0] for s in sessions}
    assert len(set(bound.values())) == 4  # round-robin spread the first requests
    # Both processes know every binding, whichever made it.
    wait_until(lambda: _views(url, BINDINGS) == {p: n + 8 for p, n in base.items()}, 5)
    pids = set()
    for _ in range(3):
        for s in sessions:
            worker, pid = _session_request(url, s)
            assert worker == bound[s], s
            pids.add(pid)
    assert pids == _children(supervisor)


def test_children_stop_when_the_supervisor_is_killed(stack: Stack) -> None:
    supervisor, url = stack.frontend("--num-processes", "2", "--drain-timeout-s", "2")
    port = int(url.rsplit(":", 1)[1])
    wait_until(lambda: len(_children(supervisor)) == 2, 20, supervisor)
    wait_until(lambda: all(port in _listening_ports(pid) for pid in _children(supervisor)), 20, supervisor)
    children = [psutil.Process(pid) for pid in _children(supervisor)]
    supervisor.popen.kill()
    supervisor.wait(10)
    # Their stdin (the supervisor's pipe) reaches EOF: each drains and exits.
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive
    with pytest.raises(OSError):
        http("GET", url + "/live", timeout=1)


def test_a_config_error_in_the_children_stops_the_supervisor(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    supervisor, _ = stack.frontend(
        "--num-processes", "2", "--tls-cert-path", str(tmp_path / "cert.pem"),
        "--tls-key-path", str(tmp_path / "key.pem"), wait=False,
    )  # fmt: skip
    assert supervisor.wait(30) == 2
    log = supervisor.log()
    assert "found a config error; stopping" in log
    assert "restarting" not in log
