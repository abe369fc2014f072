"""The whole frontend in one process for tests: memory discovery, the in-process request plane,
real engines, real HTTP through aiohttp's test server (the `harness` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from turbine.frontend.http import OpenAIService
from turbine.frontend.models import ModelRegistry
from turbine.frontend.pipeline import PipelineSettings
from turbine.models import bundled_model_path
from turbine.router.simple import RoundRobinRouter
from turbine.runtime.discovery.memory import MemoryStore
from turbine.runtime.transport.inproc import InprocClient, InprocHub, InprocServer
from turbine.worker.sdk import EngineWorker, WorkerIdentity

MODEL = "tiny"


class Harness:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.hub = InprocHub()
        self.workers: list[EngineWorker] = []
        self.executor = concurrent.futures.ThreadPoolExecutor(1)
        self.registry = ModelRegistry(
            PipelineSettings(namespace="ns"),
            store=self.store,
            client=InprocClient(self.hub),
            router_factory=RoundRobinRouter,
            executor=self.executor,
        )

    async def add_worker(self, engine: Any) -> EngineWorker:
        worker = EngineWorker(
            engine=engine,
            store=self.store,
            server=InprocServer(self.hub),
            identity=WorkerIdentity("ns", "backend", "generate", MODEL, str(bundled_model_path()), 8192),
            lease_ttl_s=5.0,
        )
        await worker.start()
        self.workers.append(worker)
        return worker

    async def wait_instances(self, n: int) -> None:
        for _ in range(500):
            models = self.registry.models()
            if (models and len(models[0].instance_ids) == n) or (n == 0 and not models):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"never saw {n} instances")


async def served_harness() -> AsyncIterator[tuple[Harness, TestClient[Any, Any]]]:
    h = Harness()
    watcher = asyncio.create_task(h.registry.run())
    service = OpenAIService(h.registry, max_body_bytes=1 << 20)
    client: TestClient[Any, Any] = TestClient(TestServer(service.app()))
    await client.start_server()
    try:
        yield h, client
    finally:
        await client.close()
        for w in h.workers:
            await w.shutdown(1.0)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await h.store.close()
        h.executor.shutdown()
