"""Session bindings: TTL refreshed on use, announcements to peers, workers leaving."""

from __future__ import annotations

import pytest

from turbine.router.affinity import AffinitySettings, Bound, SessionBindings

pytestmark = pytest.mark.unit


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_binding_lives_ttl_past_its_last_use() -> None:
    clock = _Clock()
    sessions = SessionBindings(AffinitySettings(10.0), clock)
    assert sessions.lookup("s") is None
    assert sessions.bind("s", 7) == Bound(7, announce=True)
    clock.now += 8
    assert sessions.lookup("s") == 7
    assert sessions.bind("s", 7) == Bound(7, announce=True)  # half the TTL passed: tell peers again
    clock.now += 1
    assert sessions.bind("s", 7) == Bound(7, announce=False)  # peers heard of it a second ago
    clock.now += 8
    assert sessions.lookup("s") == 7  # refreshed at +9, so alive at +17
    clock.now += 2.5
    assert sessions.lookup("s") is None
    assert len(sessions) == 0


def test_rebinding_to_another_worker_is_announced() -> None:
    sessions = SessionBindings(AffinitySettings(10.0, "hard"), _Clock())
    sessions.bind("s", 1)
    assert sessions.bind("s", 2) == Bound(2, announce=True)
    assert sessions.lookup("s") == 2


def test_worker_leaving_drops_its_sessions_and_peer_bindings_are_adopted() -> None:
    sessions = SessionBindings(AffinitySettings(5.0), _Clock())
    sessions.bind("a", 1)
    sessions.bind_from_peer("b", 1)
    sessions.bind("c", 2)
    assert sessions.lookup("b") == 1
    sessions.remove_worker(1)
    assert (sessions.lookup("a"), sessions.lookup("b"), sessions.lookup("c")) == (None, None, 2)


def test_expired_bindings_are_swept_on_bind() -> None:
    clock = _Clock()
    sessions = SessionBindings(AffinitySettings(1.0), clock)
    for i in range(5):
        sessions.bind(f"s{i}", i)
    clock.now += 2
    sessions.bind("new", 9)
    assert len(sessions) == 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        AffinitySettings(0.0)
    with pytest.raises(ValueError):
        AffinitySettings(1.0, "sticky")
