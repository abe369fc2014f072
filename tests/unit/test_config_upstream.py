"""Config of the upstream sidecar: repeatable flags, their environment form, validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from turbine.config import FrontendConfig, WorkerConfig, config_to_json, parse_config
from turbine.errors import ConfigError

pytestmark = pytest.mark.unit


def test_repeated_flags_and_comma_separated_env() -> None:
    cfg = parse_config(
        WorkerConfig,
        ["--engine", "openai", "--upstream-url", "http://a:1", "--upstream-url", "http://b:2/v1"],
        {"TURBINE_KV_EVENTS_ENDPOINT": "tcp://a:5557, none", "TURBINE_UPSTREAM_API_KEY": "k"},
        prog="t",
    )
    assert cfg.upstream_url == ("http://a:1", "http://b:2/v1")
    assert cfg.kv_events_endpoint == ("tcp://a:5557", "none")
    assert '"upstream_api_key": "<redacted>"' in config_to_json(cfg)
    env_only = parse_config(
        WorkerConfig, ["--engine", "openai"], {"TURBINE_UPSTREAM_URL": "http://x:1"}, prog="t"
    )
    assert env_only.upstream_url == ("http://x:1",)
    assert parse_config(WorkerConfig, [], {}, prog="t").upstream_url == ()


def test_the_workers_old_upstream_spelling_works_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A worker's --upstream URL (now --upstream-url; the frontend's --upstream is MODEL=URL)."""
    argv = ["--engine", "openai", "--upstream", "http://a:1", "--upstream", "http://b:2"]
    with caplog.at_level(logging.WARNING, logger="turbine.config"):
        cfg = parse_config(WorkerConfig, argv, {}, prog="t")
    assert cfg.upstream_url == ("http://a:1", "http://b:2")
    assert [r.getMessage() for r in caplog.records] == [
        "--upstream is deprecated: use --upstream-url (the old spelling stops working in a later release)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="turbine.config"):
        mixed = parse_config(
            WorkerConfig, [*argv[:2], "--upstream-url", "http://c:3", *argv[2:4]], {}, prog="t"
        )
        from_env = parse_config(
            WorkerConfig, ["--engine", "openai"], {"TURBINE_UPSTREAM": "http://x:1"}, prog="t"
        )
    assert mixed.upstream_url == ("http://c:3", "http://a:1")
    assert from_env.upstream_url == ("http://x:1",)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "--upstream is deprecated",
        "TURBINE_UPSTREAM is deprecated",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="turbine.config"):  # the new spelling wins, silently
        new = parse_config(
            WorkerConfig,
            [*argv[:2], "--upstream-url", "http://c:3"],
            {"TURBINE_UPSTREAM": "http://x:1"},
            prog="t",
        )
    assert new.upstream_url == ("http://c:3",)
    assert caplog.records == []


