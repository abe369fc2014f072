"""The EventPlane seam: fire-and-forget publish, prefix subscriptions.

Contract:
- `publish(subject, payload)` never blocks and never fails because of a slow subscriber or a lost
  broker connection; messages of one publisher on one subject reach each subscriber in publish order.
- `subscribe(prefix, on_live)` is an async generator of `(subject, payload)` for every message
  published after the subscription started on a subject starting with `prefix`. Close it to
  unsubscribe. `prefix` is empty or ends with `.` (a broker matches whole tokens only).
- `on_live`, if given, is called on the event loop once the subscription receives everything
  published from then on, and again each time it resumes after messages may have been lost (a
  broker reconnect). Consumers that keep state derived from the stream re-sync there.
- Subjects are `.`-separated tokens: `{namespace}.{model}.kv_events.{worker_id:x}`,
  `....load.{worker_id:x}`. Names are escaped with `subject_token` so that a model called
  `org/model-1.5 chat` is one safe token on every plane.
- A subscriber that falls more than `max_pending` messages behind loses the oldest ones; KV-event
  consumers notice through event-id gaps and re-sync from a dump.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Protocol

OnLive = Callable[[], None]


class EventPlane(Protocol):
    def publish(self, subject: str, payload: bytes) -> None: ...

    def subscribe(
        self, prefix: str, on_live: OnLive | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]: ...

    async def close(self) -> None: ...


# Letters, digits, '-' and '_' stay as they are; every other byte of the UTF-8 encoding becomes
# `%XX`. NATS forbids '.', '*', '>' and whitespace in tokens and reserves a leading '$', so this
# keeps common names readable while no name can split a subject or act as a wildcard.
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_EMPTY_TOKEN = "%"  # tokens may not be empty; a lone '%' is never produced by escaping


def subject_token(name: str) -> str:
    """`name` as one subject token, reversibly (`token_name` undoes it)."""
    if not name:
        return _EMPTY_TOKEN
    raw = name.encode()
    if all(b in _SAFE for b in raw):
        return name
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def token_name(token: str) -> str:
    """The name `subject_token` escaped into `token`; ValueError if it is not such a token."""
    if token == _EMPTY_TOKEN:
        return ""
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            hex_ = token[i + 1 : i + 3]
            if len(hex_) != 2 or not all(c in "0123456789ABCDEF" for c in hex_):
                raise ValueError(f"bad escape in subject token {token!r}")
            out.append(int(hex_, 16))
            i += 3
        else:
            if ord(ch) >= 128 or ord(ch) not in _SAFE:
                raise ValueError(f"unescaped character {ch!r} in subject token {token!r}")
            out.append(ord(ch))
            i += 1
    return out.decode()


def model_subject_prefix(namespace: str, model: str) -> str:
    """The prefix of every subject about one model: subscribe to it to hear all its workers."""
    return f"{subject_token(namespace)}.{subject_token(model)}."


def kv_events_subject(namespace: str, model: str, worker_id: int) -> str:
    return f"{model_subject_prefix(namespace, model)}{KV_EVENTS_KIND}.{worker_id:x}"


def load_subject(namespace: str, model: str, worker_id: int) -> str:
    return f"{model_subject_prefix(namespace, model)}{LOAD_KIND}.{worker_id:x}"


KV_EVENTS_KIND = "kv_events"
LOAD_KIND = "load"


def subject_kind(subject: str) -> str:
    """The kind token of a per-worker subject (`kv_events`, `load`), or "" for other shapes."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 else ""
