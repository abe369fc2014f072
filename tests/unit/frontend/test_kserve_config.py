"""`--kserve-grpc-server` / `--grpc-port` flags and their validation."""

from __future__ import annotations

import pytest

from turbine.config import FrontendConfig, parse_config
from turbine.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_and_env() -> None:
    cfg = parse_config(FrontendConfig, [], {}, prog="t")
    assert (cfg.kserve_grpc_server, cfg.grpc_port) == (False, 8001)
    env = {"TURBINE_KSERVE_GRPC_SERVER": "1", "TURBINE_GRPC_PORT": "9001"}
    cfg = parse_config(FrontendConfig, [], env, prog="t")
    assert (cfg.kserve_grpc_server, cfg.grpc_port) == (True, 9001)
    cfg = parse_config(FrontendConfig, ["--no-kserve-grpc-server", "--grpc-port", "9002"], env, prog="t")
    assert (cfg.kserve_grpc_server, cfg.grpc_port) == (False, 9002)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port", "0"], "--grpc-port 0 is out of range"),
        (["--grpc-port", "70000"], "out of range"),
        (["--kserve-grpc-server", "--grpc-port", "8000", "--http-port", "8000"], "must differ"),
    ],
)
def test_invalid(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(FrontendConfig, argv, {}, prog="t")
