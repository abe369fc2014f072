"""Adapter from an engine's EventSink to an EventPlane: msgpack-encode and publish."""

from __future__ import annotations

import msgspec

from turbine.protocol.kv_events import KvEventBatch, LoadMetrics
from turbine.runtime.events.base import EventPlane, kv_events_subject, load_subject

_encode = msgspec.msgpack.Encoder().encode


class EventPlaneSink:
    """Publishes one worker's KV events and load metrics on its subjects."""

    def __init__(self, plane: EventPlane, namespace: str, model: str, worker_id: int) -> None:
        self._plane = plane
        self._kv_subject = kv_events_subject(namespace, model, worker_id)
        self._load_subject = load_subject(namespace, model, worker_id)

    def publish_kv_events(self, batch: KvEventBatch) -> None:
        self._plane.publish(self._kv_subject, _encode(batch))

    def publish_load(self, metrics: LoadMetrics) -> None:
        self._plane.publish(self._load_subject, _encode(metrics))
