"""Are the load generator and the mocker fast enough for `scale.py --processes`?

- **loadgen**: one load-generator process (`turbine.bench.loadgen.run_closed_loop`, what
  `scale.py --processes` runs in each of its `--loadgen-procs`) against a trivial HTTP/1.1 server
  that answers every POST at once with a fixed chat completion (a separate process, raw asyncio
  protocol, keep-alive): the most chat req/s one load generator can send, on one core.
- **mocker**: one mocker worker process (`turbine worker --engine mocker --speedup-ratio 1e6`,
  block size 16, as `scale.py --processes` starts it) driven over the TCP request plane by a
  client process sending chat-sized requests (~260 prompt tokens, 16 output tokens, unique): the
  most req/s one mocker process serves. Its CPU share is reported so that a client-bound figure
  is visible as such.

    flock /tmp/turbine-bench.lock .venv/bin/python benchmarks/ceilings.py [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import secrets
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import orjson

_REPLY = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "turbine-tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "lorem ipsum dolor sit amet " * 3},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 260, "completion_tokens": 16, "total_tokens": 276},
    }
)
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(_REPLY)).encode()
    + b"\r\n\r\n"
    + _REPLY
)


class _Trivial(asyncio.Protocol):
    """Answers each complete request (headers + Content-Length body) with `_RESPONSE`."""

    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            length = (
                int(head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
                if at >= 0
                else 0
            )
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            out.append(_RESPONSE)
        self._buf = buf
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


def _serve_trivial(conn: Connection, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Trivial, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)
        server.close()

    uvloop.run(main())


def _chat_bodies(n: int) -> list[dict[str, Any]]:
    from turbine.bench.workloads import random_words

    rng = random.Random(0)
    return [
        {
            "model": "turbine-tiny",
            "messages": [{"role": "user", "content": f"Request {i}: {random_words(rng, 120)}"}],
            "max_tokens": 16,
            "ignore_eos": True,
        }
        for i in range(n)
    ]


def loadgen_ceiling(requests: int, concurrency: int, cpus: tuple[int, int] | None) -> tuple[float, float]:
    """(req/s, CPU share of the load generator) against the trivial server."""
    from turbine.bench.loadgen import run_closed_loop

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    server = context.Process(target=_serve_trivial, args=(theirs, cpus[1] if cpus else None))
    server.start()
    try:
        port = ours.recv()
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        import uvloop

        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        uvloop.run(run_closed_loop(url, _chat_bodies(500), concurrency=concurrency, stream=False))
        bodies = _chat_bodies(requests)
        cpu0 = time.process_time()
        run = uvloop.run(run_closed_loop(url, bodies, concurrency=concurrency, stream=False))
        cpu = time.process_time() - cpu0
        assert not run.failures, run.results[0].error
        return run.requests_per_s, cpu / run.wall_s
    finally:
        ours.send(None)
        server.join(10)
        if cpus:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def _drive_mocker(conn: Connection, address: str, requests: int, concurrency: int, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    import msgspec
    import uvloop

    from turbine.protocol.request import PreprocessedRequest, SamplingOptions, StopConditions
    from turbine.runtime.transport.tcp import TcpRequestClient

    encode = msgspec.msgpack.Encoder().encode
    rng = random.Random(0)

    # Encoded up front: the client must not be what limits the mocker.
    payloads = [
        encode(
            PreprocessedRequest(
                secrets.token_hex(8),
                "turbine-tiny",
                [rng.randrange(1000, 30000) for _ in range(260)],
                SamplingOptions(),
                StopConditions(max_tokens=16, ignore_eos=True),
            )
        )
        for _ in range(requests)
    ]

    async def main() -> tuple[int, float]:
        client = TcpRequestClient()
        done = 0

        async def one() -> None:
            nonlocal done
            while payloads:
                async for _batch in client.stream(address, "generate", payloads.pop()):
                    pass
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        await client.close()
        return done, wall

    conn.send(uvloop.run(main()))


def mocker_ceiling(requests: int, concurrency: int, cpus: tuple[int, int] | None) -> tuple[float, float]:
    """(req/s, CPU share of the mocker worker process) over the TCP request plane."""
    from turbine.bench.stack import LocalStack, proc_cpu_seconds

    prefix = ["taskset", "-c", str(cpus[1])] if cpus else []
    worker = ["--engine", "mocker", "--speedup-ratio", "1000000", "--num-gpu-blocks-override", "16384"]
    stack = LocalStack([], [*worker, "--block-size", "16"], worker_prefix=prefix)
    try:
        stack.wait_ready(timeout=120)
        address = _worker_address(stack)
        context = multiprocessing.get_context("spawn")
        results = []
        for n in (min(500, requests), requests):
            ours, theirs = context.Pipe()
            client = context.Process(
                target=_drive_mocker, args=(theirs, address, n, concurrency, cpus[0] if cpus else None)
            )
            cpu0 = proc_cpu_seconds(stack.workers[0].pid)
            client.start()
            done, wall = ours.recv()
            client.join(10)
            results.append((done / wall, (proc_cpu_seconds(stack.workers[0].pid) - cpu0) / wall))
        return results[-1]
    finally:
        stack.close()


def _worker_address(stack: Any) -> str:
    """The one worker's request-plane address, from the stack's file discovery store."""
    import msgspec

    from turbine.protocol.instance import Instance
    from turbine.runtime.discovery.file import FileStore

    async def read() -> str:
        store = FileStore(stack.root / "store")
        try:
            found = await store.get_prefix("turbine/instances/")
        finally:
            await store.close()
        return msgspec.msgpack.decode(found[0].value, type=Instance).address

    return asyncio.run(read())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=48, help="requests in flight (scale.py: 192 / 4)")
    parser.add_argument("--only", choices=("loadgen", "mocker"))
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin to CPUs 0 and 1")
    args = parser.parse_args()
    cpus = (0, 1) if args.pin and (os.cpu_count() or 1) >= 2 else None
    if args.only in (None, "loadgen"):
        rate, share = loadgen_ceiling(args.requests, args.concurrency, cpus)
        print(f"loadgen: {rate:,.0f} chat req/s from one process ({share * 100:.0f}% of a core)", flush=True)
    if args.only in (None, "mocker"):
        rate, share = mocker_ceiling(args.requests, args.concurrency, cpus)
        print(f"mocker: {rate:,.0f} req/s from one worker process ({share * 100:.0f}% of a core)", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
