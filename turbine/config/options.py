"""The machinery of the configs: `opt` declares a field with its help and its own rules (choices,
bounds, pattern), and the same declarations make the flags, read the `TURBINE_*` variables, check
the values and write them back (for child processes and --dump-config-to)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from turbine.errors import ConfigError

if TYPE_CHECKING:
    from turbine.config.runtime import RuntimeConfig

log = logging.getLogger("turbine.config")

ENV_PREFIX = "TURBINE_"
# The few fields that also take a short flag.
SHORT_FLAGS = {"interactive": "-i"}

C = TypeVar("C", bound="RuntimeConfig")


def opt(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    off: float | None = None,
    pattern: tuple[str, str] | None = None,
    secret: bool = False,
    cli: bool = True,
    renamed_from: str | None = None,
) -> Any:
    """A config field: its default, help text, and its own rules, which `check_options` applies to
    every value (None, the unset value of an optional field, passes them all):
    `choices`: the allowed values; `min`/`max`: inclusive bounds; `above`: an exclusive lower bound;
    `off`: a value that turns the option off and need not meet the bounds; `pattern`: (regular
    expression the whole value matches, what it is in words). `secret`: redacted in dumps. `cli`:
    False for a setting one process hands another, which is no flag (only its variable).
    `renamed_from`: the field's old name, whose flag and variable still work with a warning."""
    rules = {"choices": choices, "min": min, "above": above, "max": max, "off": off, "pattern": pattern}
    flags = {"secret": secret, "cli": cli, "renamed_from": renamed_from}
    return dataclasses.field(default=default, metadata={"help": help, **flags, **rules})


def check_options(cfg: RuntimeConfig) -> None:
    """Each field's own rules, declared with `opt` (ConfigError naming the first it breaks)."""
    for field in dataclasses.fields(cfg):
        value, rules = getattr(cfg, field.name), field.metadata
        if value is None or value == rules.get("off"):
            continue
        flag, pattern = flag_name(field.name), rules.get("pattern")
        for item in value if isinstance(value, tuple) else (value,):  # a repeatable flag: each value
            if pattern is not None and not re.fullmatch(pattern[0], item):
                raise ConfigError(f"{flag} {item!r} is not {pattern[1]}")
        low, above, high = rules.get("min"), rules.get("above"), rules.get("max")
        # `not` of the comparisons that hold, so that NaN fails them all.
        if not (
            (low is None or value >= low)
            and (above is None or value > above)
            and (high is None or value <= high)
        ):
            raise ConfigError(_bound_message(flag, value, low, above, high, rules.get("off")))


def _bound_message(
    flag: str, value: object, low: float | None, above: float | None, high: float | None, off: float | None
) -> str:
    if high is not None:
        start = f"[{low:g}" if low is not None else f"({above:g}"
        return f"{flag} {value} is out of range: must be within {start}, {high:g}]"
    if off is not None:
        return f"{flag} must be {off:g} (off) or at least {low:g}"
    if above is not None:
        return f"{flag} must be positive" if above == 0 else f"{flag} must be above {above:g}"
    assert low is not None
    return f"{flag} must not be negative" if low == 0 else f"{flag} must be at least {low:g}"


def comma_list(names: Sequence[str], *, empty: bool = False) -> tuple[str, str]:
    """A `pattern` for a comma-separated list of `names` (at least one unless `empty`)."""
    one = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    some = rf"\s*{one}(?:\s*,\s*{one})*\s*"
    words = "a comma-separated list of " + ", ".join(names)
    return (f"(?:{some})?" if empty else some), words + (" (or nothing)" if empty else "")


def flag_name(name: str) -> str:
    """The flag of a field: `--http-port` for http_port."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable of a field: `TURBINE_HTTP_PORT` for http_port."""
    return ENV_PREFIX + name.upper()


def _field_type(field: dataclasses.Field[Any]) -> type:
    text = str(field.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("tuple", tuple)):
        if text.startswith(name):
            return kind
    return str


def _convert(kind: type, raw: str, source: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}={raw!r} is not a boolean")
    if kind is tuple:  # repeatable flags; in the environment, comma-separated
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {kind.__name__}") from None


