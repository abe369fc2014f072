import json
from pathlib import Path

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
        (WorkerConfig, ["--q4-max-rows", "-1"], "q4-max-rows must be at least 0"),
        (WorkerConfig, ["--cpu-kernels", "native"], "not one of"),
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


def test_parser_and_scripted_engine_flags(tmp_path: Path) -> None:
    script = tmp_path / "reply.txt"
    script.write_text("hi")
    worker = parse_config(
        WorkerConfig,
        ["--engine", "scripted", "--script-file", str(script), "--tool-call-parser", "hermes"],
        {"TURBINE_REASONING_PARSER": "qwen3"},
        prog="t",
    )
    assert (worker.tool_call_parser, worker.reasoning_parser, worker.script_file) == (
        "hermes",
        "qwen3",
        str(script),
    )
    frontend = parse_config(
        FrontendConfig,
        ["--reasoning-field-name", "reasoning", "--exclude-tools-when-tool-choice-none"],
        {"TURBINE_TOOL_CALL_PARSER": "mistral"},
        prog="t",
    )
    assert (frontend.reasoning_field_name, frontend.exclude_tools_when_tool_choice_none) == (
        "reasoning",
        True,
    )
    assert (frontend.tool_call_parser, frontend.reasoning_parser) == ("mistral", None)
    for cls, argv in (
        (WorkerConfig, ["--engine", "scripted"]),
        (WorkerConfig, ["--engine", "scripted", "--script-file", str(tmp_path / "missing")]),
        (WorkerConfig, ["--reasoning-parser", "nope"]),
        (FrontendConfig, ["--reasoning-field-name", "thoughts"]),
    ):
        with pytest.raises(ConfigError):
            parse_config(cls, argv, {}, prog="t")
