"""An engine-side KV-event publisher for tests, after vLLM's ZMQ publisher's wire behaviour.

PUB socket: `[topic, seq (8 bytes big-endian), payload]` per batch, seq counting from 0. ROUTER
replay socket: a client sends an 8-byte start seq; it gets `[seq, payload]` for every buffered
batch from there, then `[-1, b""]`. `drop_next` leaves batches out of the live stream (a lost
message) while keeping them in the replay buffer, and `forget` drops the buffer's oldest entries
(a replay that no longer reaches back far enough).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import zmq
import zmq.asyncio

from tests.ports import free_port
from turbine.engines.upstream.kv_codec import REPLAY_END, decode_seq, encode_seq


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class TestPublisher:
    __test__ = False  # not a test class

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "kv-events") -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoint)
        self.topic = topic.encode()
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque()
        self.drop_next = 0
        self.router: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        if replay_endpoint is not None:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(replay_endpoint)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, payload: bytes) -> int:
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if self.drop_next:
            self.drop_next -= 1
        else:
            await self.pub.send_multipart([self.topic, encode_seq(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    def forget(self, count: int) -> None:
        for _ in range(count):
            self.buffer.popleft()

    async def _serve_replay(self) -> None:
        assert self.router is not None
        while True:
            client, *rest = await self.router.recv_multipart()
            start = decode_seq(rest[-1])
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self.router.send_multipart([client, b"", encode_seq(seq), payload])
            await self.router.send_multipart([client, b"", encode_seq(REPLAY_END), b""])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)
        self.ctx.term()