def build_parser(cls: type[C], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue  # set by a parent process, through the environment only
        _add_flag(parser, field, field.name, f"{field.metadata['help']} [env {env_name(field.name)}]")
        if field.metadata.get("renamed_from"):
            _add_flag(parser, field, field.metadata["renamed_from"], argparse.SUPPRESS)
    return parser


def _add_flag(parser: argparse.ArgumentParser, field: dataclasses.Field[Any], name: str, help: str) -> None:
    kind = _field_type(field)
    flags = [flag_name(name), *([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])]
    if kind is bool:
        parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help)
    elif kind is tuple:
        parser.add_argument(*flags, dest=name, action="append", default=None, help=help)
    else:
        parser.add_argument(*flags, dest=name, type=str, default=None, metavar=name.upper(), help=help)


def _given(field: dataclasses.Field[Any], args: Mapping[str, Any], env: Mapping[str, str]) -> tuple[str, Any]:
    """(where, raw value) of a field: its flag, else its variable, else ("", None). A renamed
    field's old spelling counts after the new one, with a warning; repeated flags of both add up."""
    old = field.metadata.get("renamed_from")
    names = (field.name, old) if old else (field.name,)
    flags = [(flag_name(name), args[name]) for name in names if args.get(name) is not None]
    variables = [(env_name(name), env[env_name(name)]) for name in names if env_name(name) in env]
    found = [*flags, *variables]
    used = flags if flags and _field_type(field) is tuple else found[:1]
    deprecated = [source for source, _ in used if old and source in (flag_name(old), env_name(old))]
    if deprecated:
        log.warning(
            "%s is deprecated: use %s (the old spelling stops working in a later release)",
            deprecated[0],
            flag_name(field.name) if deprecated[0].startswith("--") else env_name(field.name),
        )
    if len(used) > 1:  # the new and the old flag of a repeatable field
        return used[0][0], [item for _, raw in used for item in raw]
    return used[0] if used else ("", None)


def parse_config(
    cls: type[C], argv: Sequence[str], env: Mapping[str, str], *, prog: str, description: str = ""
) -> C:
    """Parse and validate; raises ConfigError (argparse itself exits 2 on unknown flags)."""
    args = vars(build_parser(cls, prog, description).parse_args(list(argv)))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = _field_type(field)
        source, raw = _given(field, args, env)
        if raw is None:
            continue
        if source.startswith("--"):
            values[field.name] = (
                tuple(raw) if kind is tuple else raw if kind is bool else _convert(kind, raw, source)
            )
        else:
            values[field.name] = _convert(kind, raw, source)
        choices = field.metadata.get("choices")
        if choices and values[field.name] not in choices:
            raise ConfigError(f"{source} {values[field.name]!r} is not one of: {', '.join(choices)}")
    cfg = cls(**values)
    check_options(cfg)
    cfg.validate()
    return cfg


def config_to_env(cfg: RuntimeConfig, names: Collection[str] | None = None) -> dict[str, str | None]:
    """Every field (or those of `names`) as its `TURBINE_*` variable, for a child process that must
    resolve the same config (None: unset it, the field's default). Env rather than argv keeps
    secrets off `ps`."""
    out: dict[str, str | None] = {}
    for field in dataclasses.fields(cfg):
        if names is not None and field.name not in names:
            continue
        value = getattr(cfg, field.name)
        if isinstance(value, tuple):  # repeatable flags: comma-separated in the environment
            out[env_name(field.name)] = ",".join(value) if value else None
        elif isinstance(value, bool):
            out[env_name(field.name)] = str(value).lower()
        else:
            out[env_name(field.name)] = None if value is None else str(value)
    return out


def config_to_json(cfg: RuntimeConfig) -> str:
    """The resolved config, secrets redacted, for --dump-config-to."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        out[field.name] = "<redacted>" if field.metadata.get("secret") and value else value
    return json.dumps(out, indent=2, sort_keys=True)


def config_from_cli(cls: type[C], argv: Sequence[str] | None, *, prog: str, description: str) -> C | None:
    """Parse the process's flags and environment for an entry point; on a config error print one
    clear line to stderr and return None (the caller exits 2). Also writes --dump-config-to."""
    try:
        cfg = parse_config(
            cls, sys.argv[1:] if argv is None else argv, os.environ, prog=prog, description=description
        )
    except ConfigError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return None
    if cfg.dump_config_to:
        Path(cfg.dump_config_to).write_text(config_to_json(cfg) + "\n")
    return cfg
