"""KV events for upstreams that publish none (llama.cpp): the prompts this sidecar sent, TTL + LRU.

The router's approximate mode (`--no-kv-events`) remembers where it routed each prefix; doing the
same here, per upstream, lets one router follow event-publishing and silent upstreams alike: the
sidecar publishes `stored` for a prompt's blocks once the upstream has prefilled it (its first
output), `removed` when a block has not been sent for `ttl_s` or when the upstream's capacity (in
blocks) would be exceeded, least recently sent first. It is a model of the server's cache, not the
cache: llama.cpp keeps what fits its slots, and a restart empties it (`clear`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from turbine.kv.hashing import block_hashes
from turbine.protocol.kv_events import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock


class SentHistory:
    def __init__(
        self,
        block_size: int,
        capacity_blocks: int,
        ttl_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.block_size = block_size
        self.capacity_blocks = max(1, capacity_blocks)
        self.ttl_s = ttl_s
        self._clock = clock
        self._blocks: OrderedDict[int, float] = OrderedDict()  # hash -> last sent, oldest first

    def cached(self) -> list[int]:
        return list(self._blocks)

    def record(self, token_ids: Sequence[int]) -> list[KvEvent]:
        hashes = block_hashes(token_ids, self.block_size)
        if not hashes.sequence:
            return []
        now = self._clock()
        blocks = self._blocks
        for h in hashes.sequence:
            blocks[h] = now
            blocks.move_to_end(h)
        # Restating blocks already held is harmless; one event keeps the chain unbroken.
        out: list[KvEvent] = [
            KvStored(None, [StoredBlock(s, t) for s, t in zip(hashes.sequence, hashes.local, strict=True)])
        ]
        evicted = []
        while len(blocks) > self.capacity_blocks:
            evicted.append(blocks.popitem(last=False)[0])
        if evicted:
            out.append(KvRemoved(evicted))
        return out

    def expire(self) -> list[KvEvent]:
        deadline = self._clock() - self.ttl_s
        blocks = self._blocks
        gone = []
        while blocks:
            h, sent = next(iter(blocks.items()))
            if sent > deadline:
                break
            del blocks[h]
            gone.append(h)
        return [KvRemoved(gone)] if gone else []

    def clear(self) -> list[KvEvent]:
        self._blocks.clear()
        return [KvCleared()]
