"""What router replicas tell each other (`--router-replica-sync`) so each counts the others' load.

Every frontend routes with its own copy of each model's router. Without sharing, a replica sees
only the load it created itself and two replicas pile a burst onto the same cache-hot worker. With
replica sync, each replica publishes its routing lifecycle on the event plane
(`{namespace}.{model}.router.{replica_id:x}`) in batches; the others apply it under a key that
names the replica, so request ids never collide.

Messages of one replica arrive in publish order (one publisher, one subject), so a request's
`Finished` never overtakes its `Routed`. `ReplicaState`, sent about once a second, lists the
replica's active requests: a peer drops whatever it still counts for that replica beyond the
list (a `Finished` lost while the plane was down), and forgets the replica altogether when it
falls silent (the frontend died). `SessionBound` shares session-affinity bindings.
"""

from __future__ import annotations

import msgspec


class Routed(msgspec.Struct, frozen=True, array_like=True, tag="routed"):
    """A request was routed (again, after a failure: the earlier placement stops counting)."""

    request_id: str
    worker: int
    prefill_tokens: int
    """Prompt tokens the worker must compute (not cached), counted until the first token."""
    decode_blocks: int
    """Blocks counted as active decode load by load-only routers (0 from the KV router)."""
    hashes: list[int]
    """The prompt's chained block hashes (KV router; empty from load-only routers)."""
    overlap: int
    """How many leading `hashes` the chosen worker already cached."""
    tail: int
    """Private blocks past the last full prompt block (the partial tail)."""


class PrefillDone(msgspec.Struct, frozen=True, array_like=True, tag="prefill_done"):
    request_id: str


class Finished(msgspec.Struct, frozen=True, array_like=True, tag="finished"):
    request_id: str


class ReplicaState(msgspec.Struct, frozen=True, array_like=True, tag="state"):
    """The replica's own active request ids for this model (a heartbeat)."""

    active: list[str]


class SessionBound(msgspec.Struct, frozen=True, array_like=True, tag="session"):
    """A session was bound (or rebound) to a worker (`--router-session-affinity-ttl-secs`); peers
    adopt the binding, fresh for their own TTL. Re-sent while the session stays in use."""

    session_id: str
    worker: int


RouterEvent = Routed | PrefillDone | Finished | ReplicaState | SessionBound


class RouterSyncBatch(msgspec.Struct, frozen=True, array_like=True):
    replica_id: int
    events: list[RouterEvent]
