"""A model whose files cannot be loaded is retried with backoff, not refused for the process's life."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
from pathlib import Path

import pytest

from turbine.engines.echo import EchoEngine
from turbine.frontend import models
from turbine.frontend.models import ModelRegistry
from turbine.frontend.pipeline import PipelineSettings
from turbine.models import bundled_model_path
from turbine.router.simple import RoundRobinRouter
from turbine.runtime.discovery.memory import MemoryStore
from turbine.runtime.transport.inproc import InprocClient, InprocHub, InprocServer
from turbine.worker.sdk import EngineWorker, WorkerIdentity

pytestmark = pytest.mark.unit


async def test_a_model_whose_files_appear_later_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(models, "RETRY_FIRST_S", 0.05)
    model_dir = tmp_path / "model"  # not there yet: the first load fails
    store, hub = MemoryStore(), InprocHub()
    executor = concurrent.futures.ThreadPoolExecutor(1)
    registry = ModelRegistry(
        PipelineSettings(namespace="ns"),
        store=store,
        client=InprocClient(hub),
        router_factory=RoundRobinRouter,
        executor=executor,
    )
    watcher = asyncio.create_task(registry.run())
    worker = EngineWorker(
        engine=EchoEngine(),
        store=store,
        server=InprocServer(hub),
        identity=WorkerIdentity("ns", "backend", "generate", "late", str(model_dir), 4096),
        lease_ttl_s=5.0,
    )
    await worker.start()
    try:
        for _ in range(100):
            if "cannot serve model late" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "cannot serve model late" in caplog.text
        assert registry.models() == []
        shutil.copytree(bundled_model_path(), model_dir)
        for _ in range(300):
            if registry.models():
                break
            await asyncio.sleep(0.01)
        assert [m.name for m in registry.models()] == ["late"]
    finally:
        await worker.shutdown(1.0)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await store.close()
        executor.shutdown()
