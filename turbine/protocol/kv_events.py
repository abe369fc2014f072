"""KV-cache events a worker publishes so routers know which blocks it holds.

Each worker numbers its event batches from 0 without gaps; a router that sees a gap drops that
worker's state and asks for a full dump. Hashes follow `turbine.kv.hashing` (Dynamo-compatible).
"""

from __future__ import annotations

import msgspec


class StoredBlock(msgspec.Struct, frozen=True, array_like=True):
    block_hash: int  # chained sequence hash
    tokens_hash: int  # local hash of this block's tokens


class KvStored(msgspec.Struct, frozen=True, tag="stored"):
    parent_hash: int | None
    blocks: list[StoredBlock]


class KvRemoved(msgspec.Struct, frozen=True, tag="removed"):
    block_hashes: list[int]


class KvCleared(msgspec.Struct, frozen=True, tag="cleared"):
    pass


KvEvent = KvStored | KvRemoved | KvCleared


class KvEventBatch(msgspec.Struct, frozen=True):
    worker_id: int
    event_id: int
    events: list[KvEvent]


class LoadMetrics(msgspec.Struct, frozen=True):
    worker_id: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_waiting: int
    num_running: int


class KvDump(msgspec.Struct, frozen=True):
    """A worker's whole prefix cache: every cached block hash, as of just before `next_event_id`.

    A router that lost events (a gap) replaces its view of the worker with this, then applies
    batches from `next_event_id` on.
    """

    worker_id: int
    block_hashes: list[int]
    next_event_id: int
    block_size: int


class WorkerEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One message of a worker's event stream (the `kv_events` endpoint): a KV batch or load metrics."""

    kv: KvEventBatch | None = None
    load: LoadMetrics | None = None


class RawWorkerEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """A `WorkerEvent` built from payloads already msgpack-encoded (a `KvEventBatch` or
    `LoadMetrics` as published on the event plane): it encodes to the same bytes, so a worker
    forwards its events to every follower without decoding and re-encoding them for each."""

    kv: msgspec.Raw | None = None
    load: msgspec.Raw | None = None


# Request-plane endpoints every worker with an event plane serves beside its generate endpoint.
KV_EVENTS_ENDPOINT = "kv_events"
KV_DUMP_ENDPOINT = "kv_dump"
