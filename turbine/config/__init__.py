"""Configuration: frozen dataclasses parsed once from argv and `TURBINE_*` environment variables.

This package is the only code that reads argv or the environment. Every field is a flag
(`--http-port`) and an environment variable (`TURBINE_HTTP_PORT`); a flag wins over the environment,
which wins over the default. The field's `help` is the flag's help text. Each field declares its own
rules (choices, bounds, pattern) with `opt`; each config's `validate` holds the rules across fields.
Both run here, once, and fail with one clear `ConfigError` line.

- `options.py`: `opt` and the machinery (flags, variables, checks, dumps) every config shares.
- `runtime.py`: `RuntimeConfig`, what every process reads (discovery, planes, TLS, logs).
- `frontend.py`: `FrontendConfig`; `worker.py`: `EngineOptions` and `WorkerConfig`.
- `up.py`: `UpConfig`, composed of the frontend's options and the engine's.
"""

from turbine.config.frontend import FrontendConfig
from turbine.config.options import (
    ENV_PREFIX,
    build_parser,
    check_options,
    config_from_cli,
    config_to_env,
    config_to_json,
    env_name,
    flag_name,
    opt,
    parse_config,
)
from turbine.config.runtime import RuntimeConfig
from turbine.config.up import UP_WORKER_FIELDS, UpConfig
from turbine.config.worker import EngineOptions, WorkerConfig

__all__ = [
    "ENV_PREFIX",
    "UP_WORKER_FIELDS",
    "EngineOptions",
    "FrontendConfig",
    "RuntimeConfig",
    "UpConfig",
    "WorkerConfig",
    "build_parser",
    "check_options",
    "config_from_cli",
    "config_to_env",
    "config_to_json",
    "env_name",
    "flag_name",
    "opt",
    "parse_config",
]
