"""The frontend's HTTP routes as an OpenAPI 3.0 document, served at `GET /openapi.json`.

The schemas are generated from the msgspec structs the routes decode and answer
(`protocol/openai.py`). This module adds only what a struct cannot say: the routes, their error
responses and descriptions, and the ranges the preprocessor validates (cross-field rules such as
`min_tokens <= max_tokens` and the model's context length cannot be said in a schema; breaking them
is a 400). Fields decoded only to be refused (`UNBUILT_*`) are left out. Unknown request fields are
ignored by the server, so request objects allow additional properties.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import orjson
from aiohttp import web

from turbine.frontend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from turbine.preprocess.preprocessor import (
    CHAT_ROLES,
    MAX_BATCH_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_TOP_LOGPROBS,
    SEED_MAX,
    SEED_MIN,
)
from turbine.protocol.openai import (
    UNBUILT_CHAT,
    UNBUILT_COMPLETION,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Error,
    ModelList,
)

_REF = "#/components/schemas/{name}"

# Keywords merged into a field's generated schema, per struct.
_NON_EMPTY = {"minLength": 1}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_SAMPLING: dict[str, dict[str, Any]] = {
    "model": {"description": "A model served by a live worker (see `/v1/models`)."},
    "max_tokens": {"minimum": 1},
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"minimum": 0, "exclusiveMinimum": True, "maximum": 1},
    "seed": {"minimum": SEED_MIN, "maximum": SEED_MAX},
    "stop": {**_NON_EMPTY, "items": _NON_EMPTY},
    "n": {"minimum": 1, "maximum": MAX_N},
    "top_k": {"minimum": -1, "description": "-1 or 0: disabled."},
    "min_p": {"minimum": 0, "maximum": 1},
    "min_tokens": {"minimum": 0},
    "stop_token_ids": {"items": {"minimum": 0}, "description": "Ids below the vocab size."},
    # Honoured by engines whose card lists them (the torch engine: all); others answer 400.
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "repetition_penalty": {"minimum": 0, "exclusiveMinimum": True},
    "logit_bias": {
        "additionalProperties": {"minimum": -100, "maximum": 100},
        "description": "Token id (a string of digits) → bias added to its logit.",
    },
    "bad_words": {"items": _NON_EMPTY},
    "allowed_token_ids": {"minItems": 1, "items": {"minimum": 0}},
    "structured_outputs": {
        "description": "One of json, regex, choice, grammar (needs an engine that enforces it)."
    },
}
_LOGPROB: dict[str, dict[str, Any]] = {
    "logprob": {"maximum": 0},
    "bytes": {"items": {"minimum": 0, "maximum": 255}},
}
_FIELDS: dict[str, dict[str, dict[str, Any]]] = {
    "ChatCompletionRequest": {
        **_SAMPLING,
        "messages": {"minItems": 1},
        "max_completion_tokens": {"minimum": 1},
        "tools": {"description": "Function tools `{type: function, function: {name, parameters}}`."},
        "tool_choice": {
            "anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}],
            "description": "none, auto (default with tools), required, or a named function.",
        },
        "response_format": {
            "required": ["type"],
            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
            "description": "json_object and json_schema need an engine that enforces them (else 400).",
        },
        "top_logprobs": {
            "minimum": 0,
            "maximum": MAX_TOP_LOGPROBS,
            "description": "Alternatives per token; needs `logprobs: true`.",
        },
    },
    "CompletionRequest": {
        **_SAMPLING,
        "prompt": {
            "anyOf": [
                {"type": "string", **_NON_EMPTY},
                _TOKEN_IDS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH_CHOICES,
                    "items": {"anyOf": [{"type": "string", **_NON_EMPTY}, _TOKEN_IDS]},
                },
            ],
            "nullable": False,
            "description": "Text, token ids, or a batch of either (n choices per prompt).",
        },
        "echo": {"enum": [False], "description": "`true` is not supported."},
        "logprobs": {"minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS},
        "best_of": {"description": "Equal to `n` if given (more is not supported)."},
    },
    "ChatMessage": {"role": {"enum": list(CHAT_ROLES)}},
    "ChatTopLogprob": _LOGPROB,
    "ChatTokenLogprob": _LOGPROB,
    "CompletionLogprobs": {
        "token_logprobs": {"items": {"maximum": 0}},
        "text_offset": {"items": {"minimum": 0}},
    },
}
# Fields with a default in the struct that a request must still give.
_REQUIRED = {"ChatCompletionRequest": ["messages"], "CompletionRequest": ["prompt"]}
_LEFT_OUT = {"ChatCompletionRequest": UNBUILT_CHAT, "CompletionRequest": UNBUILT_COMPLETION}


def _merged(schema: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    for key, value in extra.items():
        old = schema.get(key)
        out[key] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _nullable(schema: Any) -> Any:
    """msgspec writes JSON Schema 2020-12, where a nullable field is `anyOf [..., {"type": "null"}]`;
    OpenAPI 3.0 says `nullable: true`. (3.1 would take msgspec's as it is, but 3.1 tools treat 1.0 as
    an integer, which the routes refuse, so 3.0 describes them better.)"""
    if isinstance(schema, list):
        return [_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _nullable(value) for key, value in schema.items()}
    options = out.pop("anyOf", None)
    if options is not None:
        rest = [option for option in options if option != {"type": "null"}]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out.update(rest[0])
        else:
            out["anyOf"] = rest
        if len(rest) < len(options):
            out["nullable"] = True
    return out


def _components() -> dict[str, Any]:
    structs = [ChatCompletionRequest, CompletionRequest, ChatCompletion, Completion, ModelList, Error]
    _, generated = msgspec.json.schema_components(structs, ref_template=_REF)
    schemas: dict[str, Any] = _nullable(generated)
    for name, schema in schemas.items():
        properties = schema.get("properties", {})
        for field in _LEFT_OUT.get(name, ()):
            del properties[field]
        for field, extra in _FIELDS.get(name, {}).items():
            properties[field] = _merged(properties[field], extra)
        required = [*schema.pop("required", []), *_REQUIRED.get(name, [])]
        if required:  # 3.0 allows no empty list
            schema["required"] = required
        for field in required:  # a default says the field may be left out
            properties[field].pop("default", None)
    return schemas


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json(_ref("Error"))}


_ERRORS = {
    "400": _error("Invalid request: malformed JSON, a wrong type, or a value out of range."),
    "404": _error("The model does not exist (no live worker serves it)."),
    "413": _error("The request body is larger than `--max-request-body-bytes`."),
    "503": _error("No live worker can take the request now; retry (see `Retry-After`)."),
}

_SSE = {
    "text/event-stream": {
        "schema": {
            "description": "With `stream: true`, one event per chunk (`data: {chunk}`), then `data: [DONE]`.",
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string"}},
        }
    }
}


def _generation(summary: str, request: str, response: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(_ref(request))},
            "responses": {
                "200": {
                    "description": "The completion (JSON), or its chunks as server-sent events.",
                    "content": {**_json(_ref(response)), **_SSE},
                },
                **_ERRORS,
            },
        }
    }


def _get(summary: str, content: dict[str, Any], **errors: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "responses": {"200": {"description": "OK", "content": content}, **errors}}
    }


_STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
_HEALTH = {
    **_STATUS,
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "no_workers"]},
        "models": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}


@functools.cache
def spec() -> dict[str, Any]:
    """The document, built on first use (msgspec's schemas of every struct: a frontend that is never
    asked for it does not pay for them at start)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "turbine frontend", "version": "0.1.0"},
        "paths": {
            "/v1/chat/completions": _generation(
                "Create a chat completion", "ChatCompletionRequest", "ChatCompletion"
            ),
            "/v1/completions": _generation("Create a text completion", "CompletionRequest", "Completion"),
            "/v1/models": _get("List the models with a live worker", _json(_ref("ModelList"))),
            "/v1/models/{model}": {
                **_get("Get one model", _json(_ref("Model")), **{"404": _ERRORS["404"]}),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/health": _get("Models and their live worker counts", _json(_HEALTH)),
            "/live": _get("Liveness", _json(_STATUS)),
            "/metrics": _get(
                "Prometheus metrics",
                {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
            ),
            "/openapi.json": _get("This document", _json({"type": "object"})),
        },
        "components": {"schemas": _components()},
    }


@functools.cache
def spec_json() -> bytes:
    return orjson.dumps(spec())


async def serve_openapi(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    return web.Response(body=spec_json(), content_type="application/json")