BASE = ("--engine", "openai", "--upstream-url", "http://a:1")


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "openai"],  # no upstream
        ["--upstream-url", "http://a:1"],  # upstream without the engine
        ["--engine", "openai", "--upstream-url", "a:1"],  # not a URL
        [*BASE, "--upstream-mode", "binary"],
        [*BASE, "--upstream-dp-size", "0"],
        [*BASE, "--kv-events-endpoint", "tcp://a:1", "--kv-events-endpoint", "tcp://b:1"],
        [*BASE, "--kv-replay-endpoint", "tcp://a:2"],
    ],
)
def test_worker_rejects(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_config(WorkerConfig, argv, {}, prog="t")


def test_frontend_upstream_needs_model_and_url(tmp_path: object) -> None:
    with pytest.raises(ConfigError):
        parse_config(FrontendConfig, ["--upstream", "http://a:1"], {}, prog="t")
    with pytest.raises(ConfigError):  # no --model-path for the tokenizer
        parse_config(FrontendConfig, ["--upstream", "m=http://a:1"], {}, prog="t")
    cfg = parse_config(
        FrontendConfig, ["--upstream", "m=http://a:1", "--model-path", str(tmp_path)], {}, prog="t"
    )
    assert cfg.upstream == ("m=http://a:1",)


def test_upstream_file_adds_to_the_flags(tmp_path: Path) -> None:
    listing = tmp_path / "ups.txt"
    listing.write_text("# comment\na=http://127.0.0.1:1\n\nb=http://127.0.0.1:2 # trailing\n")
    args = [
        "--model-path",
        str(tmp_path),
        "--upstream",
        "c=http://127.0.0.1:3",
        "--upstream-file",
        str(listing),
    ]
    cfg = parse_config(FrontendConfig, args, {}, prog="t")
    assert cfg.upstreams == ("c=http://127.0.0.1:3", "a=http://127.0.0.1:1", "b=http://127.0.0.1:2")
    listing.write_text("not-a-spec\n")
    with pytest.raises(ConfigError, match="not MODEL="):
        parse_config(
            FrontendConfig, ["--model-path", str(tmp_path), "--upstream-file", str(listing)], {}, prog="t"
        )
    with pytest.raises(ConfigError, match="cannot be read"):
        parse_config(FrontendConfig, ["--upstream-file", str(tmp_path / "nowhere")], {}, prog="t")


def test_upstream_sampling_knobs_are_declared_by_flag_or_env() -> None:
    default = parse_config(WorkerConfig, list(BASE), {}, prog="t")
    assert default.upstream_knobs == (
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
    )
    vllm = parse_config(
        WorkerConfig,
        list(BASE),
        {"TURBINE_UPSTREAM_SAMPLING_KNOBS": "presence_penalty, bad_words,allowed_token_ids"},
        prog="t",
    )
    assert vllm.upstream_knobs == ("presence_penalty", "bad_words", "allowed_token_ids")
    none = parse_config(WorkerConfig, [*BASE, "--upstream-sampling-knobs", ""], {}, prog="t")
    assert none.upstream_knobs == ()
    with pytest.raises(ConfigError, match="best_of"):
        parse_config(WorkerConfig, [*BASE, "--upstream-sampling-knobs", "best_of"], {}, prog="t")


def test_upstream_guided_decoding_names_the_servers_dialect() -> None:
    assert parse_config(WorkerConfig, list(BASE), {}, prog="t").upstream_guided_decoding == "none"
    env = {"TURBINE_UPSTREAM_GUIDED_DECODING": "llama.cpp"}
    assert parse_config(WorkerConfig, list(BASE), env, prog="t").upstream_guided_decoding == "llama.cpp"
    front = ["--upstream", "m=http://a:1", "--model-path", ".", "--upstream-guided-decoding", "vllm"]
    assert parse_config(FrontendConfig, front, {}, prog="t").upstream_guided_decoding == "vllm"
    with pytest.raises(ConfigError, match="not one of"):
        parse_config(WorkerConfig, [*BASE, "--upstream-guided-decoding", "tgi"], {}, prog="t")


def test_a_gguf_file_is_a_model_path_for_upstreams(tmp_path: Path) -> None:
    gguf = tmp_path / "m.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = parse_config(WorkerConfig, [*BASE, "--model-path", str(gguf)], {}, prog="t")
    assert cfg.is_gguf
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(WorkerConfig, [*BASE, "--model-path", str(tmp_path / "gone.gguf")], {}, prog="t")
    with pytest.raises(ConfigError, match="not a directory"):  # the mocker needs a directory
        parse_config(WorkerConfig, ["--engine", "mocker", "--model-path", str(gguf)], {}, prog="t")
    front = parse_config(
        FrontendConfig, ["--upstream", "m=http://a:1", "--model-path", str(gguf)], {}, prog="t"
    )
    assert front.model_path == str(gguf)
    with pytest.raises(ConfigError, match="not a directory"):  # a GGUF is for --upstream only
        parse_config(FrontendConfig, ["--model-path", str(gguf)], {}, prog="t")
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(
            FrontendConfig,
            ["--upstream", "m=http://a:1", "--model-path", str(tmp_path / "x.gguf")],
            {},
            prog="t",
        )
