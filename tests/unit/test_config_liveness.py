"""`--request-stall-timeout-s` (frontends and workers), `--health-check-interval-s` and
`--health-check-timeout-s` (frontends)."""

import pytest

from turbine.config import FrontendConfig, WorkerConfig, parse_config
from turbine.errors import ConfigError

pytestmark = pytest.mark.unit


def test_stall_timeout_defaults_and_env() -> None:
    assert parse_config(FrontendConfig, [], {}, prog="t").request_stall_timeout_s == 10.0
    env = {"TURBINE_REQUEST_STALL_TIMEOUT_S": "0"}
    assert parse_config(WorkerConfig, [], env, prog="t").request_stall_timeout_s == 0.0
    cfg = parse_config(FrontendConfig, [], {}, prog="t")
    assert (cfg.health_check_interval_s, cfg.health_check_timeout_s) == (0.0, 10.0)


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (WorkerConfig, ["--request-stall-timeout-s", "0.5"], "0 \\(off\\) or at least 1"),
        (FrontendConfig, ["--request-stall-timeout-s", "-1"], "0 \\(off\\) or at least 1"),
        (FrontendConfig, ["--request-stall-timeout-s", "nan"], "0 \\(off\\) or at least 1"),
        (FrontendConfig, ["--health-check-interval-s", "-1"], "must not be negative"),
        (FrontendConfig, ["--health-check-interval-s", "nan"], "must not be negative"),
        (FrontendConfig, ["--health-check-timeout-s", "0"], "must be positive"),
    ],
)
def test_bad_values_are_refused(
    cls: type[FrontendConfig | WorkerConfig], argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, argv, {}, prog="t")
