"""The EventPlane seam: fire-and-forget publish, prefix subscriptions.

Contract:
- `publish(subject, payload)` never blocks and never fails because of a slow subscriber; messages
  of one publisher on one subject reach each subscriber in publish order.
- `subscribe(prefix)` is an async generator of `(subject, payload)` for every message published
  after the subscription started on a subject starting with `prefix`. Close it to unsubscribe.
- Subjects are `.`-separated: `{namespace}.{model}.kv_events.{worker_id:x}`, `....load.{worker_id:x}`.
- A subscriber that falls more than `max_pending` messages behind loses the oldest ones; KV-event
  consumers notice through event-id gaps and re-sync from a dump.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol


class EventPlane(Protocol):
    def publish(self, subject: str, payload: bytes) -> None: ...

    def subscribe(self, prefix: str) -> AsyncGenerator[tuple[str, bytes], None]: ...

    async def close(self) -> None: ...


def kv_events_subject(namespace: str, model: str, worker_id: int) -> str:
    return f"{namespace}.{model}.kv_events.{worker_id:x}"


def load_subject(namespace: str, model: str, worker_id: int) -> str:
    return f"{namespace}.{model}.load.{worker_id:x}"
