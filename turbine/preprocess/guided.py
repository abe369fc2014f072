"""Structured-output fields of a request → one `GuidedDecoding` (or None), checked for shape.

The spellings accepted, all meaning the same few constraints:
- OpenAI's `response_format`: `text` (none), `json_object`, `json_schema` (`json_schema.schema`,
  `strict` a boolean: the schema is enforced either way).
- vLLM's `structured_outputs`: exactly one of `json` (a schema, object or JSON text), `json_object`
  (true), `regex`, `choice` (a list of strings), `grammar` (Lark or GBNF text).
- vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.

At most one of these may be given. Whether the schema or grammar compiles is checked later, by the
grammar library (`turbine.engines.grammar`), and whether the model's engine can enforce it by the
frontend against the model card.
"""

from __future__ import annotations

import json
from typing import Any

from turbine.errors import InvalidRequest
from turbine.protocol.openai import ChatCompletionRequest, CompletionRequest
from turbine.protocol.request import GuidedDecoding

ANY_OBJECT = '{"type": "object"}'
_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_STRUCTURED_OPTIONS = ("json_object",)


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{param} {what}", param=param, code="invalid_value")


def _schema_text(value: object, param: str) -> str:
    """A JSON schema given as an object or as its JSON text, as canonical JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(param, "must be a JSON schema (an object or its JSON text)") from None
    if not isinstance(value, dict | bool):
        raise _bad(param, "must be a JSON schema (an object or its JSON text)")
    return json.dumps(value, ensure_ascii=False)


def _text(value: object, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(param, "must be a non-empty string")
    return value


def _choices(value: object, param: str) -> str:
    if not isinstance(value, list) or not value or any(not isinstance(c, str) or not c for c in value):
        raise _bad(param, "must be a non-empty list of non-empty strings")
    return json.dumps(value, ensure_ascii=False)


def _of_kind(kind: str, value: object, param: str) -> GuidedDecoding:
    if kind == "json_schema":
        return GuidedDecoding(kind, _schema_text(value, param), param)
    if kind == "choice":
        return GuidedDecoding(kind, _choices(value, param), param)
    return GuidedDecoding(kind, _text(value, param), param)


def response_format(value: dict[str, Any] | None, param: str = "response_format") -> GuidedDecoding | None:
    """OpenAI's `response_format` (and the same shape under other names: Responses' `text.format`
    after flattening, Anthropic's `output_config.format`)."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding("json_schema", ANY_OBJECT, param)
    if kind != "json_schema":
        raise _bad(param, "type must be one of 'text', 'json_object', 'json_schema'")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad(f"{param}.json_schema", "is required: {'name': ..., 'schema': {...}, 'strict': ...}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(f"{param}.json_schema.strict", "must be a boolean")
    schema = spec.get("schema")
    if schema is None:
        return GuidedDecoding("json_schema", ANY_OBJECT, param)
    checked = _of_kind("json_schema", schema, f"{param}.json_schema.schema")
    return GuidedDecoding(checked.kind, checked.spec, param)


def _structured_outputs(value: dict[str, Any]) -> GuidedDecoding | None:
    param = "structured_outputs"
    unknown = [k for k in value if k not in _STRUCTURED_KEYS and k not in _STRUCTURED_OPTIONS]
    if unknown:
        raise InvalidRequest(
            f"{param}.{unknown[0]} is not supported (supported: json, json_object, regex, choice, grammar)",
            param=f"{param}.{unknown[0]}",
            code="unsupported_value",
        )
    given = [k for k in _STRUCTURED_KEYS if value.get(k) is not None]
    if value.get("json_object"):
        given.append("json_object")
    if len(given) > 1:
        raise _bad(param, f"must set exactly one of json, json_object, regex, choice, grammar (got {given})")
    if not given:
        return None
    key = given[0]
    if key == "json_object":
        return GuidedDecoding("json_schema", ANY_OBJECT, f"{param}.json_object")
    return _of_kind(_STRUCTURED_KEYS[key], value[key], f"{param}.{key}")


def structured_output(
    req: ChatCompletionRequest | CompletionRequest, format_param: str = "response_format"
) -> GuidedDecoding | None:
    """The request's one output constraint, whichever spelling it came in (`format_param`: the name
    the client gave `response_format`, for errors)."""
    found: list[GuidedDecoding] = []
    if isinstance(req, ChatCompletionRequest):
        rf = response_format(req.response_format, format_param)
        if rf is not None:
            found.append(rf)
    if req.structured_outputs is not None:
        so = _structured_outputs(req.structured_outputs)
        if so is not None:
            found.append(so)
    legacy = (
        ("json_schema", req.guided_json, "guided_json"),
        ("regex", req.guided_regex, "guided_regex"),
        ("choice", req.guided_choice, "guided_choice"),
        ("grammar", req.guided_grammar, "guided_grammar"),
    )
    found += [_of_kind(kind, value, param) for kind, value, param in legacy if value is not None]
    if len(found) > 1:
        names = ", ".join(g.param.split(".")[0] for g in found)
        raise InvalidRequest(
            f"only one output constraint may be given, got {names}", param=found[1].param.split(".")[0]
        )
    return found[0] if found else None
