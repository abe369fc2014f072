"""The KV-event encodings stock engines send, written from their published struct definitions.

vLLM declares its events as msgspec structs (`vllm/distributed/kv_events.py`): tagged
(`tag=True`: the class name), `array_like` in older releases and SGLang, tagged maps in current
vLLM; hashes are ints or bytes. These test-only twins produce exactly those bytes, so the codec is
tested against each variant without the engines installed.
"""

from __future__ import annotations

from typing import Any

import msgspec

Hash = int | bytes


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class ArrayBlockStored(ArrayEvent, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class ArrayBlockRemoved(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None = None


class ArrayAllBlocksCleared(ArrayEvent, tag="AllBlocksCleared"):
    pass


class MapBatch(msgspec.Struct):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class MapEvent(msgspec.Struct, tag=True, tag_field="type"):
    pass


class MapBlockStored(MapEvent, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class MapBlockRemoved(MapEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: str | None = "GPU"
    group_idx: int | None = None


class MapAllBlocksCleared(MapEvent, tag="AllBlocksCleared"):
    pass


class Heartbeat(MapEvent, tag="Heartbeat"):
    pass


_encode = msgspec.msgpack.Encoder().encode


def array_batch(events: list[Any], rank: int | None = None, ts: float = 1.0) -> bytes:
    return _encode(ArrayBatch(ts, events, rank))


def map_batch(events: list[Any], rank: int | None = None, ts: float = 1.0) -> bytes:
    return _encode(MapBatch(ts, events, rank))


def stored(
    encoding: str, hashes: list[Hash], parent: Hash | None, tokens: list[int], block_size: int, **kw: Any
) -> Any:
    cls = ArrayBlockStored if encoding == "array" else MapBlockStored
    return cls(hashes, parent, tokens, block_size, **kw)


def removed(encoding: str, hashes: list[Hash], **kw: Any) -> Any:
    return (ArrayBlockRemoved if encoding == "array" else MapBlockRemoved)(hashes, **kw)


def cleared(encoding: str) -> Any:
    return ArrayAllBlocksCleared() if encoding == "array" else MapAllBlocksCleared()


def batch(encoding: str, events: list[Any], rank: int | None = None) -> bytes:
    return array_batch(events, rank) if encoding == "array" else map_batch(events, rank)
