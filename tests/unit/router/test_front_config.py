"""Routing flags: validation, the settings they become, and the routing headers."""

from __future__ import annotations

import pytest

from turbine.config import FrontendConfig, parse_config
from turbine.errors import ConfigError, InvalidRequest
from turbine.router.front import RouteHints, RoutingSettings, route_hints

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--router-mode", "kv", "--router-queue-threshold", "0"], "must be positive"),
        (["--router-queue-threshold", "0.5"], "needs --router-mode kv"),
        (
            ["--router-mode", "kv", "--router-queue-threshold", "1", "--router-queue-policy", "sjf"],
            "not one of",
        ),
        (["--router-max-queued", "-1"], "must not be negative"),
        (["--router-session-affinity-ttl-secs", "0"], "must be positive"),
        (["--router-session-affinity-mode", "sticky"], "not one of"),
        (["--router-mode", "direct", "--router-session-affinity-ttl-secs", "5"], "does not apply"),
        (["--router-min-initial-workers", "-2"], "must not be negative"),
        (["--migration-max-seq-len", "0"], "at least 1"),
        (["--router-replica-sync", "--event-plane", "nats"], "or --router-session-affinity-ttl-secs"),
    ],
)
def test_invalid_routing_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(FrontendConfig, argv, {}, prog="t")


def test_flags_and_env_become_routing_settings() -> None:
    cfg = parse_config(
        FrontendConfig,
        ["--router-mode", "kv", "--router-queue-threshold", "0.8", "--router-queue-policy", "wspt"],
        {
            "TURBINE_ROUTER_MAX_QUEUED": "7",
            "TURBINE_ROUTER_SESSION_AFFINITY_TTL_SECS": "30",
            "TURBINE_ROUTER_SESSION_AFFINITY_MODE": "hard",
            "TURBINE_ROUTER_MIN_INITIAL_WORKERS": "2",
            "TURBINE_MIGRATION_MAX_SEQ_LEN": "4096",
        },
        prog="t",
    )
    settings = RoutingSettings.from_config(cfg)
    assert settings.queue is not None and settings.affinity is not None
    assert (settings.queue.threshold, settings.queue.policy, settings.queue.max_queued) == (0.8, "wspt", 7)
    assert (settings.affinity.ttl_s, settings.affinity.mode) == (30.0, "hard")
    assert (settings.min_initial_workers, settings.migration_max_seq_len, settings.direct) == (2, 4096, False)
    # Replica sync of session bindings alone works with any router mode.
    parse_config(
        FrontendConfig,
        ["--router-replica-sync", "--event-plane", "nats", "--router-session-affinity-ttl-secs", "5"],
        {},
        prog="t",
    )
    assert RoutingSettings.from_config(parse_config(FrontendConfig, [], {}, prog="t")) == RoutingSettings()


def test_route_hints_header_wins_over_user() -> None:
    assert route_hints({"x-session-id": "conv-1"}, "alice") == RouteHints("conv-1", None)
    assert route_hints({}, "alice") == RouteHints("alice", None)
    assert route_hints({"x-worker-instance-id": "0x1A2b"}, None) == RouteHints(None, 0x1A2B)
    assert route_hints({}, None) == RouteHints()
    with pytest.raises(InvalidRequest) as err:
        route_hints({"x-worker-instance-id": "worker-7"}, None)
    assert err.value.http_status == 400
