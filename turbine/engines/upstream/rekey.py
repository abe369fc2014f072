"""Re-key an engine's KV events onto Turbine's block hashes (pure, no I/O).

Engines name blocks with their own hashes: vLLM's are a sha256 family chained from a per-process
random seed, so two servers name the same prefix differently, and none of them is Turbine's XXH3
chain. `BlockStored` carries the blocks' token ids, so the hashes the router uses can be recomputed
here: one `Rekeyer` per engine instance (per data-parallel rank) keeps, for every engine block it
has seen stored, the state of Turbine's hash chain after that block, so a child stored later
continues the chain from its parent's entry, and removals find the Turbine blocks to drop.

Block sizes need not match. The chain state after an engine block is `(parent, pending)`: the
sequence hash of the last full Turbine block and the tokens since (fewer than a Turbine block).
Each engine block appends its tokens to `pending` and completes zero or more Turbine blocks, which
it records; removing it removes those. A Turbine block completed by a child but containing tokens of
an evicted parent stays until the child goes (engines evict leaves first, so that is brief).

Several engine blocks may complete the same Turbine block (a prefix stored again after partial
eviction under a different engine hash, or other KV groups), so Turbine blocks are reference-counted
and `stored`/`removed` are emitted on the 0→1 and 1→0 transitions only.

Ignored (counted): blocks in another medium than the GPU (vLLM's CPU offload tier), of a LoRA
adapter or of a KV group other than the first (Turbine's hashes cover the base model's tokens only),
and stored events whose parent was never seen (after a loss the engine's older blocks are unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

from turbine.engines.upstream.kv_codec import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    EngineHash,
)
from turbine.kv.hashing import chain_hashes, local_block_hashes
from turbine.protocol.kv_events import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock

_PRIMARY_MEDIA = (None, "GPU", "gpu")


@dataclass(frozen=True, slots=True)
class _ChainState:
    parent: int | None  # sequence hash of the last full Turbine block
    pending: tuple[int, ...]  # tokens after it, fewer than a Turbine block
    completed: tuple[int, ...]  # Turbine blocks this engine block completed


_ROOT = _ChainState(None, (), ())


@dataclass
class RekeyStats:
    orphans: int = 0  # stored events whose parent was never seen
    ignored: int = 0  # events of other media, LoRA adapters or KV groups
    unknown_removals: int = 0  # removed engine blocks never seen stored


class Rekeyer:
    """engine block hash → Turbine block hashes, for one engine instance. Not thread-safe."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._nodes: dict[EngineHash, _ChainState] = {}
        self._refs: dict[int, int] = {}
        self.stats = RekeyStats()

    def __len__(self) -> int:
        return len(self._nodes)

    def cached(self) -> list[int]:
        """Every Turbine block hash this engine holds now (for a dump)."""
        return list(self._refs)

    def lookup(self, engine_hash: EngineHash) -> tuple[int, ...]:
        """The Turbine blocks an engine block completed (empty when unknown or none)."""
        node = self._nodes.get(engine_hash)
        return node.completed if node is not None else ()

    def clear(self) -> list[KvEvent]:
        self._nodes.clear()
        self._refs.clear()
        return [KvCleared()]

    def apply(self, events: tuple[EngineEvent, ...] | list[EngineEvent]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for event in events:
            if isinstance(event, BlockStored):
                stored = self._stored(event)
                if stored is not None:
                    out.append(stored)
            elif isinstance(event, BlockRemoved):
                removed = self._removed(event)
                if removed is not None:
                    out.append(removed)
            elif isinstance(event, AllBlocksCleared):
                out.extend(self.clear())
        return out

    def _ignored(self, medium: str | None, group_idx: int | None) -> bool:
        return medium not in _PRIMARY_MEDIA or group_idx not in (None, 0)

    def _stored(self, event: BlockStored) -> KvStored | None:
        if self._ignored(event.medium, event.group_idx) or event.lora_id or event.lora_name:
            self.stats.ignored += 1
            return None
        if event.parent_block_hash is None:
            state = _ROOT
        else:
            found = self._nodes.get(event.parent_block_hash)
            if found is None:
                self.stats.orphans += 1
                return None
            state = found
        first_parent = state.parent
        emitted: list[StoredBlock] = []
        size = self.block_size
        tokens = event.token_ids
        for i, engine_hash in enumerate(event.block_hashes):
            pending = state.pending + tokens[i * event.block_size : (i + 1) * event.block_size]
            full = len(pending) // size * size
            completed: tuple[int, ...] = ()
            parent = state.parent
            if full:
                local = local_block_hashes(pending[:full], size)
                completed = tuple(chain_hashes(local, parent))
                parent = completed[-1]
                if engine_hash not in self._nodes:
                    for seq in completed:
                        self._refs[seq] = self._refs.get(seq, 0) + 1
                emitted.extend(StoredBlock(s, t) for s, t in zip(completed, local, strict=True))
            state = _ChainState(parent, pending[full:], completed)
            self._nodes.setdefault(engine_hash, state)
        if not emitted:
            return None
        # Re-stating blocks the router already has is harmless (stored is idempotent), and keeps
        # the event one unbroken chain from `first_parent`.
        return KvStored(first_parent, emitted)

    def _removed(self, event: BlockRemoved) -> KvRemoved | None:
        if self._ignored(event.medium, event.group_idx):
            self.stats.ignored += 1
            return None
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            node = self._nodes.pop(engine_hash, None)
            if node is None:
                self.stats.unknown_removals += 1
                continue
            for seq in node.completed:
                left = self._refs[seq] - 1
                if left:
                    self._refs[seq] = left
                else:
                    del self._refs[seq]
                    gone.append(seq)
        return KvRemoved(gone) if gone else None
