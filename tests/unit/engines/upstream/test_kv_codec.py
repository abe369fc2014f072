"""Decoding every KV-event encoding stock engines send (no sockets)."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from tests.unit.engines.upstream import engine_structs as es
from turbine.engines.upstream.kv_codec import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    MalformedEvent,
    decode_batch,
    decode_seq,
    encode_seq,
)

pytestmark = pytest.mark.unit

ENCODINGS = ("array", "map")
BYTES_HASH = hashlib.sha256(b"block").digest()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("parent", [None, 7, BYTES_HASH])
def test_stored_removed_cleared_round_trip(encoding: str, parent: int | bytes | None) -> None:
    events = [
        es.stored(encoding, [11, BYTES_HASH], parent, list(range(8)), 4),
        es.removed(encoding, [11]),
        es.cleared(encoding),
    ]
    batch = decode_batch(es.batch(encoding, events, rank=3))
    assert batch.data_parallel_rank == 3
    assert batch.events == (
        BlockStored(
            (11, BYTES_HASH), parent, tuple(range(8)), 4, None, None if encoding == "array" else "GPU"
        ),
        BlockRemoved((11,), None if encoding == "array" else "GPU"),
        AllBlocksCleared(),
    )


def test_batch_without_rank_and_trailing_fields_optional() -> None:
    # SGLang-style: a two-element batch, BlockStored with only its first four fields.
    payload = msgspec.msgpack.encode([2.5, [["BlockStored", [1], None, [5, 6], 2]]])
    batch = decode_batch(payload)
    assert batch.ts == 2.5 and batch.data_parallel_rank is None
    assert batch.events == (BlockStored((1,), None, (5, 6), 2),)


def test_vllm_map_fields_group_lora_and_medium() -> None:
    payload = es.map_batch(
        [
            es.MapBlockStored([1], None, [1, 2], 2, medium="CPU", group_idx=1, lora_name="ad"),
            es.MapBlockRemoved([1], medium="CPU", group_idx=1),
        ]
    )
    stored, removed = decode_batch(payload).events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert (stored.medium, stored.group_idx, stored.lora_name) == ("CPU", 1, "ad")
    assert (removed.medium, removed.group_idx) == ("CPU", 1)


def test_unknown_event_kinds_are_skipped() -> None:
    batch = decode_batch(es.map_batch([es.Heartbeat(), es.MapAllBlocksCleared()]))
    assert batch.events == (AllBlocksCleared(),) and batch.skipped == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode("text"),
        msgspec.msgpack.encode([1.0]),
        msgspec.msgpack.encode({"ts": 1.0}),
        msgspec.msgpack.encode(["x", []]),  # ts not a number
        msgspec.msgpack.encode([1.0, [], "r"]),  # rank not an int
        msgspec.msgpack.encode([1.0, [5]]),  # event not a list or map
        msgspec.msgpack.encode([1.0, [[5]]]),  # tag not a string
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, 2, 3], 2]]]),  # token count
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, 2], 0]]]),  # block size
        msgspec.msgpack.encode([1.0, [["BlockStored", ["h"], None, [1, 2], 2]]]),  # hash type
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], 2.5, [1, 2], 2]]]),  # parent type
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, ["a", 2], 2]]]),  # token type
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}]]),  # no hashes
    ],
)
def test_malformed_payloads_raise_malformed_event(payload: bytes) -> None:
    with pytest.raises(MalformedEvent):
        decode_batch(payload)


def test_sequence_frames() -> None:
    assert decode_seq(encode_seq(5)) == 5
    assert decode_seq(b"\xff" * 8) == -1  # the replay end marker
    assert encode_seq(258) == b"\x00" * 6 + b"\x01\x02"
    with pytest.raises(MalformedEvent):
        decode_seq(b"\x01")
