"""A frontend frozen with SIGSTOP on the HTTP and NATS request planes: the worker stops the
requests it was serving for it after `--request-stall-timeout-s`, frees their KV blocks, and serves
another frontend meanwhile (the TCP plane's case is in test_stalled_workers.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading

import msgspec
import pytest

from tests.e2e.conftest import Stack, wait_instances
from tests.e2e.test_stalled_workers import (
    LONG_TTL,
    STALL,
    WORKER,
    _client,
    _stream,
    follow_load,
    freeze_a_busy_frontend,
)
from tests.nats_server import NatsServer
from turbine.protocol.instance import Instance, instances_prefix
from turbine.protocol.kv_events import LoadMetrics
from turbine.runtime.discovery.file import FileStore
from turbine.runtime.transport.base import RequestPlaneClient
from turbine.runtime.transport.http import HttpRequestClient
from turbine.runtime.transport.nats import NatsRequestClient

pytestmark = pytest.mark.e2e


async def _address(stack: Stack) -> str:
    store = FileStore(stack.store)
    try:
        (kv,) = await store.get_prefix(instances_prefix("test"))
        return msgspec.msgpack.decode(kv.value, type=Instance).address
    finally:
        await store.close()


@pytest.mark.parametrize("plane", ["http", "nats"])
def test_a_frozen_frontends_requests_are_stopped_and_their_blocks_freed(
    stack: Stack, nats_server: NatsServer, plane: str
) -> None:
    args = ("--request-plane", plane, "--nats-server", nats_server.url, *STALL)
    front, url = stack.frontend(*args)
    _, other_url = stack.frontend(*args)
    worker = stack.worker(*WORKER, *args, ttl=LONG_TTL)
    wait_instances(url, 1)
    wait_instances(other_url, 1)
    address = asyncio.run(_address(stack))
    seen: list[LoadMetrics] = []
    stop = threading.Event()

    def client_of() -> RequestPlaneClient:
        return HttpRequestClient() if plane == "http" else NatsRequestClient(nats_server.url)

    follower = threading.Thread(target=follow_load, args=(address, seen, stop, client_of))
    follower.start()
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        freeze_a_busy_frontend(front, url, other_url, worker, seen, pool)
        # The other frontend is still served after the stop.
        assert _stream(_client(other_url), 10, 8).finish == "length"
    finally:
        front.signal(signal.SIGCONT)
        stop.set()
        follower.join(10)
        pool.shutdown(wait=True, cancel_futures=True)
