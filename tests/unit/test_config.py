import json

import pytest

from turbine.config import FrontendConfig, UpConfig, WorkerConfig, config_to_json, parse_config
from turbine.errors import ConfigError

pytestmark = pytest.mark.unit


def test_defaults_follow_dynamo_names() -> None:
    cfg = parse_config(FrontendConfig, [], {}, prog="t")
    assert cfg.http_port == 8000
    assert cfg.router_mode == "round-robin"
    assert cfg.discovery_backend == "file"
    assert cfg.request_plane == "tcp"


def test_env_then_flag_precedence() -> None:
    env = {"TURBINE_HTTP_PORT": "9000", "TURBINE_ROUTER_MODE": "random", "TURBINE_LOG_JSON": "true"}
    cfg = parse_config(FrontendConfig, ["--http-port", "9100"], env, prog="t")
    assert cfg.http_port == 9100
    assert cfg.router_mode == "random"
    assert cfg.log_json is True


def test_boolean_flags_both_ways() -> None:
    assert (
        parse_config(WorkerConfig, ["--no-enable-prefix-caching"], {}, prog="t").enable_prefix_caching
        is False
    )
    env = {"TURBINE_ENABLE_PREFIX_CACHING": "0"}
    assert (
        parse_config(WorkerConfig, ["--enable-prefix-caching"], env, prog="t").enable_prefix_caching is True
    )
    with pytest.raises(ConfigError, match="not a boolean"):
        parse_config(WorkerConfig, [], {"TURBINE_ENABLE_PREFIX_CACHING": "maybe"}, prog="t")


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (FrontendConfig, ["--http-port", "0"], "out of range"),
        (FrontendConfig, ["--router-mode", "x"], "not one of"),
        (FrontendConfig, ["--model-path", "/nonexistent"], "not a directory"),
        (FrontendConfig, ["--namespace", "a/b"], "namespace"),
        (WorkerConfig, ["--num-workers", "0"], "at least 1"),
        (WorkerConfig, ["--eos-probability", "2"], "within"),
        (WorkerConfig, ["--model-type", "chat,images"], "model-type"),
        (UpConfig, ["--workers", "0"], "at least 1"),
    ],
)
def test_validation_messages(cls: type[FrontendConfig], argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, argv, {}, prog="t")


def test_config_dump_is_json_of_every_field() -> None:
    cfg = parse_config(FrontendConfig, ["--http-port", "1234"], {}, prog="t")
    dumped = json.loads(config_to_json(cfg))
    assert dumped["http_port"] == 1234
    assert set(dumped) == set(FrontendConfig.__dataclass_fields__)
