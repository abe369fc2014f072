"""Adapter from an engine's EventSink to an EventPlane: msgpack-encode and publish."""

from __future__ import annotations

import msgspec

from turbine.protocol.kv_events import KvEventBatch, LoadMetrics
from turbine.runtime.events.base import EventPlane, kv_events_subject, load_subject

_encode = msgspec.msgpack.Encoder().encode


class EventPlaneSink:
    """Publishes one worker's KV events and load metrics on its subjects, on `plane` and, if given,
    also on `mirror` (a worker's own in-process plane beside a shared NATS or ZMQ plane, so its
    `kv_events` endpoint keeps serving frontends that follow over the request plane)."""

    def __init__(
        self, plane: EventPlane, namespace: str, model: str, worker_id: int, mirror: EventPlane | None = None
    ) -> None:
        self._planes = (plane,) if mirror is None else (plane, mirror)
        self._kv_subject = kv_events_subject(namespace, model, worker_id)
        self._load_subject = load_subject(namespace, model, worker_id)

    def publish_kv_events(self, batch: KvEventBatch) -> None:
        data = _encode(batch)
        for plane in self._planes:
            plane.publish(self._kv_subject, data)

    def publish_load(self, metrics: LoadMetrics) -> None:
        data = _encode(metrics)
        for plane in self._planes:
            plane.publish(self._load_subject, data)
