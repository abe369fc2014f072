import dataclasses
import json
from pathlib import Path

import pytest

from turbine.config import EngineOptions, FrontendConfig, UpConfig, WorkerConfig, config_to_json, parse_config
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
        (WorkerConfig, ["--q4-max-rows", "-1"], "q4-max-rows must not be negative"),
        (WorkerConfig, ["--cpu-kernels", "native"], "not one of"),
        (WorkerConfig, ["--guided-decoding-threads", "0"], "--guided-decoding-threads must be at least 1"),
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


def test_up_config_is_composed_of_the_frontends_and_the_engines(tmp_path: Path) -> None:
    engine_fields = {f.name for f in dataclasses.fields(EngineOptions)}
    assert set(UpConfig.__dataclass_fields__) == {
        *FrontendConfig.__dataclass_fields__,
        *engine_fields,
        "workers",
    }
    argv = ["--engine", "mocker", "--block-size", "16", "--http-port", "9000", "--namespace", "n"]
    up = parse_config(UpConfig, [*argv, "--dump-config-to", str(tmp_path / "c.json")], {}, prog="t")
    worker = up.worker_config()
    assert (worker.engine, worker.block_size, worker.namespace, worker.num_workers) == ("mocker", 16, "n", 2)
    assert worker.dump_config_to is None  # the workers would overwrite up's dump
    assert worker.drain_timeout_s == WorkerConfig().drain_timeout_s  # up's is the frontend's
    front = up.frontend_config()
    assert (front.http_port, front.namespace, front.dump_config_to) == (9000, "n", str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match="--block-size must be at least 1"):  # the worker's bound
        parse_config(UpConfig, ["--block-size", "0"], {}, prog="t")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-metrics-port", "0"], "--grpc-metrics-port 0 is out of range: must be within [1, 65535]"),
        (["--router-ttl-secs", "nan"], "--router-ttl-secs must be positive"),
        (["--max-request-body-bytes", "10"], "--max-request-body-bytes must be at least 1024"),
        (["--metrics-prefix", "a-b"], "--metrics-prefix 'a-b' is not a valid Prometheus metric name"),
    ],
)
def test_bounds_declared_on_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(FrontendConfig, argv, {}, prog="t")
    assert info.value.message == message


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model-type", "chat,images"],
            "--model-type 'chat,images' is not a comma-separated list of chat, completions, embedding",
        ),
        (
            ["--engine", "openai", "--upstream-url", "http://a:1", "--upstream-url", "b:2"],
            "--upstream-url 'b:2' is not an http(s):// URL",
        ),
        (
            [
                "--engine",
                "openai",
                "--upstream-url",
                "http://a:1",
                "--upstream-sampling-knobs",
                "logit_bias,typo",
            ],
            "--upstream-sampling-knobs 'logit_bias,typo' is not a comma-separated list of presence_penalty, "
            "frequency_penalty, repetition_penalty, logit_bias, bad_words, allowed_token_ids (or nothing)",
        ),
    ],
)
def test_worker_patterns_declared_on_the_option(argv: list[str], message: str) -> None:
    """A pattern checks each value of a repeatable flag, and a comma-separated list of names."""
    with pytest.raises(ConfigError) as info:
        parse_config(WorkerConfig, argv, {}, prog="t")
    assert info.value.message == message
    ok = parse_config(WorkerConfig, ["--model-type", " embedding , chat"], {}, prog="t")
    assert ok.model_types == ("embedding", "chat")
