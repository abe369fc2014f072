"""Follow an engine's own KV-event publisher over ZMQ (vLLM `--kv-events-config`, SGLang).

The engine binds a PUB socket and sends `[topic, seq, payload]` (seq: 8 bytes, big-endian, counting
up by one per batch), and optionally a ROUTER socket that replays its recent batches: a client sends
the 8-byte start sequence and gets `[seq, payload]` per buffered batch from there (vLLM 0.33:
`[topic, seq, payload]`; the last two frames count), then `seq = -1` with an empty payload. The
subscriber connects a SUB socket (and a DEALER to the replay endpoint):

- at start it replays from 0, so blocks the engine cached before the sidecar came are known (as far
  back as the engine's buffer reaches);
- a sequence gap asks for a replay of the missing batches; if there is no replay endpoint, or the
  replay does not cover the gap, the state is unknown: `on_reset` (the consumer clears that rank,
  and the router drops its blocks) and it goes on from the current batch;
- batches at or below the last applied sequence (a replay racing the live stream) are skipped;
- a live sequence that goes back (one connection delivers in order) is a restarted engine: its
  rank is cleared and followed from the new process's start;
- frames that do not decode are counted in `stats.malformed` and dropped, never fatal.

Batches are handed to `on_batch(batch, rank)`: `rank` is the batch's `data_parallel_rank`, or the
subscriber's `rank` when the engine leaves it out (vLLM's rank r publishes on the endpoint's port + r).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from turbine.engines.upstream.kv_codec import (
    REPLAY_END,
    EngineEventBatch,
    MalformedEvent,
    decode_batch,
    decode_seq,
    encode_seq,
)

log = logging.getLogger(__name__)

# How long one replay frame may take before the replay is given up (the engine's ROUTER answers
# at once from memory; a silent one has no replay socket there).
REPLAY_FRAME_TIMEOUT_S = 1.0


@dataclass
class SubscriberStats:
    batches: int = 0
    malformed: int = 0
    gaps: int = 0
    replayed: int = 0
    resets: int = 0


class KvEventSubscriber:
    """One engine publisher (one endpoint). `run()` until cancelled; its owner cancels it."""

    def __init__(
        self,
        endpoint: str,
        *,
        on_batch: Callable[[EngineEventBatch, int], None],
        on_reset: Callable[[int], None],
        replay_endpoint: str | None = None,
        topic: str = "",
        rank: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.rank = rank
        self._on_batch = on_batch
        self._on_reset = on_reset
        self._last_seq: int | None = None  # last batch applied (live or replayed)
        self._live_last: int | None = None  # last batch received on the live socket
        self._restarted = False
        self._ranks: set[int] = {rank}
        self.stats = SubscriberStats()
        # Set once the SUB socket is connected and subscribed (tests wait for it).
        self.connected = asyncio.Event()

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        replay = ctx.socket(zmq.DEALER) if self.replay_endpoint else None
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt_string(zmq.SUBSCRIBE, self.topic)
            sub.connect(self.endpoint)
            if replay is not None and self.replay_endpoint is not None:
                replay.setsockopt(zmq.LINGER, 0)
                replay.connect(self.replay_endpoint)
                await self._replay(replay, 0)
            self.connected.set()
            while True:
                frames = await sub.recv_multipart()
                gap = self._on_frames(frames, replay is not None)
                if gap is not None and replay is not None:
                    await self._catch_up(replay, *gap)
        finally:
            sub.close(0)
            if replay is not None:
                replay.close(0)
            ctx.term()

    def restart(self) -> None:
        """The engine behind this publisher restarted (its server went away and came back): its
        ranks are cleared now, and the next message starts the sequence afresh (with a replay of
        the new process's buffer from 0, so what it published meanwhile is applied again)."""
        self._restarted = True
        self._reset()

    def _on_frames(self, frames: list[bytes], can_replay: bool) -> tuple[int, int, bytes] | None:
        """Apply one live message; on a gap that a replay may fill, return (start, seq, payload)
        for `_catch_up` instead."""
        if len(frames) != 3:
            self._malformed(f"{len(frames)} frame(s), want [topic, seq, payload]")
            return None
        try:
            seq = decode_seq(frames[1])
        except MalformedEvent as exc:
            self._malformed(str(exc))
            return None
        live_last, self._live_last = self._live_last, seq
        went_back = live_last is not None and seq <= live_last
        if went_back or self._restarted:
            # One connection delivers in order, so a sequence that goes back is a new process.
            if went_back:
                log.warning("KV events from %s: the publisher restarted (seq %d)", self.endpoint, seq)
                self._reset()
            self._restarted = False
            self._last_seq = None
            if can_replay and seq > 0:
                return 0, seq, frames[2]  # what it published before we heard it
            self._apply(seq, frames[2])
            return None
        last = self._last_seq
        if last is not None and seq <= last:
            return None  # already applied (from a replay)
        if last is not None and seq > last + 1:
            self.stats.gaps += 1
            log.warning("KV events from %s: gap %d..%d", self.endpoint, last + 1, seq - 1)
            if can_replay:
                return last + 1, seq, frames[2]
            self._reset()
        self._apply(seq, frames[2])
        return None

    async def _catch_up(self, replay: zmq.asyncio.Socket, start: int, seq: int, payload: bytes) -> None:
        await self._replay(replay, start)
        last = self._last_seq
        if last is not None and seq <= last:
            return  # the replay reached past this batch already
        if last is None or seq > last + 1:
            self._reset()  # the replay did not cover the gap
        self._apply(seq, payload)

    async def _replay(self, replay: zmq.asyncio.Socket, start: int) -> None:
        """Apply the engine's buffered batches from `start` (as far as it still has them)."""
        # The empty delimiter makes the DEALER's request look like a REQ socket's, which is what
        # vLLM's ROUTER expects ([identity, b"", seq]; it rejects a bare [identity, seq]).
        await replay.send_multipart([b"", encode_seq(start)])
        while True:
            try:
                frames = await asyncio.wait_for(replay.recv_multipart(), REPLAY_FRAME_TIMEOUT_S)
            except TimeoutError:
                log.warning("KV events from %s: replay endpoint did not answer", self.endpoint)
                return
            if len(frames) < 2:
                self._malformed("replay frame without [seq, payload]")
                continue
            try:
                seq = decode_seq(frames[-2])
            except MalformedEvent as exc:
                self._malformed(str(exc))
                continue
            if seq == REPLAY_END:
                return
            last = self._last_seq
            if last is not None and seq <= last:
                continue
            if last is not None and seq > last + 1:
                self._reset()  # the engine no longer buffers what we missed
            self.stats.replayed += 1
            self._apply(seq, frames[-1])

    def _apply(self, seq: int, payload: bytes) -> None:
        self._last_seq = seq
        try:
            batch = decode_batch(payload)
        except MalformedEvent as exc:
            self._malformed(str(exc))
            return
        rank = batch.data_parallel_rank if batch.data_parallel_rank is not None else self.rank
        self._ranks.add(rank)
        self.stats.batches += 1
        try:
            self._on_batch(batch, rank)
        except Exception:
            # A consumer bug must not stop the stream; the batch is lost like a malformed one.
            log.exception("KV events from %s: batch %d failed", self.endpoint, seq)

    def _reset(self) -> None:
        self.stats.resets += 1
        for rank in sorted(self._ranks):
            with contextlib.suppress(Exception):
                self._on_reset(rank)

    def _malformed(self, why: str) -> None:
        self.stats.malformed += 1
        # The first few are worth a line each; a stream of them, a line per hundred.
        if self.stats.malformed <= 3 or self.stats.malformed % 100 == 0:
            log.warning("KV events from %s: dropped a malformed frame (%s)", self.endpoint, why)
