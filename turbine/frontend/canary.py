"""Canary health checks (`--health-check-interval-s`): a tiny real request to each idle worker.

Heartbeats prove a worker's process answers; a canary proves its engine still produces tokens
(a GPU hang can leave the event loop, and so the heartbeats, running). Every interval, each worker
of the model that produced nothing for this frontend since the last round gets a one-token
request straight over the request plane (not through the router, so it counts as no one's load).
One that fails or does not finish within `--health-check-timeout-s` is logged, counted and taken
out of routing, and whatever this frontend still streams from it is failed so that
`--migration-limit` moves it: those streams have been silent for the whole round too. A later
canary that succeeds puts the worker back. Workers that produce tokens are checked by their own
traffic, so canaries cost nothing while a model is under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

import msgspec

from turbine.errors import TurbineError, WorkerStalled
from turbine.protocol.instance import Instance
from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
from turbine.protocol.response import EngineOutput
from turbine.router.health import Quarantine
from turbine.runtime.lifecycle import cancel_and_wait
from turbine.runtime.transport.base import RequestPlaneClient

log = logging.getLogger(__name__)

_encode = msgspec.msgpack.Encoder().encode
_decode_output = msgspec.msgpack.Decoder(EngineOutput).decode


class Canary:
    """One model's canary loop; `served(id)` marks a worker as not idle this round. Owned by the
    model's pipeline: `start()` after construction, `close()` when it closes."""

    def __init__(
        self,
        model: str,
        client: RequestPlaneClient,
        instances: Callable[[], dict[int, Instance]],
        quarantine: Quarantine,
        token_ids: list[int],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._model = model
        self._client = client
        self._instances = instances
        self._quarantine = quarantine
        self._token_ids = token_ids
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._served: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def served(self, instance_id: int) -> None:
        self._served.add(instance_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"canary-{self._model}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            idle = [i for i in self._instances().values() if i.instance_id not in self._served]
            self._served.clear()
            if idle:
                await asyncio.gather(*(self._check(instance) for instance in idle))

    async def _check(self, instance: Instance) -> None:
        request = PreprocessedRequest(
            f"canary-{uuid.uuid4().hex}",
            self._model,
            self._token_ids,
            SamplingOptions(temperature=0.0),
            StopConditions(max_tokens=1, ignore_eos=True),
        )
        why = await self._answer(instance, _encode(request))
        if why is None:
            self._quarantine.canary_passed(instance.instance_id)
            return
        self._quarantine.canary_failed(instance.instance_id, why)
        abandon = getattr(self._client, "abandon", None)
        if abandon is not None:
            stuck = abandon(
                instance.address, WorkerStalled(f"worker {instance.instance_id:x} failed a health check")
            )
            if stuck:
                log.warning(
                    "model %s: moving the %d stream(s) worker %x produced nothing for",
                    self._model,
                    stuck,
                    instance.instance_id,
                )

    async def _answer(self, instance: Instance, payload: bytes) -> str | None:
        """None when the worker finished the canary in time, else why not."""
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = self._client.stream(instance.address, instance.endpoint, payload)
                async with contextlib.aclosing(stream) as batches:
                    async for batch in batches:
                        for frame in batch:
                            out = _decode_output(frame)
                            if out.error is not None:
                                return f"the engine failed it: {out.error}"
                            if out.finish_reason is not None:
                                return None
            return "the stream ended without finishing"
        except TimeoutError:
            return f"no answer within {self._timeout_s:g} s"
        except TurbineError as exc:
            return exc.message
