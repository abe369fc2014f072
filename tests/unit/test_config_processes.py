"""--num-processes: parsing, the combinations it refuses, and the config children get back."""

import os

import pytest

from turbine.config import FrontendConfig, UpConfig, config_to_env, parse_config
from turbine.errors import ConfigError

pytestmark = pytest.mark.unit


def test_default_is_one_process() -> None:
    cfg = parse_config(FrontendConfig, [], {}, prog="t")
    assert cfg.num_processes == "1"
    assert cfg.process_count == 1
    assert cfg.frontend_process_dir is None


def test_counts_and_auto() -> None:
    assert parse_config(FrontendConfig, ["--num-processes", "4"], {}, prog="t").process_count == 4
    auto = parse_config(FrontendConfig, [], {"TURBINE_NUM_PROCESSES": "auto"}, prog="t")
    assert auto.process_count == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-processes", "0"], "not a positive integer or auto"),
        (["--num-processes", "two"], "not a positive integer or auto"),
        (["--num-processes", "-1"], "not a positive integer or auto"),
        (["--num-processes", "2", "--event-plane", "zmq"], "needs --event-plane request or nats"),
        (["--num-processes", "2", "--discovery-backend", "mem"], "shared discovery store"),
        (["--num-processes", "2", "--interactive"], "--interactive runs in one process"),
    ],
)
def test_refused_combinations(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(FrontendConfig, argv, {}, prog="t")
    with pytest.raises(ConfigError, match=message):
        parse_config(UpConfig, ["--engine", "mocker", *argv], {}, prog="t")


def test_the_process_dir_is_set_through_the_environment_only() -> None:
    env = {"TURBINE_FRONTEND_PROCESS_DIR": "/tmp/x"}
    assert parse_config(FrontendConfig, [], env, prog="t").frontend_process_dir == "/tmp/x"
    with pytest.raises(ConfigError, match="TURBINE_FRONTEND_PROCESS_DIR is for the children"):
        parse_config(FrontendConfig, ["--num-processes", "2"], env, prog="t")
    with pytest.raises(SystemExit):  # no such flag
        parse_config(FrontendConfig, ["--frontend-process-dir", "/tmp/x"], {}, prog="t")


def test_config_round_trips_through_the_environment() -> None:
    cfg = parse_config(
        FrontendConfig,
        [
            "--http-port", "9123", "--router-mode", "kv", "--no-kv-events", "--router-temperature", "0.25",
            "--router-queue-threshold", "1.5", "--num-processes", "3", "--nats-server", "nats://u:secret@h:4222",
        ],
        {},
        prog="t",
    )  # fmt: skip
    env = {k: v for k, v in config_to_env(cfg).items() if v is not None}
    assert "TURBINE_MODEL_NAME" not in env  # None: left to the default
    assert parse_config(FrontendConfig, [], env, prog="t") == cfg
