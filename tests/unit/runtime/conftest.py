"""Runtime fixtures: `store` runs a test against every Store implementation (memory, file, and a
real etcd from the root conftest's `etcd_server`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer
from turbine.runtime.discovery.base import Store
from turbine.runtime.discovery.etcd import EtcdStore
from turbine.runtime.discovery.file import FileStore
from turbine.runtime.discovery.memory import MemoryStore


@pytest.fixture(params=["memory", "file", pytest.param("etcd", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    impl: Store
    if request.param == "memory":
        impl = MemoryStore()
    elif request.param == "file":
        impl = FileStore(tmp_path / "store", 0.02)
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        impl = EtcdStore(server.endpoint)
    try:
        yield impl
    finally:
        await impl.close()
