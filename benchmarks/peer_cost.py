"""What one frontend process of `--num-processes N` spends on a request that another process routed.

Every child follows every worker's KV events and applies every sibling's replica-sync events, so
each request costs each of the N-1 processes that did not route it some CPU. This measures that
cost per request, through the real code paths:

- a *peer* process (spawned) hosts 4 mocker workers (speedup 1e6, block size 16, as in
  `turbine bench scale --processes`), each an `EngineWorker` serving its `kv_events` stream on a TCP request
  plane, and a KV router replica that routes chat-sized requests (~260 prompt tokens, 16 output
  tokens, unique prompts) onto them and publishes its routing lifecycle by replica sync over the
  local channel (`runtime/events/local_channel.py`);
- this process is the *observer*: a KV router following the 4 workers' events over the request
  plane (`RequestPlaneFollowers`) and its sibling's replica sync (`ReplicaSync` on a `LocalPlane`),
  wired as `ModelPipeline` wires them. It routes nothing itself.

Its CPU time (user + system) over the run, divided by the peer's requests, is the peer cost per
request; stages (applying KV events, applying sync batches and their parts) are timed inside, and
the rest is receiving and decoding (sockets, framing, msgpack) and the event loop's wake-ups.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/peer_cost.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import multiprocessing
import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

MODEL = "turbine-tiny"
NAMESPACE = "bench"
BLOCK_SIZE = 16
NUM_BLOCKS = 16384
PROMPT_TOKENS = 260  # a ~120-word chat message with the chat template, in the tiny tokenizer
OUTPUT_TOKENS = 16


def _card(instance_id: int) -> Any:
    from turbine.protocol.model_card import ModelDeploymentCard

    return ModelDeploymentCard(
        name=MODEL,
        model_path="",
        namespace=NAMESPACE,
        component="backend",
        endpoint="generate",
        instance_id=instance_id,
        kv_block_size=BLOCK_SIZE,
        total_kv_blocks=NUM_BLOCKS,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
    )


def _router() -> Any:
    from turbine.router.kv_router import KvRouter, KvRouterSettings

    return KvRouter(KvRouterSettings())


# ------------------------------------------------------------------------------------- the peer


def _peer(conn: Connection, directory: str, workers: int, concurrency: int) -> None:
    import uvloop

    uvloop.run(_peer_main(conn, directory, workers, concurrency))


async def _peer_main(conn: Connection, directory: str, workers: int, concurrency: int) -> None:
    from turbine.engines.mocker.engine import MockerConfig, MockerEngine
    from turbine.router.replica_sync import ReplicaSync
    from turbine.runtime.discovery.memory import MemoryStore
    from turbine.runtime.events.local_channel import local_plane
    from turbine.runtime.events.memory import MemoryEventPlane
    from turbine.runtime.events.sink import EventPlaneSink
    from turbine.runtime.transport.tcp import TcpRequestServer
    from turbine.worker.sdk import EngineWorker, WorkerIdentity

    store = MemoryStore()
    identity = WorkerIdentity(NAMESPACE, "backend", "generate", MODEL, "", 4096)
    engines: dict[int, MockerEngine] = {}
    started: list[EngineWorker] = []
    for _ in range(workers):
        iid = secrets.randbits(63)
        plane = MemoryEventPlane()
        sink = EventPlaneSink(plane, NAMESPACE, MODEL, iid)
        config = MockerConfig(block_size=BLOCK_SIZE, num_gpu_blocks=NUM_BLOCKS, speedup_ratio=1e6)
        engine = MockerEngine(config, worker_id=iid, events=sink)
        worker = EngineWorker(
            engine=engine,
            store=store,
            server=TcpRequestServer("127.0.0.1"),
            identity=identity,
            lease_ttl_s=10.0,
            instance_id=iid,
            events=plane,
        )
        await worker.start()
        started.append(worker)
        engines[iid] = engine
    router = _router()
    router.update_instances({iid: _card(iid) for iid in engines})
    sync_plane = await local_plane(directory)
    sync = ReplicaSync(sync_plane, NAMESPACE, MODEL, secrets.randbits(63), router)
    sync.start()
    conn.send([(w.instance_id, w.address) for w in started])
    loop = asyncio.get_running_loop()
    rng = random.Random(1)
    while True:
        n = await loop.run_in_executor(None, conn.recv)
        if n is None:
            break
        start = time.perf_counter()
        done = await _route_and_run(router, engines, n, concurrency, rng)
        conn.send((done, time.perf_counter() - start))
    await sync.close()
    await sync_plane.close()
    for worker in started:
        await worker.shutdown(1.0)


async def _route_and_run(
    router: Any, engines: dict[int, Any], n: int, concurrency: int, rng: random.Random
) -> int:
    """Route `n` unique chat-sized requests and run each on its mocker, `concurrency` at a time,
    reporting the lifecycle to the router as the pipeline does; returns how many ran."""
    from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions

    left = n
    done = 0

    async def client() -> None:
        nonlocal left, done
        while left > 0:
            left -= 1
            rid = f"req-{secrets.token_hex(6)}"
            # Unique prompts, so nothing is served from a cache, as in `turbine bench scale`.
            tokens = [rng.randrange(1000, 30000) for _ in range(PROMPT_TOKENS)]
            request = PreprocessedRequest(
                rid,
                MODEL,
                tokens,
                SamplingOptions(),
                StopConditions(max_tokens=OUTPUT_TOKENS, ignore_eos=True),
            )
            decision = router.select(request, list(engines))
            first = True
            async for out in engines[decision.instance_id].generate(request):
                if first and out.token_ids:
                    router.on_first_token(rid, decision)
                    first = False
            router.on_finish(rid, decision)
            done += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


# --------------------------------------------------------------------------------- the observer


class Stages:
    """Seconds spent in named stages (wrapped callables), and how often each was entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)
        seconds, calls = self.seconds, self.calls
        seconds[name] = 0.0
        calls[name] = 0
        clock = time.perf_counter

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += clock() - t0
                calls[name] += 1

        setattr(owner, attr, timed)

    def time_gc(self) -> None:
        """Count the garbage collector's passes as a stage too."""
        name = "garbage collector"
        self.seconds[name] = 0.0
        self.calls[name] = 0
        started = [0.0]

        def callback(phase: str, _info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                self.seconds[name] += time.perf_counter() - started[0]
                self.calls[name] += 1

        gc.callbacks.append(callback)

    def reset(self) -> None:
        for name in self.seconds:
            self.seconds[name] = 0.0
            self.calls[name] = 0


async def _observe(args: argparse.Namespace) -> dict[str, Any]:
    from turbine.protocol.instance import Instance
    from turbine.router.front import Routing, RoutingSettings
    from turbine.router.kv_events import RequestPlaneFollowers
    from turbine.router.replica_sync import ReplicaSync
    from turbine.runtime.events.local_channel import local_plane, prepare_channel
    from turbine.runtime.transport.tcp import TcpRequestClient

    directory = tempfile.mkdtemp(prefix="turbine-peer-")
    prepare_channel(directory)
    plane = await local_plane(directory)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    peer = context.Process(target=_peer, args=(theirs, directory, args.workers, args.concurrency))
    peer.start()
    loop = asyncio.get_running_loop()
    try:
        addresses: list[tuple[int, str]] = await loop.run_in_executor(None, ours.recv)
        router = _router()
        routing = Routing(MODEL, router, RoutingSettings())
        cards = {iid: _card(iid) for iid, _ in addresses}
        routing.update_instances(cards)
        stages = Stages()
        if args.stages:
            stages.time_gc()
            stages.wrap(router, "apply_kv_events", "KV events: index update")
            stages.wrap(router, "apply_peer_batch", "replica sync: apply batch")
            stages.wrap(router.pending, "record", "  of which routing history (pending.record)")
            stages.wrap(router.active, "add", "  of which active blocks add")
            stages.wrap(router.active, "remove", "  of which active blocks remove")
        client = TcpRequestClient()
        followers = RequestPlaneFollowers(client, router)
        followers.sync(
            {
                iid: Instance(NAMESPACE, "backend", "generate", iid, "tcp", address)
                for iid, address in addresses
            }
        )
        sync = ReplicaSync(
            plane, NAMESPACE, MODEL, secrets.randbits(63), router, on_batch=routing.apply_peer_batch
        )
        sync.start()
        await asyncio.sleep(1.5)  # dumps taken, the sibling found by both sides' scans
        ours.send(min(500, args.requests))  # warm-up: caches fill, code paths warm
        await loop.run_in_executor(None, ours.recv)
        await asyncio.sleep(0.5)
        stages.reset()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        ours.send(args.requests)
        done, peer_wall = await loop.run_in_executor(None, ours.recv)
        await asyncio.sleep(0.3)  # the last events arrive
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        ours.send(None)
        await sync.close()
        await followers.close()
        await client.close()
        return {
            "requests": done,
            "peer_req_s": done / peer_wall,
            "cpu_us": cpu / done * 1e6,
            "cpu_share": cpu / wall,
            "stages": {k: (v / done * 1e6, stages.calls[k] / done) for k, v in stages.seconds.items()},
            "index_blocks": router.index.num_blocks(),
            "peer_requests_counted": len(router.load),
        }
    finally:
        await plane.close()
        peer.join(30)
        if peer.is_alive():
            peer.kill()
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(directory, "sync"))
            os.rmdir(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=48, help="the peer's requests in flight")
    parser.add_argument(
        "--no-stages", dest="stages", action="store_false", help="no per-stage timers (their overhead)"
    )
    args = parser.parse_args()
    import uvloop

    # As the frontend does before serving (turbine/frontend/main.py).
    gc.collect()
    gc.freeze()
    result = uvloop.run(_observe(args))
    print(
        f"peer: {result['requests']} requests at {result['peer_req_s']:,.0f} req/s; observer CPU "
        f"{result['cpu_share'] * 100:.0f}% of a core"
    )
    print(f"observer CPU per peer request: {result['cpu_us']:.1f} us")
    if result["stages"]:
        print("| stage | us/request | calls/request |\n|---|---|---|")
        for name, (us, calls) in result["stages"].items():
            print(f"| {name} | {us:.1f} | {calls:.2f} |")
        top = sum(us for name, (us, _) in result["stages"].items() if not name.startswith(" "))
        print(f"| rest: receive, decode, wake-ups | {result['cpu_us'] - top:.1f} | |")


if __name__ == "__main__":
    main()
