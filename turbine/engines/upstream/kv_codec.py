"""Decode the KV events stock engines publish on ZMQ (sans-IO: bytes in, plain records out).

vLLM, SGLang and TensorRT-LLM all send msgpack `KVEventBatch(ts, events, data_parallel_rank)` as the
third frame of `[topic, seq (8 bytes, big-endian), payload]`, but the encodings differ by engine and
version, so the decoder reads the generic msgpack value and normalises it by hand:

- the batch is an array `[ts, events, dp_rank?]` or a map `{"ts", "events", "data_parallel_rank"}`;
- each event is a tagged array `["BlockStored", hashes, parent, tokens, block_size, lora_id, medium,
  ...]` (SGLang, older vLLM: msgspec `array_like` with `tag=True`) or a tagged map
  `{"type": "BlockStored", "block_hashes": ..., ...}` (current vLLM);
- block hashes are ints (SGLang, TensorRT-LLM, older vLLM) or bytes (vLLM's sha256 family);
- every field after the ones we need is optional, and unknown event kinds (TensorRT-LLM's
  heartbeats, future additions) are skipped, not errors.

A payload that is not msgpack, or whose events lack the fields we need, raises `MalformedEvent`;
the subscriber counts and drops it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

EngineHash = int | bytes
"""An engine's own block hash: an int, or the raw digest bytes (vLLM's sha256 family)."""

# The sequence number frame: a signed 64-bit big-endian int; -1 ends a replay.
SEQ_BYTES = 8
REPLAY_END = -1


class MalformedEvent(ValueError):
    """A frame or payload that does not decode as a KV event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    # vLLM hybrid models: which KV cache group the blocks belong to (None: the only one).
    group_idx: int | None = None
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[EngineHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


EngineEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EngineEventBatch:
    ts: float
    events: tuple[EngineEvent, ...]
    data_parallel_rank: int | None = None
    # Events of kinds we do not know (heartbeats, ...), skipped.
    skipped: int = 0


# Field order of the array_like encodings (after the tag), as the engines declare them.
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def decode_seq(frame: bytes) -> int:
    if len(frame) != SEQ_BYTES:
        raise MalformedEvent(f"sequence frame of {len(frame)} bytes (want {SEQ_BYTES})")
    return int.from_bytes(frame, "big", signed=True)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big", signed=True)


def decode_batch(payload: bytes) -> EngineEventBatch:
    """One `KVEventBatch` payload, any of the encodings above."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not msgpack: {exc}") from None
    if isinstance(raw, Mapping):
        ts, events, rank = raw.get("ts", 0.0), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, Sequence) and not isinstance(raw, str | bytes) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise MalformedEvent(f"batch is a {type(raw).__name__}, not an array or map")
    if not isinstance(events, list):
        raise MalformedEvent("batch has no event list")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise MalformedEvent(f"batch timestamp {ts!r} is not a number")
    if rank is not None and not _is_int(rank):
        raise MalformedEvent(f"data_parallel_rank {rank!r} is not an int")
    decoded: list[EngineEvent] = []
    skipped = 0
    for item in events:
        event = _decode_event(item)
        if event is None:
            skipped += 1
        else:
            decoded.append(event)
    return EngineEventBatch(float(ts), tuple(decoded), rank, skipped)


def _decode_event(item: Any) -> EngineEvent | None:
    if isinstance(item, Mapping):
        tag = item.get("type")
        fields: Mapping[str, Any] = item
    elif isinstance(item, list) and item:
        tag = item[0]
        names = {"BlockStored": _STORED_FIELDS, "BlockRemoved": _REMOVED_FIELDS}.get(tag, ())
        values = item[1:]
        # Engines that declare fewer fields send shorter arrays; fields past these are ignored.
        fields = dict(zip(names, values, strict=False))
    else:
        raise MalformedEvent(f"event is a {type(item).__name__}")
    if tag == "BlockStored":
        hashes = _hashes(fields.get("block_hashes"))
        tokens = fields.get("token_ids")
        size = fields.get("block_size")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise MalformedEvent("BlockStored.token_ids is not a list of ints")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise MalformedEvent(f"BlockStored.block_size {size!r} is not a positive int")
        if len(tokens) != size * len(hashes):
            raise MalformedEvent(f"BlockStored has {len(tokens)} tokens for {len(hashes)} block(s) of {size}")
        parent = fields.get("parent_block_hash")
        if parent is not None and not _is_hash(parent):
            raise MalformedEvent(f"BlockStored.parent_block_hash {parent!r} is not a hash")
        return BlockStored(
            hashes,
            parent,
            tuple(tokens),
            size,
            _opt_int(fields.get("lora_id")),
            _opt_str(fields.get("medium")),
            _opt_int(fields.get("group_idx")),
            _opt_str(fields.get("lora_name")),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(
            _hashes(fields.get("block_hashes")),
            _opt_str(fields.get("medium")),
            _opt_int(fields.get("group_idx")),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None  # a kind we do not know: skipped
    raise MalformedEvent(f"event tag {tag!r} is not a string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, bytes) and len(value) > 0)


def _hashes(value: Any) -> tuple[EngineHash, ...]:
    if not isinstance(value, list) or not all(_is_hash(h) for h in value):
        raise MalformedEvent("block_hashes is not a list of ints or bytes")
    return tuple(value)


def _opt_int(value: Any) -> int | None:
    return value if _is_int(value) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
