"""The frontend's flags become one PipelineSettings, which the registry and every pipeline read."""

from __future__ import annotations

from pathlib import Path

import pytest

from turbine.config import FrontendConfig, parse_config
from turbine.frontend.pipeline import PipelineSettings
from turbine.postprocess.parsers.output import ParserSettings
from turbine.router.front import RoutingSettings
from turbine.router.health import HealthSettings

pytestmark = pytest.mark.unit


def test_flags_become_the_settings_of_every_model(tmp_path: Path) -> None:
    cfg = parse_config(
        FrontendConfig,
        [
            "--namespace",
            "prod",
            "--model-name",
            "m",
            "--model-path",
            str(tmp_path),
            "--migration-limit",
            "3",
            "--tokenizer-cache-entries",
            "64",
            "--exclude-tools-when-tool-choice-none",
            "--tool-call-parser",
            "hermes",
            "--request-stall-timeout-s",
            "5",
            "--router-min-initial-workers",
            "2",
        ],
        {},
        prog="t",
    )
    settings = PipelineSettings.from_config(cfg, replica_id=7)
    assert settings == PipelineSettings(
        namespace="prod",
        only_model="m",
        model_path_override=str(tmp_path),
        migration_limit=3,
        tokenizer_cache_entries=64,
        exclude_tools_when_tool_choice_none=True,
        parser_overrides=ParserSettings("hermes", None),
        routing=RoutingSettings.from_config(cfg),
        health=HealthSettings(5.0, 0.0, 10.0),
        replica_id=7,
    )
    assert settings.routing.min_initial_workers == 2


def test_defaults_serve_every_model_of_the_namespace_as_the_cards_say() -> None:
    settings = PipelineSettings.from_config(parse_config(FrontendConfig, [], {}, prog="t"))
    assert settings.only_model is None and settings.model_path_override is None
    assert settings.parser_overrides == ParserSettings()
    assert settings.replica_id is None
